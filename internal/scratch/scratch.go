// Package scratch gives benchmarks a fresh ext4 filesystem (with a
// journal) on a loop device. The machines' root filesystem gets slower
// after many create/delete cycles, which makes runs incomparable; a new
// filesystem per run does not.
package scratch

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Dir returns a directory on a fresh 2 GiB ext4 mounted from a loop
// device, unmounted when tb ends. BOXLITE_BENCH_DIR overrides it; without
// root (or mkfs.ext4) it falls back to a temp directory and says so.
func Dir(tb testing.TB) string {
	tb.Helper()
	if d := os.Getenv("BOXLITE_BENCH_DIR"); d != "" {
		return d
	}
	dir := tb.TempDir()
	if os.Geteuid() != 0 {
		tb.Log("not root: benchmarking on the temp directory's filesystem; numbers are noisier than on a scratch ext4")
		return dir
	}
	img := filepath.Join(dir, "scratch.ext4")
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		tb.Fatal(err)
	}
	f, err := os.Create(img)
	if err != nil {
		tb.Fatal(err)
	}
	if err := f.Truncate(2 << 30); err != nil {
		tb.Fatal(err)
	}
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		tb.Logf("mkfs.ext4 failed (%v: %s): benchmarking on the temp directory's filesystem", err, out)
		return dir
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		tb.Logf("loop mount failed (%v: %s): benchmarking on the temp directory's filesystem", err, out)
		return dir
	}
	tb.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			tb.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	tb.Logf("benchmarking on a scratch ext4 (journal) at %s on a loop device", mnt)
	return mnt
}
