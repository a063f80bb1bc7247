package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// maxPathLen bounds staging and target paths (PATH_MAX).
const maxPathLen = 4096

// checkPath refuses a path the driver should never mount on: relative,
// unclean (a ".." could climb out of the kubelet directory), NUL, or
// absurdly long.
func checkPath(what, p string) error {
	switch {
	case p == "":
		return invalid("%s is required", what)
	case len(p) > maxPathLen:
		return invalid("%s is %d bytes, at most %d allowed", what, len(p), maxPathLen)
	case strings.ContainsRune(p, 0):
		return invalid("%s %q contains NUL", what, p)
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return invalid("%s %q must be an absolute, clean path", what, p)
	}
	return nil
}

// checkMountPath is checkPath for a path the driver creates, mounts on,
// unmounts or removes: on top, no existing component may be a symbolic
// link. Kubelet creates these paths as plain directories, so a link in
// one was planted to redirect the driver out of the kubelet directory (a
// bind mount over /etc, the removal of someone else's directory). A node
// whose kubelet directory is itself reached through a link must give
// kubelet its real path.
func checkMountPath(what, p string) error {
	if err := checkPath(what, p); err != nil {
		return err
	}
	for q := p; ; q = filepath.Dir(q) {
		// Missing components are fine (they are created as directories);
		// any other error surfaces where the path is used.
		if fi, err := os.Lstat(q); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return invalid("%s %q: %s is a symbolic link, which could lead out of the kubelet directory", what, p, q)
		}
		if q == "/" {
			return nil
		}
	}
}

// nodeVolume validates the ID, capability and path common to the node
// calls and returns the box.
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

// lockedBox is nodeBox plus the volume's lock, taken last so that bad
// input is refused without touching it. The caller must call unlock.
func (d *Driver) lockedBox(op, id string) (box layout.Box, unlock func(), err error) {
	if box, err = d.nodeBox(op, id); err != nil {
		return box, nil, err
	}
	unlock, err = d.lock(box.ID(), op)
	return box, unlock, err
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

	m, err := readManifest(box)
	if err != nil {
		return nil, manifestStatus(box, err)
	}
	if _, err := d.stageBox(ctx, box, m, req.GetSecrets()); err != nil {
		return nil, toStatus(err, atNode)
	}
	mounted, err := d.mounter.isMountPoint(staging)
	if err != nil && !mount.IsCorruptedMnt(err) {
		return nil, status.Errorf(codes.Internal, "%s %s: check %s: %v", op, box.ID(), staging, err)
	}
	if err != nil || !mounted {
		if err != nil {
			// A corrupted mount (its source vanished) is replaced.
			_ = d.mounter.Unmount(staging)
		}
		if err := os.MkdirAll(staging, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
		}
		if err := d.mounter.Mount(box.Root(), staging, "", []string{"rbind"}); err != nil {
			return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
		}
	}
	klog.FromContext(ctx).V(2).Info("Staged volume", "volume", box.ID(), "staging", staging)
	return &csi.NodeStageVolumeResponse{}, nil
}

// manifestStatus maps a box.json read failure: a missing box is NotFound
// (the volume does not exist), anything else is the node's problem.
func manifestStatus(box layout.Box, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return status.Errorf(codes.NotFound, "volume %s does not exist on this node", box.ID())
	}
	return status.Errorf(codes.Internal, "volume %s: %v", box.ID(), err)
}

// stageBox makes the box ready to boot: overlay created or reused by the
// seed rules, base bind-mounted read-only in place, box.json complete.
func (d *Driver) stageBox(ctx context.Context, box layout.Box, m *boxManifest, secrets map[string]string) (rootfs.BoxDisk, error) {
	params, err := parseParams(m.Params)
	if err != nil {
		return rootfs.BoxDisk{}, fmt.Errorf("volume %s: box.json parameters: %w", box.ID(), err)
	}
	// The overlay metric leaves out waiting for the base, which has its
	// own metrics, so it shows the cost of the overlay itself.
	var baseWait time.Duration
	start := time.Now()
	disk, err := rootfs.PrepareBox(ctx, box, func(ctx context.Context) (rootfs.Base, error) {
		t := time.Now()
		defer func() { baseWait += time.Since(t) }()
		return d.ensureBase(ctx, m, params, secrets)
	}, uint64(max(m.Capacity, 0)))
	if err != nil {
		return disk, err
	}
	if disk.Outcome != rootfs.Reused {
		d.cfg.Metrics.ObserveOverlay(string(disk.Outcome), time.Since(start)-baseWait)
	}
	// The base is shared by every box: inside a pod it must be read-only
	// even to root, which file modes cannot promise but a mount can.
	if mounted, err := d.mounter.isMountPoint(box.BasePath()); err != nil {
		return disk, fmt.Errorf("volume %s: check %s: %w", box.ID(), box.BasePath(), err)
	} else if !mounted {
		if err := d.mounter.Mount(box.BasePath(), box.BasePath(), "", []string{"bind", "ro"}); err != nil {
			return disk, fmt.Errorf("volume %s: %w", box.ID(), err)
		}
	} else if err := d.mounter.ensureReadOnly(box.BasePath()); err != nil {
		// A crash between Mount's bind and its read-only remount left the
		// shared base writable; a retried stage must not accept that.
		return disk, fmt.Errorf("volume %s: %w", box.ID(), err)
	}
	if m.VirtualSize != disk.VirtualSize || m.Backing != box.BackingName() {
		m.VirtualSize, m.Backing = disk.VirtualSize, box.BackingName()
		if err := writeManifest(box.Root(), m); err != nil {
			return disk, err
		}
	}
	return disk, nil
}

// ensureBase returns the cached base for the volume's digest, building it
// if needed (and allowed). The build continues if the caller gives up.
func (d *Driver) ensureBase(ctx context.Context, m *boxManifest, p volumeParams, secrets map[string]string) (rootfs.Base, error) {
	key := rootfs.Key{Digest: m.Digest, Builder: d.builder.Version()}
	if b, ok, err := d.cache.Lookup(key); err != nil || ok {
		return b, err
	}
	if p.PullPolicy == PullNever {
		return rootfs.Base{}, status.Errorf(codes.FailedPrecondition, "base for %s (%s) is not in the node cache and pullPolicy is %s", m.Image, m.Digest, PullNever)
	}
	return d.cache.Ensure(ctx, key, func(ctx context.Context, out *os.File) error {
		ref, err := source.Parse(m.Pinned)
		if err != nil {
			return err
		}
		img, err := source.Resolve(ctx, ref, d.sourceOptions(p, secrets))
		if err != nil {
			return err
		}
		if got := img.Digest.String(); got != m.Digest {
			return fmt.Errorf("image %s resolved to %s, but the volume was created for %s", m.Pinned, got, m.Digest)
		}
		return d.builder.Build(ctx, img.V1, out)
	})
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
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
	}
	if err := d.releaseBase(box); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
	}
	klog.FromContext(ctx).V(2).Info("Unstaged volume", "volume", box.ID(), "staging", staging)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// releaseBase drops the box's read-only base mount once nothing outside
// the box shows it, so an unstaged volume leaves no mounts behind.
func (d *Driver) releaseBase(box layout.Box) error {
	if _, err := os.Stat(box.Root()); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	mounts, err := readBoxMounts(box)
	if err != nil {
		return err
	}
	if mounts.baseMounted && len(mounts.outside) == 0 {
		return d.mounter.Unmount(box.BasePath())
	}
	return nil
}

// unmount detaches whatever is mounted at p (a corrupted mount included)
// and, if remove is set, removes the then-empty directory. A path that is
// not mounted or does not exist is fine: kubelet retries these calls and
// must never be told NotFound (kubernetes/kubernetes#90752).
func (d *Driver) unmount(p string, remove bool) error {
	mounted, err := d.mounter.isMountPoint(p)
	switch {
	case err != nil && mount.IsCorruptedMnt(err):
		mounted = true
	case err != nil:
		return fmt.Errorf("check %s: %w", p, err)
	}
	if mounted {
		if err := d.mounter.Unmount(p); err != nil && !errors.Is(err, unix.EINVAL) {
			return err
		}
	}
	if remove {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	return nil
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
		if err := d.stageEphemeral(ctx, box, req); err != nil {
			return nil, err
		}
		src = box.Root()
	} else {
		if _, err := readManifest(box); err != nil {
			return nil, manifestStatus(box, err)
		}
		if ok, err := d.mounter.isMountPoint(staging); err != nil || !ok {
			return nil, status.Errorf(codes.FailedPrecondition, "%s %s: volume is not staged at %s", op, box.ID(), staging)
		}
		// The staged box is writable by whoever uses it, so its overlay
		// may have been rewritten since NodeStage checked it. Publishing
		// hands it to a pod whose runtime would follow the backing name:
		// check the header again (it never opens what the header names).
		if _, err := rootfs.VerifyOverlay(box); qcow2.IsTampered(err) {
			return nil, status.Errorf(codes.FailedPrecondition, "%s %s: %v", op, box.ID(), fmt.Errorf("%w: %w", rootfs.ErrRefusedOverlay, err))
		}
		if req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
			if other, err := publishedElsewhere(box, staging, target); err != nil {
				return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
			} else if other != "" {
				return nil, status.Errorf(codes.FailedPrecondition, "%s %s: single-writer volume is already published at %s", op, box.ID(), other)
			}
		}
	}
	mounted, err := d.mounter.isMountPoint(target)
	if err != nil && !mount.IsCorruptedMnt(err) {
		return nil, status.Errorf(codes.Internal, "%s %s: check %s: %v", op, box.ID(), target, err)
	}
	if err == nil && mounted {
		if req.GetReadonly() {
			// The same crash window: a read-only publish must not be
			// confirmed over a bind that never got its remount.
			if err := d.mounter.ensureReadOnly(target); err != nil {
				return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
			}
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if err != nil {
		_ = d.mounter.Unmount(target)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
	}
	opts := []string{"rbind"}
	if req.GetReadonly() {
		opts = append(opts, "ro")
	}
	if err := d.mounter.Mount(src, target, "", opts); err != nil {
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
	}
	klog.FromContext(ctx).V(2).Info("Published volume", "volume", box.ID(), "target", target, "readonly", req.GetReadonly(), "ephemeral", ephemeral)
	return &csi.NodePublishVolumeResponse{}, nil
}

// publishedElsewhere returns a mount of the box that is neither the
// staging path nor the target (nor nested in them), if there is one.
func publishedElsewhere(box layout.Box, staging, target string) (string, error) {
	mounts, err := readBoxMounts(box)
	if err != nil {
		return "", err
	}
	for _, m := range mounts.outside {
		if !within(m, staging) && !within(m, target) {
			return m, nil
		}
	}
	return "", nil
}

// stageEphemeral does CreateVolume's and NodeStage's work for an inline
// ephemeral volume, whose image comes in the volume attributes.
func (d *Driver) stageEphemeral(ctx context.Context, box layout.Box, req *csi.NodePublishVolumeRequest) error {
	params, err := parseParams(req.GetVolumeContext())
	if err != nil {
		return toStatus(fmt.Errorf("inline volume %s: %w", box.ID(), err), atNode)
	}
	m, err := readManifest(box)
	switch {
	case err == nil:
		if !m.Ephemeral || m.Image != params.Image {
			return status.Errorf(codes.AlreadyExists, "volume %s exists for image %q (ephemeral %v), not inline image %q", box.ID(), m.Image, m.Ephemeral, params.Image)
		}
	case errors.Is(err, fs.ErrNotExist):
		img, err := d.resolve(ctx, params, req.GetSecrets())
		if err != nil {
			return toStatus(fmt.Errorf("inline volume %s: %w", box.ID(), err), atNode)
		}
		cfg, err := img.Config()
		if err != nil {
			return toStatus(fmt.Errorf("inline volume %s: %w", box.ID(), err), atNode)
		}
		m = &boxManifest{
			Version: manifestVersion, VolumeID: box.ID(), Ephemeral: true,
			Params: userParams(req.GetVolumeContext()),
			Image:  params.Image, Digest: img.Digest.String(), Pinned: img.Pinned, Config: cfg,
		}
		if err := createBox(d.home, box, m); err != nil {
			return toStatus(err, atNode)
		}
	default:
		return manifestStatus(box, err)
	}
	if _, err := d.stageBox(ctx, box, m, req.GetSecrets()); err != nil {
		return toStatus(err, atNode)
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
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
	}
	// An inline ephemeral volume lives exactly as long as its publication.
	if m, err := readManifest(box); err == nil && m.Ephemeral {
		if err := d.deleteBox(ctx, box); err != nil {
			return nil, err
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
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.cfg.NodeID,
		MaxVolumesPerNode:  d.cfg.MaxVolumesPerNode,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{d.cfg.TopologyKey(): d.cfg.NodeID}},
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
	if _, err := readManifest(box); err != nil {
		return nil, manifestStatus(box, err)
	}
	// A read-only query: a path that is not absolute and clean cannot be
	// where the volume is, which is what NotFound says.
	if checkPath("volume path", p) != nil {
		return nil, status.Errorf(codes.NotFound, "%s %s: volume path %q is not an absolute, clean path, so the volume is not there", op, box.ID(), p)
	}
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, status.Errorf(codes.NotFound, "%s %s: volume path %s does not exist", op, box.ID(), p)
		}
		return nil, status.Errorf(codes.Internal, "%s %s: %v", op, box.ID(), err)
	}
	var usage []*csi.VolumeUsage
	var st unix.Stat_t
	if err := unix.Stat(box.GuestRootfsDiskPath(), &st); err == nil {
		var total int64
		if h, err := qcow2.ReadHeader(box.GuestRootfsDiskPath()); err == nil {
			total = int64(h.Size)
		}
		used := st.Blocks * 512
		usage = append(usage, &csi.VolumeUsage{Unit: csi.VolumeUsage_BYTES, Total: total, Used: used, Available: max(total-used, 0)})
	}
	var fsst unix.Statfs_t
	if err := unix.Statfs(d.home.Dir(), &fsst); err == nil {
		usage = append(usage, &csi.VolumeUsage{Unit: csi.VolumeUsage_INODES,
			Total: int64(fsst.Files), Used: int64(fsst.Files - fsst.Ffree), Available: int64(fsst.Ffree)})
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: usage}, nil
}
