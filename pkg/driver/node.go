package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// nodeBox validates the volume ID common to the node calls and returns
// the box.
func (d *Driver) nodeBox(op, id string) (layout.Box, error) {
	if id == "" {
		return layout.Box{}, invalid("%s: volume ID is required", op)
	}
	box, err := d.home.Box(id)
	if err != nil {
		return layout.Box{}, toStatus(fmt.Errorf("%s: %w", op, err), atNode)
	}
	return box, nil
}

func checkCapability(op string, c *csi.VolumeCapability) error {
	if c == nil {
		return invalid("%s: volume capability is required", op)
	}
	if err := checkCapabilities([]*csi.VolumeCapability{c}); err != nil {
		return invalid("%s: %v", op, err)
	}
	return nil
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	const op = "NodeStageVolume"
	staging := req.GetStagingTargetPath()
	if err := checkMountPath("staging target path", staging); err != nil {
		return nil, err
	}
	if err := checkCapability(op, req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	box, unlock, err := d.lockedBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()

	m, err := d.readRecord(box)
	if err != nil {
		return nil, recordStatus(box, err)
	}
	if _, err := d.stageBox(ctx, box, m, req.GetSecrets()); err != nil {
		return nil, toStatus(err, atNode)
	}
	if err := d.bindOnce(box.Root(), staging, false); err != nil {
		return nil, nodeError(op, box, err)
	}
	klog.FromContext(ctx).V(2).Info("Staged volume", "volume", box.ID(), "staging", staging)
	return &csi.NodeStageVolumeResponse{}, nil
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	const op = "NodeUnstageVolume"
	staging := req.GetStagingTargetPath()
	if err := checkMountPath("staging target path", staging); err != nil {
		return nil, err
	}
	box, unlock, err := d.lockedBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.unmount(staging, false); err != nil {
		return nil, nodeError(op, box, err)
	}
	if err := d.releaseBase(ctx, box); err != nil {
		return nil, nodeError(op, box, err)
	}
	klog.FromContext(ctx).V(2).Info("Unstaged volume", "volume", box.ID(), "staging", staging)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	const op = "NodePublishVolume"
	target := req.GetTargetPath()
	if err := checkMountPath("target path", target); err != nil {
		return nil, err
	}
	if err := checkCapability(op, req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	ephemeral := req.GetVolumeContext()[ephemeralKey] == "true"
	staging := req.GetStagingTargetPath()
	if !ephemeral {
		if err := checkMountPath("staging target path", staging); err != nil {
			return nil, err
		}
	}
	box, unlock, err := d.lockedBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()

	src := staging
	if ephemeral {
		m, err := d.ensureEphemeralBox(ctx, box, req.GetVolumeContext(), req.GetSecrets())
		if err != nil {
			return nil, toStatus(err, atNode)
		}
		if _, err := d.stageBox(ctx, box, m, req.GetSecrets()); err != nil {
			return nil, toStatus(err, atNode)
		}
		src = box.Root()
	} else if err := d.checkPublishable(box, staging, target, req.GetVolumeCapability()); err != nil {
		return nil, nodeError(op, box, err)
	}
	if err := d.bindOnce(src, target, req.GetReadonly()); err != nil {
		return nil, nodeError(op, box, err)
	}
	klog.FromContext(ctx).V(2).Info("Published volume", "volume", box.ID(), "target", target, "readonly", req.GetReadonly(), "ephemeral", ephemeral)
	return &csi.NodePublishVolumeResponse{}, nil
}

// checkPublishable says whether a staged volume may be published at
// target: it exists, it is staged, its overlay is still the plugin's, and
// a single-writer volume is not published anywhere else.
func (d *Driver) checkPublishable(box layout.Box, staging, target string, c *csi.VolumeCapability) error {
	r, err := d.readRecord(box)
	if err != nil {
		return recordStatus(box, err)
	}
	box = r.boxOf(box)
	if ok, err := d.mounter.isMountPoint(staging); err != nil || !ok {
		return status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", box.ID(), staging)
	}
	// The staged box is writable by whoever uses it, so its overlay may
	// have been rewritten since NodeStage checked it. Publishing hands it
	// to a pod whose runtime would follow the backing name, so the header
	// is checked again (without ever opening the file it names).
	if _, err := rootfs.VerifyOverlay(box); qcow2.IsTampered(err) {
		return fmt.Errorf("%w: %w", rootfs.ErrRefusedOverlay, err)
	}
	if c.GetAccessMode().GetMode() != csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		return nil
	}
	other, err := publishedElsewhere(box, staging, target)
	if err != nil {
		return err
	}
	if other != "" {
		return status.Errorf(codes.FailedPrecondition, "single-writer volume %s is already published at %s", box.ID(), other)
	}
	return nil
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	const op = "NodeUnpublishVolume"
	target := req.GetTargetPath()
	if err := checkMountPath("target path", target); err != nil {
		return nil, err
	}
	box, unlock, err := d.lockedBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.unmount(target, true); err != nil {
		return nil, nodeError(op, box, err)
	}
	// An inline ephemeral volume lives exactly as long as its publication.
	if r, err := d.readRecordOnly(box.ID()); err == nil && r.Ephemeral {
		if err := d.deleteBox(ctx, box); err != nil {
			return nil, nodeError(op, box, err)
		}
	}
	klog.FromContext(ctx).V(2).Info("Unpublished volume", "volume", box.ID(), "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_GET_STORAGE_HEALTH,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeExpandVolume grows the volume's disk (expand.go). volume_path is
// only checked to exist: the disk is the box's, wherever it is mounted.
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	const op = "NodeExpandVolume"
	p := req.GetVolumePath()
	box, err := d.nodeBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	if p == "" {
		return nil, invalid("%s %s: volume path is required", op, box.ID())
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(op, c); err != nil {
			return nil, err
		}
	}
	unlock, err := d.lock(box.ID(), op)
	if err != nil {
		return nil, err
	}
	defer unlock()
	r, err := d.readRecord(box)
	if err != nil {
		return nil, recordStatus(box, err)
	}
	if err := checkVolumePath(op, box, p); err != nil {
		return nil, err
	}
	if box, err = d.settleFreeze(ctx, box, r); err != nil {
		return nil, toStatus(err, atNode)
	}
	size, err := d.expandVolume(ctx, box, r, req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// checkVolumePath is NotFound unless the volume path of a stats or expand
// call exists. These calls only look at the box, so a path that is not
// absolute and clean cannot be where the volume is, which is what
// NotFound says too.
func checkVolumePath(op string, box layout.Box, p string) error {
	if checkPath("volume path", p) != nil {
		return status.Errorf(codes.NotFound, "%s %s: volume path %q is not an absolute, clean path, so the volume is not there", op, box.ID(), p)
	}
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return status.Errorf(codes.NotFound, "%s %s: volume path %s does not exist", op, box.ID(), p)
		}
		return nodeError(op, box, err)
	}
	return nil
}

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.cfg.NodeID,
		MaxVolumesPerNode:  d.cfg.MaxVolumesPerNode,
		AccessibleTopology: d.nodeTopology(),
	}, nil
}

// NodeGetVolumeStats reports the overlay: its virtual size as capacity,
// its allocated bytes as used; inodes are the home filesystem's.
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	const op = "NodeGetVolumeStats"
	box, err := d.nodeBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	p := req.GetVolumePath()
	if p == "" {
		return nil, invalid("%s %s: volume path is required", op, box.ID())
	}
	if _, err := d.readRecord(box); err != nil {
		return nil, recordStatus(box, err)
	}
	if err := checkVolumePath(op, box, p); err != nil {
		return nil, err
	}
	var usage []*csi.VolumeUsage
	if u := overlayUsage(box); u != nil {
		usage = append(usage, u)
	}
	var fsst unix.Statfs_t
	if err := unix.Statfs(d.home.Dir(), &fsst); err == nil {
		usage = append(usage, &csi.VolumeUsage{Unit: csi.VolumeUsage_INODES,
			Total: int64(fsst.Files), Used: int64(fsst.Files - fsst.Ffree), Available: int64(fsst.Ffree)})
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: usage}, nil
}

// overlayUsage is the box's disk in bytes: the overlay's virtual size as
// the total and its allocated blocks as used. A box never staged has no
// overlay yet, and so no byte usage. The overlay is opened beneath the box
// root without following links or blocking, since the pod may have put
// anything at that path.
func overlayUsage(box layout.Box) *csi.VolumeUsage {
	f, err := rootfs.OpenOverlay(box)
	if err != nil {
		return nil
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil
	}
	var total int64
	if h, err := qcow2.ReadHeaderFile(f); err == nil {
		total = int64(h.Size)
	}
	used := st.Blocks * 512
	return &csi.VolumeUsage{Unit: csi.VolumeUsage_BYTES, Total: total, Used: used, Available: max(total-used, 0)}
}
