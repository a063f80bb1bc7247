package rootfs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
)

// realBase builds a real ext4 base of the busybox test image in a fresh
// cache, as the driver does.
func realBase(t testing.TB) (*Cache, Base) {
	t.Helper()
	return realBaseIn(t, t.TempDir())
}

// realBaseIn is realBase with the cache's home at home.
func realBaseIn(t testing.TB, home string) (*Cache, Base) {
	t.Helper()
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "busybox:1", testimage.Busybox(t))
	img, err := resolve(t, context.Background(), reg.Ref("busybox:1"))
	if err != nil {
		t.Fatal(err)
	}
	c := newCache(t, home)
	base, err := c.Ensure(context.Background(), Key{Digest: img.Digest.String(), Builder: Ext4BuilderVersion}, buildFrom(t, reg.Ref("busybox:1"), nil))
	if err != nil {
		t.Fatal(err)
	}
	return c, base
}

// dumpe2fsHeader returns the superblock fields dumpe2fs -h prints.
func dumpe2fsHeader(t testing.TB, img string) map[string]string {
	t.Helper()
	out, err := exec.Command(needTool(t, "dumpe2fs"), "-h", img).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs -h %s: %v\n%s", img, err, out)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return m
}

func headerUint(t testing.TB, h map[string]string, k string) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(h[k], 10, 64)
	if err != nil {
		t.Fatalf("dumpe2fs field %q = %q: %v", k, h[k], err)
	}
	return n
}

// TestBoxFilesystemIsClaimSize is the claim-size check: a box of each size
// over a real base holds a clean filesystem of (nearly) that size with
// the image's files intact, at a cost of a few metadata clusters.
func TestBoxFilesystemIsClaimSize(t *testing.T) {
	needQemuTool(t, "qemu-img")
	e2fsck, debugfs := needTool(t, "e2fsck"), needTool(t, "debugfs")
	c, base := realBase(t)
	busybox, err := exec.Command(debugfs, "-R", "cat /bin/busybox", base.Path).Output()
	if err != nil || len(busybox) < 100<<10 {
		t.Fatalf("debugfs cat /bin/busybox from the base: %d bytes, %v", len(busybox), err)
	}
	const gib = 1 << 30
	for _, tc := range []struct {
		size      uint64
		maxBlocks int64 // the overlay's allocation, in bytes
	}{
		{1 * gib, 256 << 10},
		{3 * gib, 256 << 10},
		{20 * gib, 256 << 10},
		{100 * gib, 2 << 20},
	} {
		t.Run(fmt.Sprintf("%dGiB", tc.size/gib), func(t *testing.T) {
			box := testBox(t, c, fmt.Sprintf("grow-%d", tc.size/gib))
			var planned DiskPlan
			d, err := PrepareBoxWith(context.Background(), box, fixed(base), tc.size, PrepareOptions{
				BeforeCreate: func(_ context.Context, p DiskPlan) error {
					if _, err := os.Lstat(box.GuestRootfsDiskPath()); err == nil {
						t.Errorf("BeforeCreate ran after the overlay was written")
					}
					planned = p
					return nil
				},
			})
			if err != nil || d.Outcome != Created {
				t.Fatalf("prepare: %+v, %v", d, err)
			}
			if planned.FilesystemSize != d.FilesystemSize || planned.VirtualSize != d.VirtualSize || planned.NotGrown != "" {
				t.Errorf("BeforeCreate saw %+v, the box got %+v", planned, d)
			}
			if d.VirtualSize != tc.size || d.FilesystemSize < tc.size/100*95 || d.FilesystemSize > tc.size {
				t.Errorf("disk %d bytes, filesystem %d bytes; want a %d-byte disk and at least 95%% of it", d.VirtualSize, d.FilesystemSize, tc.size)
			}
			st, err := os.Stat(d.Overlay)
			if err != nil {
				t.Fatal(err)
			}
			alloc := st.Sys().(*syscall.Stat_t).Blocks * 512
			t.Logf("overlay: %d bytes long, %d bytes allocated, %d metadata blocks written; filesystem %d bytes",
				st.Size(), alloc, len(planned.Writes), d.FilesystemSize)
			if alloc > tc.maxBlocks {
				t.Errorf("fresh overlay allocates %d bytes, want at most %d", alloc, tc.maxBlocks)
			}

			// The chain, as QEMU reads it, holds a clean filesystem of the
			// planned size with the image's files.
			raw := filepath.Join(t.TempDir(), "disk.raw")
			run(t, "qemu-img", "convert", "-O", "raw", d.Overlay, raw)
			// A broken grown filesystem can send e2fsck into a loop: bound it.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if out, err := exec.CommandContext(ctx, e2fsck, "-fn", raw).CombinedOutput(); err != nil {
				t.Fatalf("e2fsck -fn through the chain: %v\n%s", err, out)
			}
			h := dumpe2fsHeader(t, raw)
			bs := headerUint(t, h, "Block size")
			if got := headerUint(t, h, "Block count") * bs; got != d.FilesystemSize {
				t.Errorf("dumpe2fs: %d bytes, the plan said %d", got, d.FilesystemSize)
			}
			// Free space is the growth plus what the base had free, less
			// the new groups' metadata: at least 90% of the disk.
			if free := headerUint(t, h, "Free blocks") * bs; free < tc.size/100*90 {
				t.Errorf("dumpe2fs: %d bytes free of %d", free, d.FilesystemSize)
			}
			if inodes := headerUint(t, h, "Inode count"); inodes <= headerUint(t, dumpe2fsHeader(t, base.Path), "Inode count") {
				t.Errorf("dumpe2fs: %d inodes, no more than the base has", inodes)
			}
			got, err := exec.Command(debugfs, "-R", "cat /bin/busybox", raw).Output()
			if err != nil || string(got) != string(busybox) {
				t.Errorf("/bin/busybox through the chain: %d bytes (%v), want the base's %d", len(got), err, len(busybox))
			}
		})
	}
}

// TestBoxNotGrownForForeignBase: a base this builder did not write (here:
// zeros) is not parsed as a filesystem to grow. The disk still gets the
// claim's size and the box says the filesystem is the base's size.
func TestBoxNotGrownForForeignBase(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "foreign")
	var planned DiskPlan
	d, err := PrepareBoxWith(context.Background(), box, fixed(base), 64<<20, PrepareOptions{
		BeforeCreate: func(_ context.Context, p DiskPlan) error { planned = p; return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	if d.VirtualSize != 64<<20 || d.FilesystemSize != 1<<20 || len(planned.Writes) != 0 || !regexp.MustCompile(`superblock|magic|ext4`).MatchString(planned.NotGrown) {
		t.Errorf("got %+v, plan %+v; want a 64 MiB disk over an ungrown 1 MiB filesystem, saying why", d, planned)
	}
}

// TestBeforeCreateErrorWritesNoOverlay: when the caller cannot record the
// plan, no overlay appears and the base link is gone again.
func TestBeforeCreateErrorWritesNoOverlay(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "refused")
	_, err := PrepareBoxWith(context.Background(), box, fixed(base), 0, PrepareOptions{
		BeforeCreate: func(context.Context, DiskPlan) error { return fmt.Errorf("record full") },
	})
	if err == nil || !strings.Contains(err.Error(), "record full") {
		t.Fatalf("prepare: %v, want the BeforeCreate error", err)
	}
	for _, p := range []string{box.GuestRootfsDiskPath(), box.BasePath()} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s exists after a refused creation", p)
		}
	}
}
