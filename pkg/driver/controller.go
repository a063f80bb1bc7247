package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if err := checkCreateRequest(req); err != nil {
		return nil, err
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

	src, err := sourceOf(req.GetVolumeContentSource())
	if err != nil {
		return nil, invalid("CreateVolume %q: %v", name, err)
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

	if r, err := d.readRecordOnly(id); err == nil {
		if !r.sameVolume(name, userParams(req.GetParameters()), capacity, src) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists as %s with different parameters or capacity, or another content source (image %q, %d bytes)", name, id, r.Image, r.Capacity)
		}
		// A create that stopped between the record and the box ends here.
		if err := createBox(d.home, box, &boxManifest{volumeRecord: *r}); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, toStatus(err, atController)
		}
		return &csi.CreateVolumeResponse{Volume: d.volume(r)}, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "volume %q: the record of %s is unreadable: %v", name, id, err)
	}
	// A quick refusal before the registry is asked; checked again below,
	// under the capacity lock, once the record is ready to be written.
	if err := d.reserveCapacity(id, capacity); err != nil {
		return nil, err
	}
	if src != nil {
		m := &volumeRecord{VolumeID: id, Name: name, Params: userParams(req.GetParameters()), Capacity: capacity, Source: src}
		if err := d.createFromSource(ctx, box, m, req.GetCapacityRange() != nil, params); err != nil {
			return nil, toStatus(err, atController)
		}
		klog.FromContext(ctx).Info("Created volume", "volume", id, "name", name, "image", m.Image, "digest", m.Digest, "capacity", m.Capacity, "source", src.String(), "layers", len(m.Layers))
		return &csi.CreateVolumeResponse{Volume: d.volume(m)}, nil
	}
	m, err := d.newRecord(ctx, id, params, req.GetParameters(), req.GetSecrets(), false)
	if err != nil {
		return nil, toStatus(fmt.Errorf("CreateVolume %q: %w", name, err), atController)
	}
	m.Name, m.Capacity = name, capacity
	if err := d.createReserved(box, m, atController); err != nil {
		return nil, err
	}
	klog.FromContext(ctx).Info("Created volume", "volume", id, "name", name, "image", params.Image, "digest", m.Digest, "capacity", capacity)
	return &csi.CreateVolumeResponse{Volume: d.volume(m)}, nil
}

// createReserved creates the volume (a CreateVolume's, or an inline
// ephemeral one's at its first publish) once its claim is checked again
// under the capacity lock, so that concurrent creations cannot together
// promise more than there is.
func (d *Driver) createReserved(box layout.Box, r *volumeRecord, where service) error {
	d.capacityMu.Lock()
	defer d.capacityMu.Unlock()
	if err := d.reserveCapacity(box.ID(), r.Capacity); err != nil {
		return err
	}
	if err := d.createVolume(box, r); err != nil {
		return toStatus(err, where)
	}
	return nil
}

// checkCreateRequest refuses a CreateVolume that no parameter could make
// valid.
func checkCreateRequest(req *csi.CreateVolumeRequest) error {
	name := req.GetName()
	switch {
	case name == "":
		return invalid("CreateVolume: name is required")
	case len(name) > maxNameLen:
		return invalid("CreateVolume: name is %d bytes, at most %d allowed", len(name), maxNameLen)
	case strings.ContainsRune(name, 0):
		// Harmless to the box (its ID is a hash of the name), but no CO
		// sends one, and it would end up in box.json and in logs.
		return invalid("CreateVolume %q: name contains NUL", name)
	case len(req.GetVolumeCapabilities()) == 0:
		return invalid("CreateVolume %q: volume capabilities are required", name)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return invalid("CreateVolume %q: %v", name, err)
	}
	return nil
}

// volume is the CSI description of the volume a record describes.
func (d *Driver) volume(m *volumeRecord) *csi.Volume {
	return &csi.Volume{
		VolumeId:           m.VolumeID,
		CapacityBytes:      m.Capacity,
		VolumeContext:      map[string]string{ctxImage: m.Image, ctxDigest: m.Digest, ctxPinned: m.Pinned},
		AccessibleTopology: []*csi.Topology{d.nodeTopology()},
		ContentSource:      m.Source.csiSource(),
	}
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
		return nil, toStatus(err, atController)
	}
	return &csi.DeleteVolumeResponse{}, nil
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
	if _, err := d.readRecord(box); err != nil {
		return nil, recordStatus(box, err)
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
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// GetCapacity reports the largest disk a new volume could get now: the
// home filesystem's free bytes less the reserve, times the overprovision
// ratio, less what existing volumes may still write (capacity.go).
// Another node's topology gets 0.
func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if t := req.GetAccessibleTopology(); t != nil && !d.isThisNode(t) {
		return &csi.GetCapacityResponse{}, nil
	}
	if len(req.GetVolumeCapabilities()) > 0 {
		if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	available, _, _, err := d.availableBytes("")
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	// The largest disk whose promise fits what is available.
	available = max(available-overlayOverhead(max(available, 0)), 0)
	resp := &csi.GetCapacityResponse{AvailableCapacity: available}
	if d.cfg.MaxVolumeSize > 0 {
		resp.MaximumVolumeSize = wrapInt64(min(available, d.cfg.MaxVolumeSize))
	}
	return resp, nil
}

func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	name := req.GetName()
	switch {
	case name == "":
		return nil, invalid("CreateSnapshot: name is required")
	case len(name) > maxNameLen:
		return nil, invalid("CreateSnapshot: name is %d bytes, at most %d allowed", len(name), maxNameLen)
	case req.GetSourceVolumeId() == "":
		return nil, invalid("CreateSnapshot %q: source volume ID is required", name)
	}
	id := d.snapshotID(name)
	unlock, err := d.lock(id, "CreateSnapshot")
	if err != nil {
		return nil, err
	}
	defer unlock()
	s, err := d.readSnapshot(id)
	if err == nil {
		if s.SourceID != req.GetSourceVolumeId() {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists as %s of volume %s, not of %s", name, id, s.SourceID, req.GetSourceVolumeId())
		}
		return &csi.CreateSnapshotResponse{Snapshot: s.csiSnapshot()}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "snapshot %q: %v", name, err)
	}
	box, err := d.home.Box(req.GetSourceVolumeId())
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "CreateSnapshot %q: source volume %s does not exist: %v", name, req.GetSourceVolumeId(), err)
	}
	vunlock, err := d.lock(box.ID(), "CreateSnapshot")
	if err != nil {
		return nil, err
	}
	defer vunlock()
	s, err = d.createSnapshot(ctx, id, name, box)
	if err != nil {
		return nil, toStatus(err, atController)
	}
	return &csi.CreateSnapshotResponse{Snapshot: s.csiSnapshot()}, nil
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, invalid("DeleteSnapshot: snapshot ID is required")
	}
	_, node, ok := parseSnapshotID(id)
	switch {
	case !ok:
		// Not one this plugin made, so it does not exist: gone is success.
		return &csi.DeleteSnapshotResponse{}, nil
	case node != "" && node != d.cfg.NodeID:
		return nil, status.Errorf(codes.FailedPrecondition, "DeleteSnapshot: %v", &otherNodeError{id: id, node: node})
	}
	unlock, err := d.lock(id, "DeleteSnapshot")
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.deleteSnapshot(ctx, id); err != nil {
		return nil, toStatus(err, atController)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	return d.listSnapshots(req)
}
