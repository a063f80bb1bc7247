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
// The size is recorded (after the capacity check) once the header has it,
// or when a process holding the overlay open stopped the growth: then the
// answer is FailedPrecondition, and the recorded size is applied by the
// next NodeStage, which kubelet follows with NodeExpandVolume again anyway.
// A growth refused for any other reason records nothing, so it reserves
// no space.
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
		current = uint64(diskBytes(d.volumeDiskSize(r)))
	}
	disk := diskBytes(want)
	switch {
	case want == 0:
		// No size asked for: the plugin never reads the guest's
		// filesystem to find one, so there is nothing to do.
		return int64(current), nil
	case uint64(disk) < current:
		return 0, status.Errorf(codes.OutOfRange, "volume %s: its disk is %d bytes, and shrinking is refused (asked for %d bytes)", box.ID(), current, want)
	case cr.GetLimitBytes() > 0 && disk > cr.GetLimitBytes():
		return 0, status.Errorf(codes.OutOfRange, "volume %s: a disk of %d bytes is a multiple of 512, %d bytes, above the limit of %d", box.ID(), want, disk, cr.GetLimitBytes())
	}

	d.capacityMu.Lock()
	defer d.capacityMu.Unlock()
	if want != r.ExpandedBytes {
		if err := d.reserveCapacity(box.ID(), want); err != nil {
			return 0, err
		}
	}
	if !staged {
		// The first NodeStage creates the disk at the recorded size, with
		// its filesystem grown to match.
		return disk, d.recordExpansion(box, r, want)
	}
	e, err := rootfs.ExpandBox(ctx, box, uint64(want))
	if errors.Is(err, rootfs.ErrOverlayInUse) {
		if rerr := d.recordExpansion(box, r, want); rerr != nil {
			return 0, rerr
		}
	}
	if err != nil {
		return 0, expandStatus(box, want, err)
	}
	if err := d.recordExpansion(box, r, want); err != nil {
		return 0, err
	}
	d.refreshStagedManifest(ctx, box, r, e.NewSize)
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

// recordExpansion records the disk size asked for, if the record does not
// say it already. The caller holds d.capacityMu and checked the capacity.
func (d *Driver) recordExpansion(box layout.Box, r *volumeRecord, size int64) error {
	if r.ExpandedBytes == size {
		return nil
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
// unstaged box has no owned copy; its next NodeStage writes one. box.json
// is the runtime's, never the plugin's truth, so a rewrite that fails
// (a pod holding a lease on its view, say) does not fail the expansion:
// it is logged, and the next NodeStage writes box.json whole.
func (d *Driver) refreshStagedManifest(ctx context.Context, box layout.Box, r *volumeRecord, size uint64) {
	if err := d.rewriteOwnedManifest(box, d.manifestFor(box, r, size)); err != nil {
		klog.FromContext(ctx).Error(err, "Could not bring box.json up to date with the expanded disk; the next NodeStage does", "volume", box.ID())
	}
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
