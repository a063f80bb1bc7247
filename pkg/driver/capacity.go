package driver

import (
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

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

// topologyAllows reports whether a volume may be placed as req asks.
// Volumes only exist on this node, so a requisite set must include it.
func (d *Driver) topologyAllows(req *csi.TopologyRequirement) bool {
	if req == nil || len(req.GetRequisite()) == 0 {
		return true
	}
	for _, t := range req.GetRequisite() {
		if d.isThisNode(t) {
			return true
		}
	}
	return false
}

// isThisNode reports whether a topology segment names this node.
func (d *Driver) isThisNode(t *csi.Topology) bool {
	v, ok := t.GetSegments()[d.cfg.TopologyKey()]
	return ok && v == d.cfg.NodeID
}

// nodeTopology is this node's topology, where every volume it makes lives.
func (d *Driver) nodeTopology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{d.cfg.TopologyKey(): d.cfg.NodeID}}
}
