package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// ErrShrink marks a request to make an image smaller. Shrinking would cut
// off the guest's data past the new end, and nothing has shrunk the
// filesystem inside first, so it is always refused.
var ErrShrink = errors.New("shrinking a qcow2 image is refused")

// ErrGrowNeedsL1Move marks a growth that the image's L1 table has no room
// for in place. Making room means allocating clusters, copying the table
// there and updating the refcounts, which GrowFile does not do while a
// guest may be using the image.
var ErrGrowNeedsL1Move = errors.New("moving the L1 table is not supported online")

// growFields is the part of the header GrowFile writes: size (8 bytes at
// 24), crypt_method (4 bytes at 32) and l1_size (4 bytes at 36). The two
// fields that change are 12 bytes apart, so one write covers both and the
// unchanged crypt_method between them.
const (
	growFieldsOff = offSize
	growFieldsLen = offL1TableOffset - offSize
)

// GrowResult is what GrowFile found and did.
type GrowResult struct {
	// OldSize is the virtual size the header had, and NewSize the one it
	// has now. They are equal when nothing was written.
	OldSize, NewSize uint64
	// Changed is true when the header was rewritten.
	Changed bool
}

// GrowFile raises the virtual size of the qcow2 image open read-write as f
// to newSize bytes, rounded up to a multiple of 512 as qemu-img does. A
// newSize that rounds to the current size writes nothing, so a retried
// call succeeds with Changed false. A smaller one is refused with
// ErrShrink.
//
// The file is one a guest can write, header included, so GrowFile trusts
// only what VerifyFile has checked (it must be an overlay on want), and
// every other read is bounded by that. It then changes only two header
// fields, size and l1_size, in one 16-byte write inside the first sector,
// and syncs: after a crash the header is the old one or the new one. No
// cluster is allocated, so the refcounts stay right.
//
// That works only when the new L1 entries fit in the clusters the L1
// table already occupies (one 64 KiB cluster maps 4 TiB) and those bytes
// are zeros, as every writer leaves them. When they do not fit, the error
// wraps ErrGrowNeedsL1Move and names the largest size that does. Nonzero
// bytes there would become L1 entries pointing at whatever someone wrote,
// so they are reported as a *TamperedError. Images with internal
// snapshots or autoclear feature bits are refused, as a resize by QEMU
// would have to update them too.
//
// A program that has the image open (a running QEMU) keeps its own copy
// of the header: it sees the new size only once told or reopened.
//
// On error nothing was written, unless the write or the sync itself
// failed (an *IOError). OldSize is set once the header has been read.
func GrowFile(f *os.File, want Expect, newSize uint64) (GrowResult, error) {
	path := f.Name()
	fail := func(res GrowResult, err error) (GrowResult, error) {
		return res, fmt.Errorf("grow qcow2 image %s to %d bytes: %w", path, newSize, err)
	}
	if newSize > MaxVirtualSize {
		return fail(GrowResult{}, fmt.Errorf("%w: virtual size %d exceeds the maximum %d", ErrInvalidOption, newSize, MaxVirtualSize))
	}
	// MaxVirtualSize is a multiple of 512, so rounding cannot pass it.
	size := (newSize + 511) &^ 511

	h, err := VerifyFile(f, want)
	if err != nil {
		return fail(GrowResult{}, err)
	}
	res := GrowResult{OldSize: h.Size, NewSize: h.Size}
	switch {
	case size < h.Size:
		return fail(res, fmt.Errorf("the image is %d bytes, and %w", h.Size, ErrShrink))
	case size == h.Size:
		return res, nil
	case h.NbSnapshots != 0:
		// Each snapshot records its own size and L1 table. QEMU refuses to
		// resize such an image, and so does this.
		return fail(res, fmt.Errorf("the image has %d internal snapshots, which QEMU does not resize", h.NbSnapshots))
	case h.AutoclearFeatures != 0:
		// The spec lets a program that does not know an autoclear feature
		// write the image only after clearing its bit. Persistent dirty
		// bitmaps, the usual one, are sized for the old disk.
		return fail(res, fmt.Errorf("the image has autoclear feature bits %#x (persistent bitmaps, for example), which growing would leave stale", h.AutoclearFeatures))
	}
	if err := checkReadWrite(f); err != nil {
		return fail(res, err)
	}
	l1Size, err := growL1(f, h, size)
	if err != nil {
		return fail(res, err)
	}

	var b [growFieldsLen]byte
	be := binary.BigEndian
	be.PutUint64(b[offSize-growFieldsOff:], size)
	// crypt_method lies between the two fields. VerifyFile has just read
	// it and checked it is 0, so writing it back changes nothing.
	be.PutUint32(b[offCryptMethod-growFieldsOff:], h.CryptMethod)
	be.PutUint32(b[offL1Size-growFieldsOff:], l1Size)
	if _, err := f.WriteAt(b[:], growFieldsOff); err != nil {
		return fail(res, &IOError{Path: path, Op: "write", Err: err})
	}
	if err := f.Sync(); err != nil {
		return fail(res, &IOError{Path: path, Op: "fsync", Err: err})
	}
	return GrowResult{OldSize: h.Size, NewSize: size, Changed: true}, nil
}

// checkReadWrite refuses a descriptor GrowFile could not write where it
// means to. A read-only one would fail only after every check, and on one
// opened with O_APPEND Linux ignores the offset of pwrite and appends the
// header fields to the end of the file.
func checkReadWrite(f *os.File) error {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return &IOError{Path: f.Name(), Op: "stat", Err: err}
	}
	if fl&unix.O_ACCMODE != unix.O_RDWR {
		return fmt.Errorf("%s is not open for reading and writing", f.Name())
	}
	if fl&unix.O_APPEND != 0 {
		return fmt.Errorf("%s is open with O_APPEND, so a write would land at its end", f.Name())
	}
	return nil
}

// l1EntryBytes is how many guest bytes one L1 entry maps. An L2 table is
// one cluster of entries, which are 16 bytes with extended L2 entries
// (incompatible feature bit 4) and 8 bytes otherwise.
func l1EntryBytes(h *Header) uint64 {
	shift := 2*h.ClusterBits - 3
	if h.IncompatibleFeatures&IncompatExtendedL2 != 0 {
		shift--
	}
	return 1 << shift
}

// growL1 returns the l1_size an image of size bytes needs, once it has
// checked that the table can be extended to it in place: the new entries
// lie in the clusters the table already occupies and inside the file, clear
// of the refcount table, and read as zeros, so each of them says
// "unallocated". The header h was verified against f, so the old table
// ends inside the file; only the new entries are read, at most one cluster.
func growL1(f *os.File, h *Header, size uint64) (uint32, error) {
	perEntry := l1EntryBytes(h)
	need := (size + perEntry - 1) / perEntry
	if need > MaxL1Entries {
		// Only small clusters get here: with 64 KiB ones MaxVirtualSize
		// needs exactly MaxL1Entries.
		return 0, fmt.Errorf("%w: %d bytes need %d L1 entries with %d-byte clusters, and QEMU opens at most %d", ErrInvalidOption, size, need, h.ClusterSize(), MaxL1Entries)
	}
	if need <= uint64(h.L1Size) {
		// QEMU's own resize leaves a larger table as it is, and so does
		// this; l1_size is never reduced.
		return h.L1Size, nil
	}

	path := f.Name()
	cluster := h.ClusterSize()
	fileSize, err := regularSize(f)
	if err != nil {
		return 0, err
	}
	// The parser checked that the table ends inside the file, so neither
	// sum can wrap.
	start := h.L1TableOffset + uint64(h.L1Size)*l1EntrySize
	if uint64(fileSize) < start {
		return 0, &IOError{Path: path, Op: "read", Err: fmt.Errorf("the file shrank to %d bytes, inside its L1 table: %w", fileSize, io.ErrUnexpectedEOF)}
	}
	room := (start + cluster - 1) &^ (cluster - 1)
	limit, where := room, fmt.Sprintf("the L1 table's last cluster ends at %#x", room)
	if uint64(fileSize) < room {
		// Extending the file would be a second write, and a table that
		// ran past the end of the file would be refused as corrupt by the
		// next ReadHeader.
		limit, where = uint64(fileSize), fmt.Sprintf("the file ends at %#x, inside the L1 table's last cluster", fileSize)
	}
	end := h.L1TableOffset + need*l1EntrySize
	if end > limit {
		// fit < need <= MaxL1Entries, so the product cannot wrap.
		fit := (limit - h.L1TableOffset) / l1EntrySize
		largest := min(fit*perEntry, MaxVirtualSize)
		return 0, fmt.Errorf("%w: %d bytes need %d L1 entries, and only %d fit at %#x (%s); the largest size that fits in place is %d bytes",
			ErrGrowNeedsL1Move, size, need, fit, h.L1TableOffset, where, largest)
	}

	// QEMU never lets the two overlap, and it marks an image corrupt when
	// a write would make them. A refcount table entry that is zero now
	// becomes an L1 entry the moment QEMU adds a refcount block.
	rtStart := h.RefcountTableOffset
	rtEnd := rtStart + uint64(h.RefcountTableClusters)*cluster
	if start < rtEnd && rtStart < end {
		return 0, &TamperedError{Path: path, Field: "L1 table offset",
			Got:  fmt.Sprintf("%#x, whose %d entries would overlap the refcount table at %#x", h.L1TableOffset, need, rtStart),
			Want: "an L1 table clear of the refcount table"}
	}

	p := &headerParser{path: path, r: f, fileSize: fileSize}
	buf := make([]byte, min(end-start, l1ProbeChunk))
	for off := start; off < end; {
		b := buf[:min(uint64(len(buf)), end-off)]
		if err := p.readAt(b, int64(off)); err != nil {
			return 0, err
		}
		for i, c := range b {
			if c != 0 {
				return 0, &TamperedError{Path: path, Field: "unused space after the L1 table",
					Got:  fmt.Sprintf("byte 0x%02x at offset %#x", c, off+uint64(i)),
					Want: "zeros"}
			}
		}
		off += uint64(len(b))
	}
	// need is at most MaxL1Entries, which fits in 32 bits.
	return uint32(need), nil
}
