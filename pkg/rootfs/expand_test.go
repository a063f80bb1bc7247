package rootfs

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// holdOpen starts a separate process that opens p with the shell
// redirection op ("<" to read, "<>" to read and write), as a VM in a pod
// would, and keeps it open until the returned function is called.
func holdOpen(t *testing.T, p, op string) func() {
	t.Helper()
	cmd := exec.Command("sh", "-c", `exec 3`+op+`"$1" && echo open && read x`, "sh", p)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(stdout, buf); err != nil || string(buf) != "open\n" {
		t.Fatalf("holder did not open %s: %q %v", p, buf, err)
	}
	return func() {
		stdin.Close()
		cmd.Wait()
	}
}

func TestExpandBox(t *testing.T) {
	needQemuTool(t, "qemu-img")
	c, base := realBase(t)
	box := testBox(t, c, "expand")
	const gib = 1 << 30
	d, err := PrepareBox(context.Background(), box, fixed(base), 1*gib)
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, "-c", "write -P 0x5a 512M 64k", d.Overlay)
	before := fileState(t, d.Overlay)

	// A writer holds the overlay open, as a running VM does, or a reader
	// (qemu-img info, a VM started read-only): the header is not touched.
	for _, op := range []string{"<>", "<"} {
		release := holdOpen(t, d.Overlay, op)
		_, err = ExpandBox(context.Background(), box, 3*gib)
		release()
		if !errors.Is(err, ErrOverlayInUse) || !strings.Contains(err.Error(), d.Overlay) {
			t.Fatalf("expand while a process holds the overlay open (%q): %v, want ErrOverlayInUse naming the overlay", op, err)
		}
		if got := fileState(t, d.Overlay); got != before {
			t.Fatalf("overlay changed while a process held it open (%q): %+v, was %+v", op, got, before)
		}
	}

	// With nobody holding it, it grows, once.
	e, err := ExpandBox(context.Background(), box, 3*gib)
	if err != nil || !e.Changed || e.OldSize != 1*gib || e.NewSize != 3*gib {
		t.Fatalf("expand: %+v, %v", e, err)
	}
	if e, err := ExpandBox(context.Background(), box, 3*gib); err != nil || e.Changed || e.NewSize != 3*gib {
		t.Fatalf("repeated expand: %+v, %v; want no change", e, err)
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", d.Overlay).CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"virtual-size": 3221225472`) {
		t.Fatalf("qemu-img info after expand: %v\n%s", err, out)
	}
	run(t, "qemu-img", "check", d.Overlay)
	// The guest's write is still there, the new space reads as zeros, and
	// the filesystem the box was made with is untouched and clean.
	qemuIO(t, "-c", "read -P 0x5a 512M 64k", "-c", "read -P 0 2G 64k", "-c", "write -P 0x7e 3221159936 64k", d.Overlay)
	raw := filepath.Join(t.TempDir(), "disk.raw")
	run(t, "qemu-img", "convert", "-O", "raw", d.Overlay, raw)
	if h := dumpe2fsHeader(t, raw); headerUint(t, h, "Block count")*headerUint(t, h, "Block size") != d.FilesystemSize {
		t.Errorf("the filesystem changed size: %v blocks, made with %d bytes", h["Block count"], d.FilesystemSize)
	}

	// Shrinking is refused and changes nothing.
	before = fileState(t, d.Overlay)
	if _, err := ExpandBox(context.Background(), box, 2*gib); !errors.Is(err, qcow2.ErrShrink) {
		t.Errorf("shrink: %v, want ErrShrink", err)
	}
	if got := fileState(t, d.Overlay); got != before {
		t.Errorf("overlay changed by a refused shrink")
	}
}

// TestExpandBoxRefusesTampering: what a pod put at the overlay's path is
// not followed or resized.
func TestExpandBoxRefusesTampering(t *testing.T) {
	c, base := newTestCache(t, 1<<20)
	for _, tc := range []struct {
		name   string
		tamper func(t *testing.T, overlay string)
	}{
		{"symlink", func(t *testing.T, p string) {
			if err := os.Rename(p, p+".real"); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(filepath.Base(p)+".real", p); err != nil {
				t.Fatal(err)
			}
		}},
		{"fifo", func(t *testing.T, p string) {
			os.Remove(p)
			mkfifo(t, p)
		}},
		{"other backing", func(t *testing.T, p string) {
			if err := qcow2.CreateOverlay(context.Background(), p+".new", qcow2.OverlayOptions{BackingFile: "/etc/shadow", BackingFormat: qcow2.FormatRaw, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(p+".new", p); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			box := testBox(t, c, "tamper-"+strings.ReplaceAll(tc.name, " ", "-"))
			d, err := PrepareBox(context.Background(), box, fixed(base), 0)
			if err != nil {
				t.Fatal(err)
			}
			tc.tamper(t, d.Overlay)
			done := make(chan error, 1)
			go func() { _, err := ExpandBox(context.Background(), box, 8<<20); done <- err }()
			select {
			case err := <-done:
				if !qcow2.IsTampered(err) {
					t.Errorf("expand: %v, want a tampered error", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("ExpandBox blocked on what the pod put at the overlay's path")
			}
			if h, err := qcow2.ReadHeader(d.Overlay + ".real"); err == nil && h.Size != 1<<20 {
				t.Errorf("the link's target was resized to %d", h.Size)
			}
		})
	}
}
