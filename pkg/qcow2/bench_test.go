package qcow2

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/boxlite-csi/boxlite-csi/internal/scratch"
)

// BenchmarkCreateOverlay compares, in one run, our durable and non-durable
// overlay creation with the cost floor (create a file, write 512 bytes,
// optionally fsync) and with `qemu-img create` as a subprocess.
//
// With root it runs on a fresh ext4 (with a journal) on a loop device:
// the machines' root filesystem gets slower after many create/delete cycles,
// which would make runs incomparable. Set BOXLITE_BENCH_DIR to choose a
// directory instead.
func BenchmarkCreateOverlay(b *testing.B) {
	dir := scratch.Dir(b)
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 4096), 0o644); err != nil {
		b.Fatal(err)
	}
	const size = 1 << 30

	for _, fsync := range []bool{true, false} {
		b.Run(fmt.Sprintf("writer=boxlite/fsync=%v", fsync), func(b *testing.B) {
			run := benchRun(b, dir)
			opts := OverlayOptions{BackingFile: "../base.raw", BackingFormat: FormatRaw, Size: size, NoSync: !fsync}
			for i := 0; b.Loop(); i++ {
				if err := CreateOverlay(context.Background(), filepath.Join(run, strconv.Itoa(i)), opts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	for _, fsync := range []bool{true, false} {
		b.Run(fmt.Sprintf("writer=floor/fsync=%v", fsync), func(b *testing.B) {
			run := benchRun(b, dir)
			buf := make([]byte, 512)
			for i := 0; b.Loop(); i++ {
				f, err := os.OpenFile(filepath.Join(run, strconv.Itoa(i)), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := f.Write(buf); err != nil {
					b.Fatal(err)
				}
				if fsync {
					if err := f.Sync(); err != nil {
						b.Fatal(err)
					}
				}
				f.Close()
			}
		})
	}
	// qemu-img fdatasyncs the image it creates, so it belongs with fsync=true.
	b.Run("writer=qemu-img/fsync=true", func(b *testing.B) {
		qemuImg, err := exec.LookPath("qemu-img")
		if err != nil {
			b.Skip("qemu-img not installed (apt-get install qemu-utils): no peer to compare with")
		}
		run := benchRun(b, dir)
		for i := 0; b.Loop(); i++ {
			out, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "../base.raw",
				filepath.Join(run, strconv.Itoa(i)), strconv.Itoa(size)).CombinedOutput()
			if err != nil {
				b.Fatalf("qemu-img create: %v: %s", err, out)
			}
		}
	})
}

// benchRun gives one benchmark invocation its own directory, removed after
// timing so file counts do not carry over between runs.
func benchRun(b *testing.B, dir string) string {
	run, err := os.MkdirTemp(dir, "run-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(run) })
	return run
}

// BenchmarkCreateOverlayWrites measures what writing data clusters adds to
// creating an overlay: a 20 GiB overlay holding 30 random 4 KiB blocks,
// 15 near the start (inside the backing, so the rest of their clusters is
// read from it) and 15 near the end (past it), against the empty 20 GiB
// overlay, durable and not. The backing is a 16 MiB file of random bytes,
// read through an *os.File as the plugin reads its base.
func BenchmarkCreateOverlayWrites(b *testing.B) {
	dir := scratch.Dir(b)
	const size, backingLen = 20 << 30, 16 << 20
	basePath := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(basePath, randomBytes(1, backingLen), 0o644); err != nil {
		b.Fatal(err)
	}
	base, err := os.Open(basePath)
	if err != nil {
		b.Fatal(err)
	}
	defer base.Close()
	var writes []Write
	for i := range uint64(15) {
		writes = append(writes, block(i*3*sparseBlock), block(size-(i+1)*3*sparseBlock))
	}
	for _, n := range []int{0, len(writes)} {
		for _, fsync := range []bool{true, false} {
			b.Run(fmt.Sprintf("writes=%d/fsync=%v", n, fsync), func(b *testing.B) {
				run := benchRun(b, dir)
				opts := OverlayOptions{BackingFile: "../base.raw", BackingFormat: FormatRaw, Size: size, NoSync: !fsync,
					Writes: writes[:n], Backing: base, BackingSize: backingLen}
				for i := 0; b.Loop(); i++ {
					if err := CreateOverlay(context.Background(), filepath.Join(run, strconv.Itoa(i)), opts); err != nil {
						b.Fatal(err)
					}
					// Thousands of overlays of about 300 KiB each would fill
					// the 2 GiB scratch filesystem and, without fsync, make
					// the kernel throttle the writer on dirty pages: that
					// would be measured instead of the writer. So they are
					// removed in batches, off the clock.
					if i%256 == 255 {
						b.StopTimer()
						removeBatch(b, run, i-255, i)
						b.StartTimer()
					}
				}
			})
		}
	}
}

// removeBatch removes the files named first to last in dir.
func removeBatch(b *testing.B, dir string, first, last int) {
	for j := first; j <= last; j++ {
		if err := os.Remove(filepath.Join(dir, strconv.Itoa(j))); err != nil {
			b.Fatal(err)
		}
	}
}
