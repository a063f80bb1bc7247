package qcow2

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// within runs fn and fails the test if it has not returned after d: the
// proof that nothing opened a FIFO for reading and waited for a writer.
// On a timeout it opens unblock (if set) for writing, which releases a
// reader stuck on it, so the goroutine does not outlive the test.
func within(t *testing.T, d time.Duration, unblock string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		if unblock != "" {
			if fd, err := unix.Open(unblock, unix.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
				unix.Close(fd)
			}
			<-done
		}
		t.Fatalf("still blocked after %s", d)
	}
}

// nonRegular is something a pod can put where an overlay should be. make
// creates it at p, next to a valid overlay at valid; fifo is set when a
// reader that opened p blocking would hang.
type nonRegular struct {
	name     string
	typ      string // FileTypeName of what is at p (lstat)
	needRoot bool
	make     func(t *testing.T, p, valid string)
	fifo     bool
}

var nonRegulars = []nonRegular{
	{name: "directory", typ: "directory", make: func(t *testing.T, p, _ string) { must(t, os.Mkdir(p, 0o755)) }},
	{name: "FIFO", typ: "named pipe (FIFO)", fifo: true, make: func(t *testing.T, p, _ string) { must(t, syscall.Mkfifo(p, 0o644)) }},
	{name: "symlink to a valid overlay", typ: "symbolic link", make: func(t *testing.T, p, valid string) { must(t, os.Symlink(valid, p)) }},
	{name: "symlink to a FIFO", typ: "symbolic link", make: func(t *testing.T, p, _ string) {
		must(t, syscall.Mkfifo(p+".fifo", 0o644))
		must(t, os.Symlink(filepath.Base(p)+".fifo", p))
	}},
	{name: "socket", typ: "socket", make: func(t *testing.T, p, _ string) {
		l, err := net.Listen("unix", p)
		must(t, err)
		l.(*net.UnixListener).SetUnlinkOnClose(false)
		t.Cleanup(func() { l.Close() })
	}},
	// /dev/zero reads as a corrupt image and loop7 as an empty one, so a
	// reader that opened them would answer "corrupt", not "tampered".
	{name: "character device", typ: "character device", needRoot: true, make: func(t *testing.T, p, _ string) {
		must(t, unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 5))))
	}},
	{name: "block device", typ: "block device", needRoot: true, make: func(t *testing.T, p, _ string) {
		must(t, unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(7, 7))))
	}},
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func lstatMode(t *testing.T, p string) uint32 {
	t.Helper()
	var st unix.Stat_t
	must(t, unix.Lstat(p, &st))
	return st.Mode
}

// TestOpenRefusesNonRegular: every path-based entry point refuses a
// non-regular file at the path as tampered, quickly, without reading it
// and without touching it.
func TestOpenRefusesNonRegular(t *testing.T) {
	want := Expect{BackingFile: "base.raw", BackingFormat: FormatRaw}
	entry := map[string]func(p string) error{
		"ReadHeader": func(p string) error { _, err := ReadHeader(p); return err },
		"Verify":     func(p string) error { _, err := Verify(p, want); return err },
		"OpenImage": func(p string) error {
			f, err := OpenImage(p)
			if err == nil {
				f.Close()
			}
			return err
		},
	}
	for _, nr := range nonRegulars {
		for fn, call := range entry {
			t.Run(nr.name+"/"+fn, func(t *testing.T) {
				if nr.needRoot {
					testenv.RequireRoot(t, "it makes device nodes")
				}
				dir := t.TempDir()
				valid := newOverlay(t, dir, "valid.qcow2", OverlayOptions{BackingFile: want.BackingFile})
				p := filepath.Join(dir, "o.qcow2")
				nr.make(t, p, valid)
				before := lstatMode(t, p)
				var err error
				unblock := ""
				if nr.fifo {
					unblock = p
				}
				within(t, 5*time.Second, unblock, func() { err = call(p) })
				var te *TamperedError
				if !errors.As(err, &te) || te.Field != "file type" || te.Got != nr.typ || te.Path != p || IsCorrupt(err) || IsIO(err) {
					t.Fatalf("err = %v, want only a TamperedError on the file type %q of %s", err, nr.typ, p)
				}
				if after := lstatMode(t, p); after != before {
					t.Fatalf("%s changed from %#o to %#o", p, before, after)
				}
			})
		}
	}
}

// TestFileEntryPointsRefuseNonRegular: the *os.File entry points check the
// descriptor's type before reading, so a FIFO a caller opened without
// blocking is refused rather than read (a read would get EAGAIN, or a
// writer's bytes).
func TestFileEntryPointsRefuseNonRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	must(t, syscall.Mkfifo(fifo, 0o644))
	f, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	must(t, err)
	defer f.Close()
	for name, call := range map[string]func() error{
		"ReadHeaderFile": func() error { _, err := ReadHeaderFile(f); return err },
		"VerifyFile":     func() error { _, err := VerifyFile(f, Expect{}); return err },
		"ProbeL1File":    func() error { _, err := ProbeL1File(f); return err },
	} {
		t.Run(name, func(t *testing.T) {
			var err error
			within(t, 5*time.Second, fifo, func() { err = call() })
			if !IsTampered(err) || IsCorrupt(err) || !strings.Contains(err.Error(), "named pipe") {
				t.Fatalf("err = %v, want tampered (named pipe)", err)
			}
		})
	}
}

func TestFileEntryPoints(t *testing.T) {
	dir := t.TempDir()
	want := Expect{BackingFile: "base.raw", BackingFormat: FormatRaw}
	p := newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: want.BackingFile})
	t.Run("valid overlay verifies and names the file", func(t *testing.T) {
		f, err := os.Open(p)
		must(t, err)
		defer f.Close()
		if _, err := VerifyFile(f, want); err != nil {
			t.Fatal(err)
		}
		_, err = VerifyFile(f, Expect{BackingFile: "/etc/shadow", BackingFormat: FormatRaw})
		var te *TamperedError
		if !errors.As(err, &te) || te.Path != p {
			t.Fatalf("err = %v, want a TamperedError naming %s", err, p)
		}
	})
	t.Run("a descriptor that cannot be read is an I/O error", func(t *testing.T) {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		must(t, err)
		defer f.Close()
		if _, err := VerifyFile(f, want); !IsIO(err) || IsCorrupt(err) || !errors.Is(err, syscall.EBADF) {
			t.Fatalf("err = %v, want an I/O error wrapping EBADF", err)
		}
	})
}

// TestCreateOverlayAtStaysInDir: once the directory is open, replacing its
// path with a symbolic link (as a pod can with its box's disks/) does not
// move the new overlay, or its temp file, anywhere else.
func TestCreateOverlayAtStaysInDir(t *testing.T) {
	top := t.TempDir()
	disks, elsewhere := filepath.Join(top, "disks"), filepath.Join(top, "elsewhere")
	must(t, os.Mkdir(disks, 0o755))
	must(t, os.Mkdir(elsewhere, 0o755))
	dir, err := os.OpenFile(disks, unix.O_PATH|unix.O_DIRECTORY, 0)
	must(t, err)
	defer dir.Close()
	must(t, os.Rename(disks, disks+".moved"))
	must(t, os.Symlink("elsewhere", disks))

	opts := OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw, Size: 1 << 20}
	must(t, CreateOverlayAt(context.Background(), dir, "o.qcow2", opts))
	if ents, _ := os.ReadDir(elsewhere); len(ents) != 0 {
		t.Fatalf("the symlink target got %d entries", len(ents))
	}
	if _, err := Verify(filepath.Join(disks+".moved", "o.qcow2"), Expect{BackingFile: opts.BackingFile, BackingFormat: FormatRaw}); err != nil {
		t.Fatalf("overlay not in the opened directory: %v", err)
	}
	for _, bad := range []string{"", ".", "..", "a/b", "../o.qcow2"} {
		if err := CreateOverlayAt(context.Background(), dir, bad, opts); !errors.Is(err, ErrInvalidOption) {
			t.Errorf("name %q: err = %v, want ErrInvalidOption", bad, err)
		}
	}
	if err := CreateOverlayAt(context.Background(), dir, "o.qcow2", opts); !errors.Is(err, os.ErrExist) {
		t.Errorf("second create: err = %v, want ErrExist", err)
	}
}
