package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestCreateOverlayRejectsBadOptions(t *testing.T) {
	cases := []struct {
		name string
		opts OverlayOptions
		want string
	}{
		{"empty backing name", OverlayOptions{BackingFormat: FormatRaw, Size: 1}, "empty"},
		{"backing name of 1024 bytes", OverlayOptions{BackingFile: strings.Repeat("a", 1024), BackingFormat: FormatRaw, Size: 1}, "1024 bytes"},
		{"NUL in backing name", OverlayOptions{BackingFile: "base\x00.raw", BackingFormat: FormatRaw, Size: 1}, "NUL"},
		{"non-UTF-8 backing name", OverlayOptions{BackingFile: "\xff\xfe", BackingFormat: FormatRaw, Size: 1}, "UTF-8"},
		{"unknown backing format", OverlayOptions{BackingFile: "b", BackingFormat: "vmdk", Size: 1}, `"vmdk"`},
		{"empty backing format", OverlayOptions{BackingFile: "b", Size: 1}, `format ""`},
		{"zero size", OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw}, "zero"},
		{"size past the maximum", OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw, Size: MaxVirtualSize + 1}, "exceeds"},
		{"size that would overflow rounding", OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw, Size: ^uint64(0)}, "exceeds"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "o.qcow2")
			err := CreateOverlay(context.Background(), p, tc.opts)
			if !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("err = %v, want ErrInvalidOption", err)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
				t.Fatalf("err %q should mention %q and the path", err, tc.want)
			}
			assertDirHolds(t, dir)
		})
	}
}

// assertDirHolds fails unless dir holds exactly the named entries: the
// writer must never leave temp files behind.
func assertDirHolds(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Fatalf("%s holds %v, want %v", dir, got, names)
	}
}

func TestCreateOverlayRoundTrip(t *testing.T) {
	cases := []struct {
		name     string
		backing  string
		format   string
		size     uint64
		wantSize uint64
	}{
		{"1 MiB relative raw", "../base/rootfs.ext4", FormatRaw, 1 << 20, 1 << 20},
		{"512 MiB + 1 rounds up", "base.raw", FormatRaw, 512<<20 + 1, 512<<20 + 512},
		{"10 GiB absolute qcow2", "/var/lib/boxlite-csi/x.qcow2", FormatQcow2, 10 << 30, 10 << 30},
		{"64 TiB", "b", FormatRaw, 64 << 40, 64 << 40},
		{"maximum size", "b", FormatRaw, MaxVirtualSize, MaxVirtualSize},
		{"1023-byte name", strings.Repeat("n", 1023), FormatRaw, 4096, 4096},
		{"unicode name", "bäse-🙂.raw", FormatRaw, 4096, 4096},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "o.qcow2")
			if err := CreateOverlay(context.Background(), p, OverlayOptions{BackingFile: tc.backing, BackingFormat: tc.format, Size: tc.size}); err != nil {
				t.Fatal(err)
			}
			assertDirHolds(t, dir, "o.qcow2")
			h, err := ReadHeader(p)
			if err != nil {
				t.Fatal(err)
			}
			if h.BackingFile != tc.backing || h.BackingFormat != tc.format || h.Size != tc.wantSize || h.Version != 3 {
				t.Fatalf("header = %+v", h)
			}
			if _, err := Verify(p, Expect{BackingFile: tc.backing, BackingFormat: tc.format}); err != nil {
				t.Fatalf("Verify: %v", err)
			}
			checkOwnStructures(t, p, h)

			var st syscall.Stat_t
			if err := syscall.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			if alloc := st.Blocks * 512; alloc > 16<<10 {
				t.Fatalf("fresh overlay allocates %d bytes, want at most 16 KiB", alloc)
			}
		})
	}
}

// checkOwnStructures re-derives, without QEMU, the invariants qemu-img check
// enforces on our layout: no two structures share a cluster, every used
// cluster has refcount 1 and every other refcount is 0.
func checkOwnStructures(t *testing.T, path string, h *Header) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cs := h.ClusterSize()
	used := map[uint64]string{0: "header"}
	claim := func(c uint64, what string) {
		if prev, ok := used[c]; ok {
			t.Fatalf("cluster %d holds both %s and %s", c, prev, what)
		}
		used[c] = what
	}
	claim(h.RefcountTableOffset/cs, "refcount table")
	rb := binary.BigEndian.Uint64(b[h.RefcountTableOffset:])
	claim(rb/cs, "refcount block")
	l1Clusters := (uint64(h.L1Size)*8 + cs - 1) / cs
	for i := range l1Clusters {
		claim(h.L1TableOffset/cs+i, "L1 table")
	}
	for c := uint64(0); c < cs/2; c++ {
		rc := binary.BigEndian.Uint16(b[rb+2*c:])
		_, inUse := used[c]
		if inUse && rc != 1 || !inUse && rc != 0 {
			t.Fatalf("cluster %d: refcount %d, in use %v", c, rc, inUse)
		}
	}
	if last := h.L1TableOffset + l1Clusters*cs; uint64(len(b)) < last {
		t.Fatalf("file is %d bytes, structures reach %d", len(b), last)
	}
	for _, v := range b[h.L1TableOffset : h.L1TableOffset+uint64(h.L1Size)*8] {
		if v != 0 {
			t.Fatal("L1 table of a fresh overlay is not all zero")
		}
	}
}

func TestCreateOverlayNeverReplaces(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "o.qcow2")
	if err := os.WriteFile(p, []byte("guest data"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := CreateOverlay(context.Background(), p, OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw, Size: 1 << 20})
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("err = %v, want ErrExist", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "guest data" {
		t.Fatalf("existing file changed to %q", b)
	}
	assertDirHolds(t, dir, "o.qcow2")
}

func TestCreateOverlayFailures(t *testing.T) {
	opts := OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw, Size: 1 << 20}
	t.Run("missing directory", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "missing", "o.qcow2")
		err := CreateOverlay(context.Background(), p, opts)
		if err == nil || !strings.Contains(err.Error(), p) {
			t.Fatalf("err = %v, want an error naming %s", err, p)
		}
	})
	t.Run("cancelled context", func(t *testing.T) {
		dir := t.TempDir()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err := CreateOverlay(ctx, filepath.Join(dir, "o.qcow2"), opts)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		assertDirHolds(t, dir)
	})
	t.Run("no sync still atomic and complete", func(t *testing.T) {
		dir := t.TempDir()
		o := opts
		o.NoSync = true
		p := filepath.Join(dir, "o.qcow2")
		if err := CreateOverlay(context.Background(), p, o); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadHeader(p); err != nil {
			t.Fatal(err)
		}
	})
}
