package qcow2

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
)

// Write is one guest-visible write that CreateOverlay stores in a new
// overlay: Data at byte Offset of the virtual disk.
type Write struct {
	Offset uint64
	Data   []byte
}

// sparseBlock is the granularity of holes: a 4 KiB piece of the file that
// would be all zeros is not written. 4 KiB is the block size of the
// filesystems overlays live on, so a smaller piece could not stay a hole.
const sparseBlock = 4096

// validateWrites checks Writes, Backing and BackingSize. Only what it
// accepts reaches layout, which relies on every write ending within Size.
func (o *OverlayOptions) validateWrites() error {
	if o.BackingSize < 0 {
		return fmt.Errorf("%w: backing size %d is negative", ErrInvalidOption, o.BackingSize)
	}
	if len(o.Writes) == 0 {
		return nil
	}
	if o.Backing == nil {
		// Without the backing's bytes the rest of each written cluster
		// would read as zeros, silently replacing what the base holds there.
		return fmt.Errorf("%w: %d writes but no Backing to fill the rest of their clusters from", ErrInvalidOption, len(o.Writes))
	}
	for i, w := range o.Writes {
		if w.Offset > o.Size || uint64(len(w.Data)) > o.Size-w.Offset {
			return fmt.Errorf("%w: write %d (%d bytes at offset %d) ends past the virtual size %d", ErrInvalidOption, i, len(w.Data), w.Offset, o.Size)
		}
	}
	return nil
}

// piece is the part of one write that falls in one guest cluster.
type piece struct {
	guest  uint64 // guest cluster index
	write  int    // index in Writes: later writes are applied later
	lo, hi int    // byte range within the cluster
	data   []byte // the bytes for [lo, hi)
}

// dataCluster is one guest cluster that writes touch, with the pieces of
// them that fall in it, in the order of Writes.
type dataCluster struct {
	guest  uint64
	pieces []piece
}

// planData splits the writes at cluster boundaries and groups the pieces
// by guest cluster, in guest order. Zero-length writes touch nothing.
func planData(writes []Write) []dataCluster {
	var pieces []piece
	for i, w := range writes {
		for off, rest := w.Offset, w.Data; len(rest) > 0; {
			in := int(off % ClusterSize)
			n := min(len(rest), ClusterSize-in)
			pieces = append(pieces, piece{guest: off / ClusterSize, write: i, lo: in, hi: in + n, data: rest[:n]})
			off, rest = off+uint64(n), rest[n:]
		}
	}
	slices.SortFunc(pieces, func(a, b piece) int {
		return cmp.Or(cmp.Compare(a.guest, b.guest), cmp.Compare(a.write, b.write))
	})
	var out []dataCluster
	for i := 0; i < len(pieces); {
		j := i + 1
		for j < len(pieces) && pieces[j].guest == pieces[i].guest {
			j++
		}
		out = append(out, dataCluster{guest: pieces[i].guest, pieces: pieces[i:j:j]})
		i = j
	}
	return out
}

// fill sets buf (one cluster) to what the guest reads from the cluster
// once the writes are made: the backing's bytes where no write covers
// them, zeros past the backing and past the virtual size size, and the
// writes applied in order on top.
func (dc *dataCluster) fill(buf []byte, opts *OverlayOptions, size uint64) error {
	clear(buf)
	lo, hi := dc.uncovered()
	base := dc.guest * ClusterSize
	// Bytes past the virtual size are never read by a guest, so nothing is
	// read from the backing for them either.
	if limit := min(uint64(opts.BackingSize), size); base+uint64(hi) > limit {
		hi = int(max(limit, base) - base)
	}
	if lo < hi {
		n, err := opts.Backing.ReadAt(buf[lo:hi], int64(base)+int64(lo))
		if n < hi-lo {
			if err == nil || errors.Is(err, io.EOF) {
				err = fmt.Errorf("backing is shorter than its stated size %d: %w", opts.BackingSize, io.ErrUnexpectedEOF)
			}
			return fmt.Errorf("read %d backing bytes at %d: %w", hi-lo, base+uint64(lo), err)
		}
	}
	for _, p := range dc.pieces {
		copy(buf[p.lo:p.hi], p.data)
	}
	return nil
}

// uncovered returns the span [lo, hi) of the cluster from the first byte
// no write covers to the last, or an empty span when the writes cover all
// of it. The backing is read for the whole span in one call; the written
// bytes inside it are read needlessly and then overwritten.
func (dc *dataCluster) uncovered() (lo, hi int) {
	spans := make([][2]int, len(dc.pieces))
	for i, p := range dc.pieces {
		spans[i] = [2]int{p.lo, p.hi}
	}
	slices.SortFunc(spans, func(a, b [2]int) int { return cmp.Compare(a[0], b[0]) })
	// Merge the spans into disjoint runs, separated by uncovered gaps.
	runs := spans[:1]
	for _, s := range spans[1:] {
		if last := &runs[len(runs)-1]; s[0] <= last[1] {
			last[1] = max(last[1], s[1])
		} else {
			runs = append(runs, s)
		}
	}
	first, last := runs[0], runs[len(runs)-1]
	lo, hi = 0, ClusterSize
	if first[0] == 0 {
		lo = first[1]
	}
	if last[1] == ClusterSize {
		hi = last[0]
	}
	if lo >= hi {
		return 0, 0
	}
	return lo, hi
}

var zeroBlock [sparseBlock]byte

// writeSparse writes b at offset off of f, a new file, except for the
// 4 KiB pieces (aligned in the file) that are all zeros: the file is new,
// so every piece skipped is a hole that reads as zeros. Each run of
// nonzero pieces is written with one call.
func writeSparse(f *os.File, b []byte, off int64) error {
	start := -1 // where the current run of nonzero pieces began in b
	for i := 0; i < len(b); {
		n := min(len(b)-i, sparseBlock-int((off+int64(i))%sparseBlock))
		if zero := bytes.Equal(b[i:i+n], zeroBlock[:n]); !zero && start < 0 {
			start = i
		} else if zero && start >= 0 {
			if _, err := f.WriteAt(b[start:i], off+int64(start)); err != nil {
				return err
			}
			start = -1
		}
		i += n
	}
	if start >= 0 {
		if _, err := f.WriteAt(b[start:], off+int64(start)); err != nil {
			return err
		}
	}
	return nil
}
