package ext4

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"os"
	"syscall"
)

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

// writeSparse is write for regions that still read as zeros. It skips
// all-zero blocks, which stay holes.
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

// punchHole deallocates blocks of the image file. On filesystems that
// cannot punch holes it writes zeros instead, so freed data still never
// leaks into the image.
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

// isZero reports whether p holds only zero bytes. It compares p with itself
// shifted by one byte, which needs no buffer of zeros and still runs on the
// vectorized memequal. The bytes are all zero when each one equals its
// predecessor and the first one is zero.
func isZero(p []byte) bool {
	return len(p) == 0 || p[0] == 0 && bytes.Equal(p[1:], p[:len(p)-1])
}
