package rootfs

import (
	"context"
	"crypto/sha256"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// quickly fails the test if fn has not returned within 5 s: the proof
// that nothing opened a FIFO (or a leased file) and waited. On a timeout
// every FIFO in unblock is opened for writing, which releases a reader
// stuck on it, until fn's goroutine ends.
func quickly(t *testing.T, fn func(), unblock ...string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		// fn may open the FIFO again after each release, so keep
		// releasing it until fn is done.
		for released := false; !released; {
			for _, p := range unblock {
				if fd, err := unix.Open(p, unix.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
					unix.Close(fd)
				}
			}
			select {
			case <-done:
				released = true
			case <-time.After(100 * time.Millisecond):
			}
		}
		t.Fatal("still blocked after 5s")
	}
}

// entry is one path of a tree as lstat sees it, plus the bytes of a
// regular file.
type entry struct {
	mode  uint32
	ino   uint64
	size  int64
	mtime int64
	sum   [32]byte
}

// snapshot records every path under dir without following a link or
// opening anything but regular files, so "nothing changed" can be checked
// in a tree full of FIFOs and devices.
func snapshot(t *testing.T, dir string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		e := entry{mode: st.Mode, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano()}
		if st.Mode&unix.S_IFMT == unix.S_IFREG {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.sum = sha256.Sum256(b)
		}
		out[p] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func assertSameTree(t *testing.T, before, after map[string]entry) {
	t.Helper()
	for p, b := range before {
		if a, ok := after[p]; !ok {
			t.Errorf("%s was removed", p)
		} else if a != b {
			t.Errorf("%s changed: %+v, was %+v", p, a, b)
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("%s appeared", p)
		}
	}
}

func mkfifo(t *testing.T, p string) {
	t.Helper()
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
}

func replaceWith(t *testing.T, p string, make func(t *testing.T, p string)) {
	t.Helper()
	if err := os.RemoveAll(p); err != nil {
		t.Fatal(err)
	}
	make(t, p)
}

func symlinkTo(target string) func(t *testing.T, p string) {
	return func(t *testing.T, p string) {
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
}

// TestHostileOverlayPath: a pod replaces its box's overlay, disks/, base/
// or the base link with a FIFO, a device, a socket, a directory, a file
// or a symbolic link (to another box's files, which would verify). Both
// PrepareBox (under the most permissive policy) and VerifyOverlay refuse
// it as tampered, at once, and nothing in either box changes.
func TestHostileOverlayPath(t *testing.T) {
	type env struct {
		box, victim layout.Box
		base        Base
	}
	cases := []struct {
		name     string
		needRoot bool
		// plant changes the prepared box; it returns the FIFOs a blocked
		// reader would be waiting on.
		plant func(t *testing.T, e env) []string
		// got is the file type named in the error; verify says whether
		// VerifyOverlay is affected, or else VerifyBase is (base/ cases).
		got    string
		verify bool
	}{
		{name: "FIFO as the overlay", got: "named pipe (FIFO)", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.GuestRootfsDiskPath(), mkfifo)
			return []string{e.box.GuestRootfsDiskPath()}
		}},
		{name: "symlink to another box's overlay", got: "symbolic link", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.GuestRootfsDiskPath(), symlinkTo(e.victim.GuestRootfsDiskPath()))
			return nil
		}},
		{name: "symlink to a FIFO as the overlay", got: "symbolic link", verify: true, plant: func(t *testing.T, e env) []string {
			fifo := filepath.Join(e.box.DisksDir(), "fifo")
			mkfifo(t, fifo)
			replaceWith(t, e.box.GuestRootfsDiskPath(), symlinkTo("fifo"))
			return []string{fifo}
		}},
		{name: "directory as the overlay", got: "directory", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.GuestRootfsDiskPath(), func(t *testing.T, p string) { must(t, os.Mkdir(p, 0o755)) })
			return nil
		}},
		{name: "socket as the overlay", got: "socket", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.GuestRootfsDiskPath(), func(t *testing.T, p string) {
				l, err := net.Listen("unix", p)
				must(t, err)
				l.(*net.UnixListener).SetUnlinkOnClose(false)
				t.Cleanup(func() { l.Close() })
			})
			return nil
		}},
		{name: "/dev/zero as the overlay", needRoot: true, got: "character device", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.GuestRootfsDiskPath(), func(t *testing.T, p string) { must(t, unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 5)))) })
			return nil
		}},
		{name: "block device as the overlay", needRoot: true, got: "block device", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.GuestRootfsDiskPath(), func(t *testing.T, p string) { must(t, unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(7, 7)))) })
			return nil
		}},
		{name: "FIFO as disks/", got: "named pipe (FIFO)", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.DisksDir(), mkfifo)
			return []string{e.box.DisksDir()}
		}},
		{name: "file as disks/", got: "regular file", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.DisksDir(), func(t *testing.T, p string) { writeFile(t, p, []byte("x")) })
			return nil
		}},
		{name: "disks/ a symlink to another box's disks/", got: "symbolic link", verify: true, plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.DisksDir(), symlinkTo(e.victim.DisksDir()))
			return nil
		}},
		{name: "disks/ a symlink to a directory holding a FIFO overlay", got: "symbolic link", verify: true, plant: func(t *testing.T, e env) []string {
			dir := filepath.Join(e.box.Root(), "tmp", "d")
			must(t, os.Mkdir(dir, 0o755))
			mkfifo(t, filepath.Join(dir, filepath.Base(e.box.GuestRootfsDiskPath())))
			replaceWith(t, e.box.DisksDir(), symlinkTo(dir))
			return []string{filepath.Join(dir, filepath.Base(e.box.GuestRootfsDiskPath()))}
		}},
		{name: "base link a symlink to the cached base", got: "symbolic link", plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.BasePath(), symlinkTo(e.base.Path))
			return nil
		}},
		{name: "base link a FIFO", got: "named pipe (FIFO)", plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.BasePath(), mkfifo)
			return []string{e.box.BasePath()}
		}},
		{name: "base/ a symlink to another box's base/", got: "symbolic link", plant: func(t *testing.T, e env) []string {
			replaceWith(t, e.box.BaseDir(), symlinkTo(e.victim.BaseDir()))
			return nil
		}},
		// With no overlay PrepareBox would link a base and write an
		// overlay: through these links, into the other box.
		{name: "no overlay, base/ a symlink to another box's base/", got: "symbolic link", plant: func(t *testing.T, e env) []string {
			must(t, os.Remove(e.box.GuestRootfsDiskPath()))
			replaceWith(t, e.box.BaseDir(), symlinkTo(e.victim.BaseDir()))
			return nil
		}},
		{name: "no overlay, disks/ a symlink to another box's emptied disks/", got: "symbolic link", verify: true, plant: func(t *testing.T, e env) []string {
			must(t, os.Remove(e.victim.GuestRootfsDiskPath()))
			replaceWith(t, e.box.DisksDir(), symlinkTo(e.victim.DisksDir()))
			return nil
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needRoot {
				testenv.RequireRoot(t, "it makes device nodes")
			}
			c, base := newTestCache(t, 1<<20)
			e := env{box: testBox(t, c, "pod"), victim: testBox(t, c, "victim"), base: base}
			for _, b := range []layout.Box{e.box, e.victim} {
				if _, err := PrepareBox(context.Background(), b, fixed(base), 0); err != nil {
					t.Fatal(err)
				}
			}
			fifos := tc.plant(t, e)
			boxes := filepath.Dir(e.box.Root())
			before := snapshot(t, boxes)
			links := linkCount(t, base.Path)

			var perr, verr, berr error
			quickly(t, func() {
				_, perr = PrepareBoxWith(context.Background(), e.box, fixed(base), 0, PrepareOptions{Corrupt: SetAsideCorrupt})
				_, verr = VerifyOverlay(e.box)
				berr = VerifyBase(e.box)
			}, fifos...)
			if !errors.Is(perr, ErrRefusedOverlay) || !qcow2.IsTampered(perr) || qcow2.IsCorrupt(perr) || !strings.Contains(perr.Error(), tc.got) {
				t.Errorf("PrepareBox: err = %v, want a tampered refusal naming a %s", perr, tc.got)
			}
			if tc.verify && (!qcow2.IsTampered(verr) || qcow2.IsCorrupt(verr) || !strings.Contains(verr.Error(), tc.got)) {
				t.Errorf("VerifyOverlay: err = %v, want tampered naming a %s", verr, tc.got)
			}
			if !tc.verify && (!qcow2.IsTampered(berr) || !strings.Contains(berr.Error(), tc.got)) {
				t.Errorf("VerifyBase: err = %v, want tampered naming a %s", berr, tc.got)
			}
			assertSameTree(t, before, snapshot(t, boxes))
			if n := linkCount(t, base.Path); n != links {
				t.Errorf("the cached base has %d links, had %d", n, links)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestVerifyOverlayMissing: a box with no overlay yet (or no box at all)
// is "not exist", as health, metrics and eviction expect, not tampered.
func TestVerifyOverlayMissing(t *testing.T) {
	c, _ := newTestCache(t, 1<<20)
	box := testBox(t, c, "new")
	if _, err := VerifyOverlay(box); !qcow2.IsIO(err) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("no box: err = %v, want an I/O error wrapping ErrNotExist", err)
	}
	must(t, box.Prepare())
	if _, err := VerifyOverlay(box); !qcow2.IsIO(err) || !errors.Is(err, fs.ErrNotExist) || qcow2.IsTampered(err) {
		t.Fatalf("no overlay: err = %v, want an I/O error wrapping ErrNotExist", err)
	}
}

// TestRemoveAndSetAsideCheckTheInode: the overlay PrepareBox judged is
// the one it removes or renames. If a pod swapped another file in after
// the check, neither happens, and the swapped-in file stays.
func TestRemoveAndSetAsideCheckTheInode(t *testing.T) {
	for name, op := range map[string]func(*safeopen.Root, layout.Box, *os.File) error{
		"remove":    removeChecked,
		"set aside": func(r *safeopen.Root, b layout.Box, f *os.File) error { _, err := setAside(r, b, f); return err },
	} {
		t.Run(name, func(t *testing.T) {
			c, base := newTestCache(t, 1<<20)
			box := testBox(t, c, "box-1")
			if _, err := PrepareBox(context.Background(), box, fixed(base), 0); err != nil {
				t.Fatal(err)
			}
			root, err := safeopen.OpenRoot(box.Root())
			must(t, err)
			defer root.Close()
			f, err := os.Open(box.GuestRootfsDiskPath())
			must(t, err)
			defer f.Close()
			swapped := box.GuestRootfsDiskPath() + ".new"
			writeFile(t, swapped, []byte("the pod's file"))
			must(t, os.Rename(swapped, box.GuestRootfsDiskPath()))
			before := snapshot(t, box.DisksDir())
			if err := op(root, box, f); err == nil || !strings.Contains(err.Error(), "was replaced") {
				t.Fatalf("err = %v, want a refusal: the file was replaced", err)
			}
			assertSameTree(t, before, snapshot(t, box.DisksDir()))
		})
	}
}
