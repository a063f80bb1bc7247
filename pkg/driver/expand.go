package driver

// Volume expansion is node-only. The disk's virtual size is raised in the
// overlay's header; the filesystem inside is the guest's, which the
// privileged plugin never parses once a guest has written it, so the
// guest's own kernel grows it online into the new space (box.json's
// virtualSize then exceeds its filesystemSize). A central external-resizer
// sees no controller expansion, only updates the claim, and leaves the
// work to kubelet, which calls NodeExpandVolume after staging.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// expandVolume grows the volume's disk to what cr asks for and returns
// the disk's size. The caller holds the volume's lock.
//
// The new size is recorded first (after the capacity check), then the
// header is rewritten. When a process holds the overlay open the answer
// is FailedPrecondition, and the recorded size is applied by the next
// NodeStage, which kubelet follows with NodeExpandVolume again anyway.
func (d *Driver) expandVolume(ctx context.Context, box layout.Box, r *volumeRecord, cr *csi.CapacityRange) (int64, error) {
	want, err := d.capacityFor(cr)
	if err != nil {
		return 0, err
	}
	current, staged, err := diskSize(box)
	if err != nil {
		return 0, err
	}
	if !staged {
		current = uint64(d.volumeDiskSize(r))
	}
	switch {
	case want == 0:
		// No size asked for: the plugin never reads the guest's
		// filesystem to find one, so there is nothing to do.
		return int64(current), nil
	case uint64(want) < current || (cr.GetLimitBytes() > 0 && uint64(cr.GetLimitBytes()) < current):
		return 0, status.Errorf(codes.OutOfRange, "volume %s: its disk is %d bytes, and shrinking is refused (asked for %d..%d bytes)", box.ID(), current, cr.GetRequiredBytes(), cr.GetLimitBytes())
	}
	if want > max(r.Capacity, r.ExpandedBytes) {
		if err := d.recordExpansion(box, r, want); err != nil {
			return 0, err
		}
	}
	if !staged {
		// The first NodeStage creates the disk at the recorded size, with
		// its filesystem grown to match.
		return want, nil
	}
	e, err := rootfs.ExpandBox(ctx, box, uint64(want))
	if err != nil {
		return 0, expandStatus(box, want, err)
	}
	if err := d.refreshStagedManifest(box, r, e.NewSize); err != nil {
		return 0, err
	}
	if e.Changed {
		klog.FromContext(ctx).Info("Expanded volume", "volume", box.ID(), "oldSize", e.OldSize, "newSize", e.NewSize,
			"filesystemSize", r.FilesystemSize)
	}
	return int64(e.NewSize), nil
}

// diskSize is the virtual size in the box's overlay header, checked as
// every header is; staged is false when there is no overlay yet.
func diskSize(box layout.Box) (size uint64, staged bool, err error) {
	h, err := rootfs.VerifyOverlay(box)
	switch {
	case err == nil:
		return h.Size, true, nil
	case qcow2.IsIO(err) && errors.Is(err, fs.ErrNotExist):
		return 0, false, nil
	}
	return 0, false, toStatus(fmt.Errorf("volume %s: %w: %w", box.ID(), rootfs.ErrRefusedOverlay, err), atNode)
}

// recordExpansion records the new disk size once it fits beside the other
// volumes' claims.
func (d *Driver) recordExpansion(box layout.Box, r *volumeRecord, size int64) error {
	d.capacityMu.Lock()
	defer d.capacityMu.Unlock()
	if err := d.reserveCapacity(box.ID(), size); err != nil {
		return err
	}
	r.ExpandedBytes = size
	if err := d.writeRecord(r); err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", box.ID(), err)
	}
	return nil
}

// expandStatus turns an ExpandBox error into the status kubelet shows.
func expandStatus(box layout.Box, want int64, err error) error {
	switch {
	case errors.Is(err, rootfs.ErrOverlayInUse):
		return status.Errorf(codes.FailedPrecondition,
			"volume %s: %v; stop the VM using it: the disk grows to %d bytes at the next NodeStage, or when this call is retried with nothing holding it open",
			box.ID(), err, want)
	case errors.Is(err, qcow2.ErrShrink), errors.Is(err, qcow2.ErrGrowNeedsL1Move), errors.Is(err, qcow2.ErrInvalidOption):
		return status.Errorf(codes.OutOfRange, "volume %s: %v", box.ID(), err)
	}
	return toStatus(fmt.Errorf("volume %s: %w", box.ID(), err), atNode)
}

// refreshStagedManifest brings box.json up to date with the disk's new
// size in every view of a staged box at once (rewriteOwnedManifest). An
// unstaged box has no owned copy mounted; its next NodeStage writes one.
func (d *Driver) refreshStagedManifest(box layout.Box, r *volumeRecord, size uint64) error {
	m := &boxManifest{volumeRecord: *r, VirtualSize: size, Backing: box.BackingName()}
	if err := d.rewriteOwnedManifest(box, m); err != nil {
		return toStatus(fmt.Errorf("volume %s: %w", box.ID(), err), atNode)
	}
	return nil
}

// applyPendingExpansion grows a reused disk to the size a NodeExpandVolume
// recorded but could not apply because a VM held the overlay open. It
// never fails a stage: the disk keeps its size, says why in the log, and
// kubelet's next NodeExpandVolume tries again.
func (d *Driver) applyPendingExpansion(ctx context.Context, box layout.Box, r *volumeRecord, disk *rootfs.BoxDisk) {
	if r.ExpandedBytes <= 0 || uint64(r.ExpandedBytes) <= disk.VirtualSize {
		return
	}
	e, err := rootfs.ExpandBox(ctx, box, uint64(r.ExpandedBytes))
	if err != nil {
		klog.FromContext(ctx).Info("Could not apply a recorded expansion at stage; the disk keeps its size", "volume", box.ID(),
			"size", disk.VirtualSize, "expandedBytes", r.ExpandedBytes, "reason", err.Error())
		return
	}
	disk.VirtualSize = e.NewSize
	klog.FromContext(ctx).Info("Applied a recorded expansion at stage", "volume", box.ID(), "oldSize", e.OldSize, "newSize", e.NewSize)
}
