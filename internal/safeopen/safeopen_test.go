package safeopen

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tree builds a small box-like tree with the traps a hostile pod plants.
func tree(t *testing.T) (root string, outside string) {
	t.Helper()
	dir := t.TempDir()
	root = filepath.Join(dir, "box")
	outside = filepath.Join(dir, "secret")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "disks"), 0o755))
	must(os.WriteFile(outside, []byte("host secret"), 0o600))
	must(os.WriteFile(filepath.Join(root, "box.json"), []byte(`{"ok":true}`), 0o644))
	must(os.WriteFile(filepath.Join(root, "big"), make([]byte, 100), 0o644))
	must(os.Symlink(outside, filepath.Join(root, "link")))
	must(os.Symlink("/", filepath.Join(root, "rootlink")))
	must(os.Symlink("disks", filepath.Join(root, "dirlink")))
	must(os.WriteFile(filepath.Join(root, "disks", "d"), []byte("d"), 0o644))
	must(syscall.Mkfifo(filepath.Join(root, "fifo"), 0o644))
	return root, outside
}

func TestRootReadFile(t *testing.T) {
	root, _ := tree(t)
	r, err := OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, tc := range []struct {
		rel     string
		limit   int64
		want    string
		wantErr string
	}{
		{"box.json", 1 << 10, `{"ok":true}`, ""},
		{"disks/d", 10, "d", ""},
		{"big", 100, strings.Repeat("\x00", 100), ""},
		{"big", 99, "", "larger than allowed"},
		{"link", 1 << 10, "", "symbolic link"},
		{"rootlink/etc/passwd", 1 << 10, "", "symbolic link"},
		{"dirlink/d", 1 << 10, "", "symbolic link"},
		{"../secret", 1 << 10, "", "leads outside"},
		{"/etc/passwd", 1 << 10, "", "leads outside"},
		{"fifo", 1 << 10, "", "not a regular file"},
		{"disks", 1 << 10, "", "not a regular file"},
		{"missing", 1 << 10, "", "no such file"},
	} {
		t.Run(tc.rel, func(t *testing.T) {
			done := make(chan struct{})
			var got []byte
			var err error
			go func() { got, err = r.ReadFile(tc.rel, tc.limit); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatalf("ReadFile(%q) blocked", tc.rel)
			}
			if tc.wantErr == "" {
				if err != nil || string(got) != tc.want {
					t.Fatalf("ReadFile(%q) = %q, %v; want %q", tc.rel, got, err, tc.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("ReadFile(%q) error = %v, want one containing %q", tc.rel, err, tc.wantErr)
			}
			var pe *os.PathError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), root) {
				t.Errorf("error %v does not name the tree %s", err, root)
			}
		})
	}
}

func TestRootOpenPathAndLstat(t *testing.T) {
	root, _ := tree(t)
	r, err := OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	st, err := r.Lstat("fifo")
	if err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Errorf("Lstat(fifo) = %#o, %v; want a FIFO, without blocking", st.Mode, err)
	}
	// Like lstat(2), the link itself is what Lstat describes.
	if st, err := r.Lstat("link"); err != nil || st.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Errorf("Lstat(link) = %#o, %v; want the link itself", st.Mode, err)
	}
	if _, err := r.Lstat("dirlink/d"); err == nil {
		t.Error("Lstat followed a symbolic link in a middle component")
	}
	if _, err := OpenRoot(filepath.Join(root, "dirlink")); err == nil {
		t.Error("OpenRoot accepted a symbolic link as the root")
	}
}

func TestReadRegular(t *testing.T) {
	root, outside := tree(t)
	if b, err := ReadRegular(outside, 100); err != nil || string(b) != "host secret" {
		t.Errorf("ReadRegular = %q, %v", b, err)
	}
	if _, err := ReadRegular(filepath.Join(root, "link"), 100); err == nil {
		t.Error("ReadRegular followed a symbolic link")
	}
	if _, err := ReadRegular(filepath.Join(root, "fifo"), 100); !errors.Is(err, ErrNotRegular) {
		t.Errorf("ReadRegular(fifo) = %v, want ErrNotRegular", err)
	}
}

// TestOpenFileNeverOpensNonRegular: what is not a regular file is refused
// without being opened for I/O. A FIFO shows it: a writer waiting on it is
// released by any open for reading, even a non-blocking one, so it must
// still be waiting after OpenFile refused the FIFO.
func TestOpenFileNeverOpensNonRegular(t *testing.T) {
	root, _ := tree(t)
	fifo := filepath.Join(root, "fifo")
	opened := make(chan error, 1)
	go func() {
		// Blocks until something opens the FIFO for reading.
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err == nil {
			f.Close()
		}
		opened <- err
	}()
	time.Sleep(50 * time.Millisecond)
	r, err := OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, flags := range []int{unix.O_RDONLY, unix.O_RDWR} {
		if f, err := r.OpenFile("fifo", flags); !errors.Is(err, ErrNotRegular) {
			if f != nil {
				f.Close()
			}
			t.Errorf("OpenFile(fifo, %#x): %v, want ErrNotRegular", flags, err)
		}
	}
	select {
	case err := <-opened:
		t.Fatalf("OpenFile opened the FIFO for I/O: its writer was released (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	// Release the writer.
	f, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	<-opened
	f.Close()
	// A regular file still opens, for writing too, as the same inode.
	f, err = r.OpenFile("box.json", unix.O_RDWR)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte(`{"ok":1}   `), 0); err != nil {
		t.Fatalf("write through the reopened descriptor: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "box.json")); string(b) != `{"ok":1}   ` {
		t.Errorf("box.json = %q", b)
	}
}
