package ext4

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"os"
	"syscall"
)

// Fixed geometry. 4 KiB blocks make one bitmap block cover exactly one
// 32768-block group, which keeps every per-group computation simple.
const (
	blockSize      = 4096
	blocksPerGroup = 8 * blockSize
	inodeSize      = 256
	inodesPerBlock = blockSize / inodeSize
	descSize       = 64 // 64bit feature: full-width block numbers and bitmap checksums
	descsPerBlock  = blockSize / descSize

	// goodOldInodeSize is the classic inode; the rest of the 256 bytes holds
	// the extra fields (nanosecond times, checksum high half) and in-inode
	// extended attributes.
	goodOldInodeSize = 128
	extraIsize       = 32

	// maxExtentLen is the longest initialized extent ext4 can describe.
	maxExtentLen = 32768

	rootIno      = 2
	journalIno   = 8
	firstIno     = 11 // first non-reserved inode; lost+found by convention
	lostFoundIno = 11

	logGroupsPerFlex = 4 // mke2fs default; only steers the guest's allocator
)

// isBackupGroup reports whether group g holds a copy of the superblock and
// group descriptors under sparse_super: groups 0, 1 and powers of 3, 5, 7.
func isBackupGroup(g uint64) bool {
	if g <= 1 {
		return true
	}
	for _, base := range [...]uint64{3, 5, 7} {
		n := base
		for n < g {
			n *= base
		}
		if n == g {
			return true
		}
	}
	return false
}

// cursor hands out blocks strictly in ascending order. It never returns a
// block inside a backup area (the first skip blocks of a backup group), so
// the superblock and descriptor copies written by Finish cannot collide with
// data that was streamed before the final group count was known.
type cursor struct {
	next uint64 // first block not yet handed out
	skip uint64 // 1 (superblock) + reserved descriptor blocks
}

// take returns a run of at most want contiguous blocks (want > 0). The run
// is shorter than want only when it would otherwise enter a backup area.
func (c *cursor) take(want uint64) (start, n uint64) {
	g := c.next / blocksPerGroup
	if isBackupGroup(g) && c.next%blocksPerGroup < c.skip {
		c.next = g*blocksPerGroup + c.skip
	}
	start = c.next
	end := start + want
	for h := g + 1; h*blocksPerGroup < end; h++ {
		if isBackupGroup(h) {
			end = h * blocksPerGroup
			break
		}
	}
	c.next = end
	return start, end - start
}

// takeContig returns exactly n contiguous blocks; n must fit in a group
// minus its backup area. Blocks passed over stay free.
func (c *cursor) takeContig(n uint64) uint64 {
	start, got := c.take(n)
	if got < n {
		start, _ = c.take(n) // now right after a backup area: a whole group ahead
	}
	return start
}

// takeExtents allocates n blocks as extents for logical blocks 0..n-1.
func (c *cursor) takeExtents(n uint64) []extent {
	var exts []extent
	for logical := uint64(0); logical < n; {
		start, got := c.take(min(n-logical, maxExtentLen))
		exts = append(exts, extent{logical: uint32(logical), start: start, length: uint16(got)})
		logical += got
	}
	return exts
}

// bitmap is a growable set of block numbers.
type bitmap []uint64

func (b *bitmap) setRange(start, n uint64, v bool) {
	end := start + n
	if need := (end + 63) / 64; uint64(len(*b)) < need {
		if uint64(cap(*b)) >= need {
			*b = (*b)[:need]
		} else {
			grown := make(bitmap, need, need+need/2)
			copy(grown, *b)
			*b = grown
		}
	}
	w := *b
	for i := start; i < end; {
		if i%64 == 0 && end-i >= 64 {
			if v {
				w[i/64] = ^uint64(0)
			} else {
				w[i/64] = 0
			}
			i += 64
			continue
		}
		if v {
			w[i/64] |= 1 << (i % 64)
		} else {
			w[i/64] &^= 1 << (i % 64)
		}
		i++
	}
}

// blockWriter coalesces writes to consecutive blocks into large pwrite calls.
// Allocation is sequential, so small files written one after another end up
// in one syscall.
type blockWriter struct {
	f     *os.File
	buf   []byte // pending whole blocks
	start uint64 // block number of buf[0]
}

func newBlockWriter(f *os.File, size int) blockWriter {
	return blockWriter{f: f, buf: make([]byte, 0, size)}
}

// write queues p (a whole number of blocks) for block blk onwards.
func (w *blockWriter) write(blk uint64, p []byte) error {
	pendingEnd := w.start + uint64(len(w.buf))/blockSize
	if len(w.buf) > 0 && (blk != pendingEnd || len(w.buf)+len(p) > cap(w.buf)) {
		if err := w.flush(); err != nil {
			return err
		}
	}
	if len(w.buf) == 0 {
		if len(p) >= cap(w.buf) {
			return w.writeAt(blk, p)
		}
		w.start = blk
	}
	w.buf = append(w.buf, p...)
	return nil
}

// writeSparse is write for regions known to read as zeros so far: all-zero
// blocks are skipped and stay holes.
func (w *blockWriter) writeSparse(blk uint64, p []byte) error {
	for i := 0; i < len(p); {
		if isZero(p[i : i+blockSize]) {
			i += blockSize
			continue
		}
		j := i + blockSize
		for j < len(p) && !isZero(p[j:j+blockSize]) {
			j += blockSize
		}
		if err := w.write(blk+uint64(i/blockSize), p[i:j]); err != nil {
			return err
		}
		i = j
	}
	return nil
}

func (w *blockWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.writeAt(w.start, w.buf)
	w.buf = w.buf[:0]
	return err
}

func (w *blockWriter) writeAt(blk uint64, p []byte) error {
	if _, err := w.f.WriteAt(p, int64(blk)*blockSize); err != nil {
		return fmt.Errorf("ext4: writing block %d: %w", blk, err)
	}
	return nil
}

// punchHole deallocates blocks of the image file. Filesystems without hole
// punching get zeros written instead, so freed data still never leaks into
// the image.
func punchHole(f *os.File, start, n uint64) error {
	const punchHoleKeepSize = 0x2 | 0x1 // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
	off, length := int64(start)*blockSize, int64(n)*blockSize
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("ext4: punching hole: %w", err)
	}
	ctlErr := rc.Control(func(fd uintptr) { err = syscall.Fallocate(int(fd), punchHoleKeepSize, off, length) })
	if err = cmp.Or(ctlErr, err); err == nil {
		return nil
	}
	if !errors.Is(err, syscall.EOPNOTSUPP) && !errors.Is(err, syscall.ENOSYS) {
		return fmt.Errorf("ext4: punching hole at block %d: %w", start, err)
	}
	zeros := make([]byte, min(length, 1<<20))
	for length > 0 {
		k := min(length, int64(len(zeros)))
		if _, err := f.WriteAt(zeros[:k], off); err != nil {
			return fmt.Errorf("ext4: zeroing freed block %d: %w", start, err)
		}
		off += k
		length -= k
	}
	return nil
}

// isZero reports whether p holds only zero bytes. Comparing p with itself
// shifted by one byte needs no zero buffer and still runs on the vectorized
// memequal: every byte equals its predecessor and the first one is zero.
func isZero(p []byte) bool {
	return len(p) == 0 || p[0] == 0 && bytes.Equal(p[1:], p[:len(p)-1])
}

func ceilDiv(a, b uint64) uint64 { return (a + b - 1) / b }
