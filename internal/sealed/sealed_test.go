package sealed

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// sealedFile makes dir/name with some content and seals it.
func sealedFile(t *testing.T, dir, name string) *os.File {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("layer"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := Seal(f); err != nil {
		t.Fatal(err)
	}
	return f
}

func openDir(t *testing.T, dir string) *os.File {
	t.Helper()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestSealLinkUnlink(t *testing.T) {
	testenv.RequireRoot(t, "the immutable attribute needs CAP_LINUX_IMMUTABLE")
	dir := t.TempDir()
	t.Cleanup(func() { RemoveAll(dir) })
	other := filepath.Join(dir, "other")
	if err := os.Mkdir(other, 0o755); err != nil {
		t.Fatal(err)
	}
	f := sealedFile(t, dir, "ly")

	// Sealed: no open for writing, no link, no unlink, root included.
	if _, err := os.OpenFile(filepath.Join(dir, "ly"), os.O_WRONLY, 0); !errors.Is(err, unix.EPERM) {
		t.Errorf("open for writing a sealed file: %v, want EPERM", err)
	}
	if err := os.Link(filepath.Join(dir, "ly"), filepath.Join(other, "plain")); !errors.Is(err, unix.EPERM) {
		t.Errorf("plain link of a sealed file: %v, want EPERM", err)
	}
	if err := os.Remove(filepath.Join(dir, "ly")); !errors.Is(err, unix.EPERM) {
		t.Errorf("plain unlink of a sealed file: %v, want EPERM", err)
	}

	// Link lifts the seal for the link alone.
	if err := Link(openDir(t, dir), "ly", Dest{Dir: openDir(t, other), Name: "ly"}); err != nil {
		t.Fatal(err)
	}
	if ok, err := IsSealed(f); err != nil || !ok {
		t.Errorf("after Link: sealed %v, %v; want sealed again", ok, err)
	}
	// Linking again where it already is changes nothing.
	if err := Link(openDir(t, dir), "ly", Dest{Dir: openDir(t, other), Name: "ly"}); err != nil {
		t.Errorf("repeated Link: %v", err)
	}
	// A different file at the destination is never replaced.
	if err := os.WriteFile(filepath.Join(other, "taken"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Link(openDir(t, dir), "ly", Dest{Dir: openDir(t, other), Name: "taken"}); !errors.Is(err, os.ErrExist) {
		t.Errorf("Link over another file: %v, want ErrExist", err)
	}

	// Unlink of one link leaves the other sealed.
	if err := Unlink(openDir(t, dir), "ly"); err != nil {
		t.Fatal(err)
	}
	if ok, err := IsSealed(f); err != nil || !ok {
		t.Errorf("after Unlink of one link: sealed %v, %v; want sealed", ok, err)
	}
	if err := Unlink(openDir(t, dir), "ly"); err != nil {
		t.Errorf("Unlink of a missing entry: %v", err)
	}
	if err := RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RemoveAll left %s: %v", dir, err)
	}
}

// TestReadLease pins the kernel behaviour the windows rely on: a read
// lease is refused while a writer has the file open, and an open for
// writing breaks a held one and waits for its release.
func TestReadLease(t *testing.T) {
	testenv.RequireRoot(t, "leases on files another user owns need CAP_LEASE")
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	r, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := TakeReadLease(r); !errors.Is(err, ErrWriter) {
		t.Errorf("read lease with a writer open: %v, want ErrWriter", err)
	}
	w.Close()
	if err := TakeReadLease(r); err != nil {
		t.Fatal(err)
	}
	opened := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err == nil {
			f.Close()
		}
		opened <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		held, err := LeaseHeld(r)
		if err != nil {
			t.Fatal(err)
		}
		if !held {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an open for writing never broke the read lease")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-opened:
		t.Fatalf("the open for writing did not wait for the lease: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	ReleaseLease(r)
	if err := <-opened; err != nil {
		t.Errorf("the open for writing after the release: %v", err)
	}
}
