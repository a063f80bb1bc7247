package rootfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

const testDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// newTestCache returns a cache in a fresh home and a base of baseSize bytes
// installed in it, like upstream's seed tests' 1 MiB base file.
func newTestCache(t *testing.T, baseSize int64) (*Cache, Base) {
	t.Helper()
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{})})
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Ensure(context.Background(), Key{Digest: testDigest, Builder: "t1"}, func(_ context.Context, out *os.File) error {
		return out.Truncate(baseSize)
	})
	if err != nil {
		t.Fatal(err)
	}
	return c, b
}

func testBox(t *testing.T, c *Cache, id string) layout.Box {
	t.Helper()
	box, err := c.cfg.Home.Box(id)
	if err != nil {
		t.Fatal(err)
	}
	return box
}

// assertChainReachesBase checks the overlay names the box-relative base
// and that the name resolves to the cached base's inode.
func assertChainReachesBase(t *testing.T, box layout.Box, base Base) {
	t.Helper()
	h, err := qcow2.ReadHeader(box.GuestRootfsDiskPath())
	if err != nil {
		t.Fatal(err)
	}
	if h.BackingFile != "../base/rootfs.ext4" || h.BackingFormat != qcow2.FormatRaw {
		t.Fatalf("overlay backing = %q (%s)", h.BackingFile, h.BackingFormat)
	}
	chain, err := qcow2.Chain(context.Background(), box.GuestRootfsDiskPath())
	if err != nil {
		t.Fatal(err)
	}
	a, err1 := os.Stat(chain[len(chain)-1].Path)
	b, err2 := os.Stat(base.Path)
	if err1 != nil || err2 != nil || !os.SameFile(a, b) {
		t.Fatalf("chain ends at %s, not the cached base %s (%v, %v)", chain[len(chain)-1].Path, base.Path, err1, err2)
	}
}

// The upstream seed tests, ported: test_reuse_keeps_valid_guest_rootfs_overlay.
func TestReuseKeepsValidOverlay(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "box-1")
	d, err := PrepareBox(context.Background(), box, fixed(base), 0)
	if err != nil || d.Outcome != Created {
		t.Fatalf("first prepare: %+v, %v", d, err)
	}
	before, _ := os.Stat(d.Overlay)

	d, err = PrepareBox(context.Background(), box, noBase(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	if d.Outcome != Reused || d.Overlay != box.GuestRootfsDiskPath() {
		t.Fatalf("second prepare: %+v", d)
	}
	after, _ := os.Stat(d.Overlay)
	if after.Size() != before.Size() || !after.ModTime().Equal(before.ModTime()) || !os.SameFile(before, after) {
		t.Fatal("reused overlay was touched")
	}
	assertChainReachesBase(t, box, base)
}

// test_reuse_recreates_invalid_guest_rootfs_overlay, _too_short_, and
// _with_invalid_utf8_backing_path, in one table.
func TestReuseRecreatesCorruptOverlay(t *testing.T) {
	cases := []struct {
		name    string
		corrupt func(t *testing.T, overlay string)
	}{
		{"256 KiB of zeros", func(t *testing.T, p string) { writeFile(t, p, make([]byte, 256<<10)) }},
		{"10 bytes", func(t *testing.T, p string) { writeFile(t, p, make([]byte, 10)) }},
		{"non-UTF-8 backing name", func(t *testing.T, p string) {
			// Upstream's minimal header: magic, version 3, a 3-byte name.
			b := make([]byte, 1024)
			copy(b, "QFI\xfb\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x03")
			copy(b[512:], []byte{0xff, 0xfe, 0xfd})
			writeFile(t, p, b)
		}},
		{"truncated mid-header of a real overlay", func(t *testing.T, p string) {
			if err := os.Truncate(p, 60); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, base := newTestCache(t, 1<<20)
			box := testBox(t, c, "box-1")
			if _, err := PrepareBox(context.Background(), box, fixed(base), 0); err != nil {
				t.Fatal(err)
			}
			tc.corrupt(t, box.GuestRootfsDiskPath())
			d, err := PrepareBox(context.Background(), box, fixed(base), 0)
			if err != nil {
				t.Fatal(err)
			}
			if d.Outcome != Recreated {
				t.Fatalf("outcome %s, want recreated", d.Outcome)
			}
			assertChainReachesBase(t, box, base)
		})
	}
}

// fixed hands PrepareBox an already installed base.
func fixed(b Base) func(context.Context) (Base, error) {
	return func(context.Context) (Base, error) { return b, nil }
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// test_io_error_does_not_discard_guest_rootfs_overlay.
func TestIOErrorDoesNotDiscardOverlay(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "box-1")
	if err := box.Prepare(); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(box.GuestRootfsDiskPath(), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := PrepareBox(context.Background(), box, fixed(base), 0)
	if err == nil || !strings.Contains(err.Error(), "refusing to discard") || !errors.Is(err, ErrRefusedOverlay) {
		t.Fatalf("err = %v, want a refusal to discard", err)
	}
	if fi, err := os.Stat(box.GuestRootfsDiskPath()); err != nil || !fi.IsDir() {
		t.Fatal("overlay path was disturbed on an I/O error")
	}
}

// test_reuse_reports_missing_guest_rootfs_backing. The box's backing is its
// own link to the base, so that is what goes missing.
func TestReuseReportsMissingBacking(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "box-1")
	if _, err := PrepareBox(context.Background(), box, fixed(base), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(box.BasePath()); err != nil {
		t.Fatal(err)
	}
	_, err := PrepareBox(context.Background(), box, fixed(base), 0)
	var mb *qcow2.MissingBackingError
	if !errors.As(err, &mb) || !strings.Contains(err.Error(), "has missing backing file") || !strings.Contains(err.Error(), box.GuestRootfsDiskPath()) {
		t.Fatalf("err = %v, want a missing-backing error naming the overlay", err)
	}
	if _, err := os.Stat(box.GuestRootfsDiskPath()); err != nil {
		t.Fatal("overlay was not kept")
	}
	if _, err := os.Stat(box.BasePath()); err == nil {
		t.Fatal("the missing backing was silently re-linked")
	}
}

// Hard links make a box survive the loss of the cache file itself.
func TestBoxSurvivesEvictedCacheFile(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "box-1")
	if _, err := PrepareBox(context.Background(), box, fixed(base), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(base.Path); err != nil {
		t.Fatal(err)
	}
	d, err := PrepareBox(context.Background(), box, noBase(t), 0)
	if err != nil || d.Outcome != Reused {
		t.Fatalf("%+v, %v", d, err)
	}
	if _, err := qcow2.Chain(context.Background(), d.Overlay); err != nil {
		t.Fatalf("chain broken after the cache file went: %v", err)
	}
}

func TestTamperedOverlayIsRefusedAndKept(t *testing.T) {
	for _, backing := range []string{"/etc/shadow", "../../../../../etc/shadow", "/var/lib/boxlite-csi/images/disk-images/other.ext4"} {
		t.Run(backing, func(t *testing.T) {
			c, base := newTestCache(t, 1<<20)
			box := testBox(t, c, "box-1")
			if err := box.Prepare(); err != nil {
				t.Fatal(err)
			}
			if err := qcow2.CreateOverlay(context.Background(), box.GuestRootfsDiskPath(), qcow2.OverlayOptions{BackingFile: backing, BackingFormat: qcow2.FormatRaw, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			before, _ := os.ReadFile(box.GuestRootfsDiskPath())
			_, err := PrepareBox(context.Background(), box, fixed(base), 0)
			if !errors.Is(err, ErrRefusedOverlay) || !qcow2.IsTampered(err) || !strings.Contains(err.Error(), backing) {
				t.Fatalf("err = %v, want a tampered refusal naming %s", err, backing)
			}
			after, _ := os.ReadFile(box.GuestRootfsDiskPath())
			if string(before) != string(after) {
				t.Fatal("tampered overlay was modified")
			}
		})
	}
}

func TestVirtualSizeIsMaxOfBaseAndRequest(t *testing.T) {
	cases := []struct {
		name      string
		requested uint64
		want      uint64
	}{
		{"no request takes the base size", 0, 1 << 20},
		{"smaller request takes the base size", 4096, 1 << 20},
		{"bigger request wins", 10 << 30, 10 << 30},
		{"unaligned request rounds up", 3<<20 + 1, 3<<20 + 512},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, base := newTestCache(t, 1<<20)
			box := testBox(t, c, "v")
			d, err := PrepareBox(context.Background(), box, fixed(base), tc.requested)
			if err != nil {
				t.Fatal(err)
			}
			h, err := qcow2.ReadHeader(d.Overlay)
			if err != nil {
				t.Fatal(err)
			}
			if h.Size != tc.want || d.VirtualSize != tc.want {
				t.Fatalf("virtual size header %d, reported %d, want %d", h.Size, d.VirtualSize, tc.want)
			}
		})
	}
}

func TestStaleBaseLinkReplacedWhenNoOverlay(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	box := testBox(t, c, "box-1")
	if err := box.Prepare(); err != nil {
		t.Fatal(err)
	}
	// An interrupted attempt left an empty placeholder and no overlay.
	writeFile(t, box.BasePath(), nil)
	if _, err := PrepareBox(context.Background(), box, fixed(base), 0); err != nil {
		t.Fatal(err)
	}
	assertChainReachesBase(t, box, base)
	if n := linkCount(t, base.Path); n != 2 {
		t.Fatalf("cache base has %d links, want 2", n)
	}
}

func linkCount(t *testing.T, p string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Nlink)
}

func TestBoxPathsStayInBoxes(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	d, err := PrepareBox(context.Background(), testBox(t, c, "pvc-1"), fixed(base), 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{d.Overlay, d.Base} {
		rel, err := filepath.Rel(c.cfg.Home.BoxesDir(), p)
		if err != nil || strings.HasPrefix(rel, "..") {
			t.Fatalf("%s escapes boxes/", p)
		}
	}
}
