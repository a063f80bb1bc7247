package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
	"golang.org/x/sys/unix"
)

// resolveTimeout bounds the registry round trips of CreateVolume: it only
// resolves a tag and reads the image config, never pulls layers.
const resolveTimeout = 60 * time.Second

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	switch {
	case name == "":
		return nil, invalid("CreateVolume: name is required")
	case len(name) > maxNameLen:
		return nil, invalid("CreateVolume: name is %d bytes, at most %d allowed", len(name), maxNameLen)
	case strings.ContainsRune(name, 0):
		// Harmless to the box (its ID is a hash of the name), but no CO
		// sends one, and it would end up in box.json and in logs.
		return nil, invalid("CreateVolume %q: name contains NUL", name)
	case len(req.GetVolumeCapabilities()) == 0:
		return nil, invalid("CreateVolume %q: volume capabilities are required", name)
	case req.GetVolumeContentSource() != nil:
		return nil, invalid("CreateVolume %q: volume content sources (snapshots, clones) are not supported", name)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, invalid("CreateVolume %q: %v", name, err)
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, toStatus(fmt.Errorf("CreateVolume %q: %w", name, err), atController)
	}
	capacity, err := d.capacityFor(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	if !d.topologyAllows(req.GetAccessibilityRequirements()) {
		return nil, status.Errorf(codes.ResourceExhausted, "CreateVolume %q: accessibility requirements exclude node %s (this plugin provisions only on its own node)", name, d.cfg.NodeID)
	}

	id := volumeIDForName(name)
	unlock, err := d.lock(id, "CreateVolume")
	if err != nil {
		return nil, err
	}
	defer unlock()
	box, err := d.home.Box(id)
	if err != nil {
		return nil, toStatus(err, atController)
	}
	log := klog.FromContext(ctx).WithValues("volume", id, "name", name)

	want := userParams(req.GetParameters())
	if m, err := readManifest(box); err == nil {
		if m.Name != name || !maps.Equal(m.Params, want) || m.Capacity != capacity {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists as %s with different parameters or capacity (image %q, %d bytes)", name, id, m.Image, m.Capacity)
		}
		return &csi.CreateVolumeResponse{Volume: d.volume(m)}, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "volume %q: box %s is unreadable: %v", name, box.Root(), err)
	}
	if err := d.checkFreeSpace(capacity); err != nil {
		return nil, err
	}

	rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	img, err := d.resolve(rctx, params, req.GetSecrets())
	if err != nil {
		return nil, toStatus(fmt.Errorf("CreateVolume %q: %w", name, err), atController)
	}
	cfg, err := img.Config()
	if err != nil {
		return nil, toStatus(fmt.Errorf("CreateVolume %q: %w", name, err), atController)
	}
	m := &boxManifest{
		Version:  manifestVersion,
		VolumeID: id,
		Name:     name,
		Params:   want,
		Capacity: capacity,
		Image:    params.Image,
		Digest:   img.Digest.String(),
		Pinned:   img.Pinned,
		Config:   cfg,
	}
	if err := createBox(d.home, box, m); err != nil {
		return nil, toStatus(err, atController)
	}
	log.Info("Created volume", "image", params.Image, "digest", m.Digest, "capacity", capacity)
	return &csi.CreateVolumeResponse{Volume: d.volume(m)}, nil
}

func (d *Driver) volume(m *boxManifest) *csi.Volume {
	return &csi.Volume{
		VolumeId:      m.VolumeID,
		CapacityBytes: m.Capacity,
		VolumeContext: map[string]string{ctxImage: m.Image, ctxDigest: m.Digest, ctxPinned: m.Pinned},
		AccessibleTopology: []*csi.Topology{
			{Segments: map[string]string{d.cfg.TopologyKey(): d.cfg.NodeID}},
		},
	}
}

// resolve pins the image to a digest. Credentials come from the call's
// secrets (a dockerconfigjson payload), then the node's docker config.
func (d *Driver) resolve(ctx context.Context, p volumeParams, secrets map[string]string) (*source.Image, error) {
	ref, err := source.Parse(p.Image)
	if err != nil {
		return nil, err
	}
	return source.Resolve(ctx, ref, d.sourceOptions(p, secrets))
}

// dockerConfigSecretKey is the key of a kubernetes.io/dockerconfigjson
// Secret, which is what a node-stage or provisioner secret reference hands
// over.
const dockerConfigSecretKey = ".dockerconfigjson"

func (d *Driver) sourceOptions(p volumeParams, secrets map[string]string) source.Options {
	return source.Options{
		PlainHTTP:             p.PlainHTTP,
		InsecureSkipTLSVerify: p.InsecureSkipTLSVerify,
		DockerConfigJSON:      []byte(secrets[dockerConfigSecretKey]),
		RetryBackoff:          d.cfg.RegistryRetry,
		Transports:            d.transports,
	}
}

// capacityFor picks the virtual size to record: the requested bytes, or
// the limit if only that is given. 0 means "the base's size".
func (d *Driver) capacityFor(r *csi.CapacityRange) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	switch {
	case req < 0 || lim < 0:
		return 0, status.Errorf(codes.OutOfRange, "capacity range %d..%d is negative", req, lim)
	case lim > 0 && req > lim:
		return 0, status.Errorf(codes.OutOfRange, "required bytes %d exceed limit bytes %d", req, lim)
	}
	size := req
	if size == 0 {
		size = lim
	}
	if d.cfg.MaxVolumeSize > 0 && size > d.cfg.MaxVolumeSize {
		return 0, status.Errorf(codes.ResourceExhausted, "capacity %d bytes exceeds the maximum volume size %d", size, d.cfg.MaxVolumeSize)
	}
	return size, nil
}

// checkFreeSpace refuses a volume whose overlay could not grow to its full
// size on the home filesystem, keeping CapacityReserve free for the cache.
func (d *Driver) checkFreeSpace(capacity int64) error {
	free, err := d.freeBytes()
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	if capacity > free {
		return status.Errorf(codes.ResourceExhausted, "capacity %d bytes exceeds the %d bytes free on %s (after a reserve of %d)", capacity, free, d.home.Dir(), d.cfg.CapacityReserve)
	}
	return nil
}

// freeBytes is what the home filesystem has available, minus the reserve.
func (d *Driver) freeBytes() (int64, error) {
	var s unix.Statfs_t
	if err := unix.Statfs(d.home.Dir(), &s); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", d.home.Dir(), err)
	}
	return max(int64(s.Bavail)*s.Bsize-d.cfg.CapacityReserve, 0), nil
}

// topologyAllows: volumes only exist on this node, so a requisite set must
// include it.
func (d *Driver) topologyAllows(req *csi.TopologyRequirement) bool {
	if req == nil || len(req.GetRequisite()) == 0 {
		return true
	}
	for _, t := range req.GetRequisite() {
		if v, ok := t.GetSegments()[d.cfg.TopologyKey()]; ok && v == d.cfg.NodeID {
			return true
		}
	}
	return false
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("DeleteVolume: volume ID is required")
	}
	box, err := d.home.Box(id)
	if err != nil {
		return nil, toStatus(err, atController)
	}
	unlock, err := d.lock(id, "DeleteVolume")
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.deleteBox(ctx, box); err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// deleteBox removes a box that nothing mounts any more. Its base link goes
// with it, which is what makes the base eligible for eviction.
func (d *Driver) deleteBox(ctx context.Context, box layout.Box) error {
	if err := unix.Lstat(box.Root(), new(unix.Stat_t)); errors.Is(err, unix.ENOENT) {
		return nil
	}
	mounts, err := readBoxMounts(box)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", box.ID(), err)
	}
	if len(mounts.outside) > 0 {
		return status.Errorf(codes.FailedPrecondition, "volume %s is still mounted at %v", box.ID(), mounts.outside)
	}
	if mounts.baseMounted {
		if err := d.mounter.Unmount(box.BasePath()); err != nil {
			return status.Errorf(codes.Internal, "volume %s: %v", box.ID(), err)
		}
	}
	if err := removeBox(d.home, box); err != nil {
		return toStatus(err, atController)
	}
	klog.FromContext(ctx).Info("Deleted volume", "volume", box.ID())
	return nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("ValidateVolumeCapabilities: volume ID is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, invalid("ValidateVolumeCapabilities %s: volume capabilities are required", id)
	}
	box, err := d.home.Box(id)
	if err != nil {
		return nil, toStatus(err, atController)
	}
	if _, err := readManifest(box); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, status.Errorf(codes.NotFound, "volume %s does not exist", id)
		}
		return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// GetCapacity reports the home filesystem's real free bytes minus the
// reserve; another node's topology gets 0.
func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if t := req.GetAccessibleTopology(); t != nil {
		if v, ok := t.GetSegments()[d.cfg.TopologyKey()]; !ok || v != d.cfg.NodeID {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	if len(req.GetVolumeCapabilities()) > 0 {
		if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	free, err := d.freeBytes()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	resp := &csi.GetCapacityResponse{AvailableCapacity: free}
	if d.cfg.MaxVolumeSize > 0 {
		resp.MaximumVolumeSize = wrapInt64(min(free, d.cfg.MaxVolumeSize))
	}
	return resp, nil
}

// lock takes the per-volume lock or answers Aborted, as the CSI spec asks
// for an operation already in flight on the same volume.
func (d *Driver) lock(id, op string) (func(), error) {
	if ok, holder := d.locks.tryAcquire(id, op); !ok {
		return nil, status.Errorf(codes.Aborted, "%s on volume %s: %s is in progress", op, id, holder)
	}
	return func() { d.locks.release(id) }, nil
}
