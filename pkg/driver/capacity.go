package driver

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// capacityFor picks the virtual size to record: the requested bytes, or
// the limit if only that is given. 0 means "the base's size". A size no
// disk can have (past QEMU's largest, or --max-volume-size) is OutOfRange,
// as the CSI spec has it for a capacity the plugin does not allow; that
// bound also keeps every sum in the capacity accounting far from
// overflowing.
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
	switch {
	case d.cfg.MaxVolumeSize > 0 && size > d.cfg.MaxVolumeSize:
		return 0, status.Errorf(codes.OutOfRange, "capacity %d bytes exceeds the maximum volume size %d", size, d.cfg.MaxVolumeSize)
	case uint64(size) > qcow2.MaxVirtualSize:
		return 0, status.Errorf(codes.OutOfRange, "capacity %d bytes exceeds the largest disk a qcow2 overlay can have (%d bytes)", size, qcow2.MaxVirtualSize)
	}
	return size, nil
}

// diskBytes is the size of the disk a volume of capacity bytes gets: the
// overlay's virtual size is a multiple of 512, rounded up as qemu-img does.
func diskBytes(capacity int64) int64 { return (capacity + 511) &^ 511 }

// Capacity accounting. Every volume's guest sees its whole claim, so one
// guest can write until the home filesystem is full, and then every box
// on the node gets ENOSPC (and bases still linked cannot be evicted to make
// room). So the space a claim may still write is held for it: a volume
// fits when its claim, plus what every other volume may still write, is
// within the free space times --overprovision-ratio. At the default ratio
// of 1 a guest that fills its disk never makes another box's write fail.
//
// What a volume may still write is its claim, plus the qcow2 metadata a
// full overlay needs, less what its overlay has allocated so far. The
// allocation is fstat'ed on the overlay, opened beneath the box root like
// every file a pod can write; a pod can only make its own figure larger
// (by allocating), which uses real space and so is counted right.

// overlayOverhead is the qcow2 metadata of a fully written overlay of
// size bytes, rounded up: an 8-byte L2 entry and a 2-byte refcount per
// 64 KiB cluster, plus the header, L1 and refcount table clusters.
func overlayOverhead(size int64) int64 {
	return size/8192 + size/32768 + 1<<20
}

// promise is what a volume whose disk is size bytes may write, in all.
func promise(size int64) int64 { return size + overlayOverhead(size) }

// volumeDiskSize is the disk size a volume's record promises: its claim
// (as created, or as expanded since), or the base's size for a volume
// created without one.
func (d *Driver) volumeDiskSize(r *volumeRecord) int64 {
	size := max(r.Capacity, r.ExpandedBytes)
	if size > 0 {
		return size
	}
	if st, err := os.Stat(filepath.Join(d.ownedBaseDir(r.VolumeID), baseName)); err == nil {
		return st.Size()
	}
	return rootfs.DefaultMinSize
}

// outstandingBytes is what the node's volumes may still write, except the
// volume skip (one being expanded, whose new figure the caller adds).
func (d *Driver) outstandingBytes(skip string) (int64, error) {
	ents, err := os.ReadDir(d.recordsDir())
	if err != nil {
		return 0, fmt.Errorf("list the volume records in %s: %w", d.recordsDir(), err)
	}
	var total int64
	for _, e := range ents {
		id, ok := recordID(e.Name())
		if !ok || id == skip || !e.Type().IsRegular() {
			continue
		}
		r, err := d.readRecordOnly(id)
		if err != nil {
			// A record that cannot be read is still a volume that may
			// write; without its claim, assume the base's size.
			klog.Background().Error(err, "Counting a volume whose record is unreadable at the smallest base size", "volume", id)
			r = &volumeRecord{VolumeID: id}
		}
		// Sizes are bounded by capacityFor, but a record is a file: clamp
		// what one may add, so no sum can wrap.
		total += min(max(promise(min(d.volumeDiskSize(r), int64(qcow2.MaxVirtualSize)))-allocatedBytes(d.home, id), 0), 1<<56)
	}
	return total, nil
}

// allocatedBytes is what a volume's overlay occupies on disk; 0 when it
// has none yet (never staged) or it cannot be looked at. It is fstat'ed
// through an O_PATH descriptor: that opens nothing for I/O, so it neither
// breaks nor waits on the write lease ExpandBox holds, and a FIFO or
// device a pod put there is not opened.
func allocatedBytes(home layout.Home, id string) int64 {
	box, err := home.Box(id)
	if err != nil {
		return 0
	}
	root, err := safeopen.OpenRoot(box.Root())
	if err != nil {
		return 0
	}
	defer root.Close()
	rel, err := filepath.Rel(box.Root(), box.GuestRootfsDiskPath())
	if err != nil {
		return 0
	}
	st, err := root.Lstat(rel)
	if err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return 0
	}
	return st.Blocks * 512
}

// ratio is the configured overprovision ratio; 0 means 1.
func (d *Driver) ratio() float64 {
	if d.cfg.OverprovisionRatio == 0 {
		return 1
	}
	return d.cfg.OverprovisionRatio
}

// availableBytes is what a new claim may still promise: the free space
// times the overprovision ratio, less what the volumes (but skip) may
// still write. It can be negative once the volumes have written more than
// was free when they were promised it (at a ratio above 1).
func (d *Driver) availableBytes(skip string) (available, free, outstanding int64, err error) {
	if free, err = d.freeBytes(); err != nil {
		return 0, 0, 0, err
	}
	if outstanding, err = d.outstandingBytes(skip); err != nil {
		return 0, 0, 0, err
	}
	return int64(float64(free)*d.ratio()) - outstanding, free, outstanding, nil
}

// reserveCapacity refuses with ResourceExhausted a volume (id) whose disk
// of size bytes does not fit beside the others. The caller holds
// d.capacityMu until the claim is recorded, so two calls cannot both take
// the last of the space.
func (d *Driver) reserveCapacity(id string, size int64) error {
	if size == 0 {
		size = rootfs.DefaultMinSize
	}
	available, free, outstanding, err := d.availableBytes(id)
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	if need := promise(size) - allocatedBytes(d.home, id); need > available {
		return status.Errorf(codes.ResourceExhausted,
			"volume %s needs %d bytes for a %d-byte disk, which exceeds the %d bytes available on %s: %d bytes free after a reserve of %d, times --overprovision-ratio=%g, less %d bytes the node's other volumes may still write into their claims",
			id, need, size, max(available, 0), d.home.Dir(), free, d.cfg.CapacityReserve, d.ratio(), outstanding)
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
