package layout

import (
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

func TestPrepareRejectsTmpOnOtherFilesystem(t *testing.T) {
	testenv.RequireRoot(t, "it mounts a tmpfs to cover the cross-filesystem error")
	h := NewHome(t.TempDir(), Config{})
	if err := os.MkdirAll(h.TempDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", h.TempDir(), "tmpfs", 0, "size=1m"); err != nil {
		testenv.Unmet(t, "cannot mount a tmpfs on %s: %v", h.TempDir(), err)
	}
	// Registered after t.TempDir, so it runs before the directory is removed.
	t.Cleanup(func() {
		if err := syscall.Unmount(h.TempDir(), 0); err != nil {
			t.Errorf("unmount %s: %v", h.TempDir(), err)
		}
	})

	err := h.Prepare()
	if err == nil {
		t.Fatal("Prepare succeeded with tmp/ on a separate tmpfs")
	}
	tmpDev, err2 := deviceOf(h.TempDir())
	if err2 != nil {
		t.Fatal(err2)
	}
	basesDev, err2 := deviceOf(h.BasesDir())
	if err2 != nil {
		t.Fatal(err2)
	}
	if tmpDev == basesDev {
		t.Fatalf("tmpfs did not change the device (%s)", formatDev(tmpDev))
	}
	msg := err.Error()
	for _, want := range []string{
		"one filesystem",
		h.Dir(),
		"tmp (" + formatDev(tmpDev) + ")",
		"bases (" + formatDev(basesDev) + ")",
		"images/disk-images (" + formatDev(basesDev) + ")",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	t.Log(msg)
}
