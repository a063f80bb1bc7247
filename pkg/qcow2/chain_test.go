package qcow2

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestChain(t *testing.T) {
	ctx := context.Background()
	t.Run("relative names resolve against each image's directory", func(t *testing.T) {
		dir := t.TempDir()
		writeBase(t, filepath.Join(dir, "base", "rootfs.ext4"), 4096)
		if err := os.Mkdir(filepath.Join(dir, "disks"), 0o755); err != nil {
			t.Fatal(err)
		}
		mid := newOverlay(t, filepath.Join(dir, "disks"), "mid.qcow2", OverlayOptions{BackingFile: "../base/rootfs.ext4"})
		top := newOverlay(t, dir, "top.qcow2", OverlayOptions{BackingFile: "disks/mid.qcow2", BackingFormat: FormatQcow2})
		chain, err := Chain(ctx, top)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{top, mid, filepath.Join(dir, "base", "rootfs.ext4")}
		if len(chain) != len(want) {
			t.Fatalf("chain = %+v", chain)
		}
		for i, l := range chain {
			if filepath.Clean(l.Path) != want[i] {
				t.Fatalf("link %d = %s, want %s", i, l.Path, want[i])
			}
		}
	})
	t.Run("missing backing names both files", func(t *testing.T) {
		dir := t.TempDir()
		o := newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: "gone.raw"})
		_, err := Chain(ctx, o)
		var mb *MissingBackingError
		if !errors.As(err, &mb) || mb.Overlay != o || mb.Backing != "gone.raw" || !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("err = %v, want MissingBackingError for %s -> gone.raw", err, o)
		}
		if !strings.Contains(err.Error(), "has missing backing file") {
			t.Fatalf("message %q lacks upstream's wording", err)
		}
	})
	t.Run("loop", func(t *testing.T) {
		dir := t.TempDir()
		a := newOverlay(t, dir, "a.qcow2", OverlayOptions{BackingFile: "b.qcow2", BackingFormat: FormatQcow2})
		newOverlay(t, dir, "b.qcow2", OverlayOptions{BackingFile: "a.qcow2", BackingFormat: FormatQcow2})
		_, err := Chain(ctx, a)
		var ce *ChainError
		if !errors.As(err, &ce) || !strings.Contains(ce.Reason, "loop") {
			t.Fatalf("err = %v, want a loop ChainError", err)
		}
	})
	t.Run("self loop through a symlink", func(t *testing.T) {
		dir := t.TempDir()
		a := newOverlay(t, dir, "a.qcow2", OverlayOptions{BackingFile: "link", BackingFormat: FormatQcow2})
		if err := os.Symlink("a.qcow2", filepath.Join(dir, "link")); err != nil {
			t.Fatal(err)
		}
		if _, err := Chain(ctx, a); err == nil || !strings.Contains(err.Error(), "loop") {
			t.Fatalf("err = %v, want loop", err)
		}
	})
	for _, tc := range []struct {
		links int
		ok    bool
	}{{MaxChainDepth, true}, {MaxChainDepth + 1, false}} {
		t.Run("depth "+string(rune('0'+tc.links)), func(t *testing.T) {
			dir := t.TempDir()
			writeBase(t, filepath.Join(dir, "l0"), 4096)
			for i := 1; i <= tc.links; i++ {
				f := FormatQcow2
				if i == 1 {
					f = FormatRaw
				}
				newOverlay(t, dir, "l"+string(rune('0'+i)), OverlayOptions{BackingFile: "l" + string(rune('0'+i-1)), BackingFormat: f})
			}
			chain, err := Chain(ctx, filepath.Join(dir, "l"+string(rune('0'+tc.links))))
			if tc.ok && (err != nil || len(chain) != tc.links+1) {
				t.Fatalf("%d links: chain %d, err %v", tc.links, len(chain), err)
			}
			var ce *ChainError
			if !tc.ok && !errors.As(err, &ce) {
				t.Fatalf("%d links: err = %v, want ChainError", tc.links, err)
			}
		})
	}
	t.Run("fifo backing is refused, not opened", func(t *testing.T) {
		dir := t.TempDir()
		if err := syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
			t.Fatal(err)
		}
		o := newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: "fifo"})
		// Opening a FIFO for reading blocks until a writer appears, so a
		// Chain that opened it would hang this test rather than pass.
		if _, err := Chain(ctx, o); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestVerifyDetectsTampering(t *testing.T) {
	want := Expect{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw}
	cases := []struct {
		name    string
		rewrite OverlayOptions // what the guest rewrote the overlay into
		field   string
	}{
		{"backing name to /etc/shadow", OverlayOptions{BackingFile: "/etc/shadow"}, "backing file"},
		{"backing name to another absolute path", OverlayOptions{BackingFile: "/var/lib/boxlite-csi/images/disk-images/x.ext4"}, "backing file"},
		{"longer chain through another qcow2", OverlayOptions{BackingFile: "../base/evil.qcow2", BackingFormat: FormatQcow2}, "backing file"},
		{"same name as qcow2", OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatQcow2}, "backing format"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.rewrite.Size = 1 << 20
			p := newOverlay(t, dir, "o.qcow2", tc.rewrite)
			_, err := Verify(p, want)
			var te *TamperedError
			if !errors.As(err, &te) || te.Field != tc.field || te.Path != p {
				t.Fatalf("err = %v, want TamperedError on %s", err, tc.field)
			}
		})
	}
	t.Run("named file is never opened", func(t *testing.T) {
		dir := t.TempDir()
		fifo := filepath.Join(dir, "shadow")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		p := newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: fifo})
		// Verify would block forever on the FIFO if it opened it.
		if _, err := Verify(p, want); !IsTampered(err) {
			t.Fatalf("err = %v, want tampered", err)
		}
	})
	t.Run("encryption flag", func(t *testing.T) {
		p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: want.BackingFile})
		patch(t, p, 32, be32(2))
		if _, err := Verify(p, want); !IsTampered(err) {
			t.Fatalf("err = %v, want tampered", err)
		}
	})
	t.Run("untouched overlay verifies", func(t *testing.T) {
		p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: want.BackingFile})
		if _, err := Verify(p, want); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("corruption is not reported as tampering", func(t *testing.T) {
		p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: want.BackingFile})
		patch(t, p, 0, []byte("XXXX"))
		if _, err := Verify(p, want); !IsCorrupt(err) || IsTampered(err) {
			t.Fatalf("err = %v, want corrupt only", err)
		}
	})
}
