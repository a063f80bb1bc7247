// Package safeopen opens files in trees that a hostile pod can write: a
// box, which its pod sees read-write. Three rules hold for every open.
// No symbolic link is followed, in any component, and the path cannot
// climb out of the tree (openat2 with RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS). No open blocks: a FIFO planted where a file
// should be would hang the plugin, so files are opened O_NONBLOCK and
// anything but a regular file is refused after fstat. Reads are bounded.
package safeopen

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrNotRegular reports that a path names something other than a regular
// file (a FIFO, a device, a directory, a socket).
var ErrNotRegular = errors.New("not a regular file")

// ErrTooLarge reports a file larger than the caller's bound.
var ErrTooLarge = errors.New("file is larger than allowed")

// resolve is how every path below a root is walked: inside the root, no
// symbolic links, no /proc magic links.
const resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// Root is an open directory that paths are resolved beneath.
type Root struct {
	f *os.File
}

// OpenRoot opens dir, which must itself be a real directory (not a link).
// dir is a path the plugin owns, such as a box's root under the home.
func OpenRoot(dir string) (*Root, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &Root{f: os.NewFile(uintptr(fd), dir)}, nil
}

// NewRoot makes a Root of the directory open as f (an O_PATH descriptor
// is enough), such as a clone of a mount from open_tree(2); the Root owns
// f from then on. name is what errors call it.
func NewRoot(f *os.File) *Root { return &Root{f: f} }

// OpenRoot opens the directory rel beneath r as a Root of its own,
// following no link on the way.
func (r *Root) OpenRoot(rel string) (*Root, error) {
	f, err := r.open(rel, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	return &Root{f: f}, nil
}

// Dir is the root's directory as a file, for the *at calls; it stays the
// Root's, so the caller does not close it.
func (r *Root) Dir() *os.File { return r.f }

// Close releases the root.
func (r *Root) Close() error { return r.f.Close() }

// Name is the root's path.
func (r *Root) Name() string { return r.f.Name() }

// FD is the root's file descriptor, valid until Close.
func (r *Root) FD() int { return int(r.f.Fd()) }

// open resolves rel beneath the root with openat2.
func (r *Root) open(rel string, flags int) (*os.File, error) {
	p := filepath.Join(r.f.Name(), rel)
	fd, err := unix.Openat2(int(r.f.Fd()), rel, &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW),
		Resolve: resolve,
	})
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
			return nil, &os.PathError{Op: "open", Path: p, Err: fmt.Errorf("a component is a symbolic link or leads outside %s: %w", r.f.Name(), err)}
		}
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return os.NewFile(uintptr(fd), p), nil
}

// OpenFile opens the regular file rel beneath the root for reading (or
// with flags, e.g. unix.O_RDWR), without blocking on a FIFO: anything but
// a regular file is refused with ErrNotRegular without ever being opened
// for I/O. The path is first opened as O_PATH, which runs no device's or
// FIFO's open, and checked by fstat; only then is that same inode opened
// for I/O through /proc/self/fd, so a device node a pod planted (a pod
// may have CAP_MKNOD, and the plugin has no device cgroup) is never
// opened, and nothing can be swapped in between.
func (r *Root) OpenFile(rel string, flags int) (*os.File, error) {
	pf, err := r.open(rel, unix.O_PATH)
	if err != nil {
		return nil, err
	}
	defer pf.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(pf.Fd()), &st); err == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
		// O_PATH opens a final symbolic link itself; say what an open
		// that follows nothing says about it.
		return nil, &os.PathError{Op: "open", Path: pf.Name(), Err: fmt.Errorf("a component is a symbolic link or leads outside %s: %w", r.f.Name(), unix.ELOOP)}
	}
	if err := checkRegular(pf); err != nil {
		return nil, err
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pf.Fd()), flags|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: pf.Name(), Err: err}
	}
	return os.NewFile(uintptr(fd), pf.Name()), nil
}

// OpenPath opens rel beneath the root as an O_PATH descriptor: a handle on
// the inode that reads nothing and never blocks, for fstat and for
// mounting by file descriptor. Like lstat(2), a symbolic link as the last
// component is opened itself, not followed; callers check the type.
func (r *Root) OpenPath(rel string) (*os.File, error) {
	return r.open(rel, unix.O_PATH)
}

// OpenDir opens the directory rel beneath the root for listing. Its
// descriptor is what unlinkat and the other *at calls take, so a name in
// it is never resolved through a link a pod planted in the path.
func (r *Root) OpenDir(rel string) (*os.File, error) {
	return r.open(rel, unix.O_RDONLY|unix.O_DIRECTORY)
}

// Lstat is fstat on rel beneath the root, without following links.
func (r *Root) Lstat(rel string) (unix.Stat_t, error) {
	var st unix.Stat_t
	f, err := r.OpenPath(rel)
	if err != nil {
		return st, err
	}
	defer f.Close()
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return st, &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	return st, nil
}

// ReadFile reads the regular file rel beneath the root, refusing one
// larger than limit bytes.
func (r *Root) ReadFile(rel string, limit int64) ([]byte, error) {
	f, err := r.OpenFile(rel, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readBounded(f, limit)
}

// OpenRegular opens an absolute path the plugin owns for reading: the
// last component is not followed and a FIFO does not block. Paths inside
// a box go through a Root instead.
func OpenRegular(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	if err := checkRegular(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// ReadRegular reads an absolute path the plugin owns, as OpenRegular opens
// it, refusing one larger than limit bytes.
func ReadRegular(path string, limit int64) ([]byte, error) {
	f, err := OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readBounded(f, limit)
}

func checkRegular(f *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return &os.PathError{Op: "open", Path: f.Name(), Err: fmt.Errorf("%w (mode %#o)", ErrNotRegular, st.Mode&unix.S_IFMT)}
	}
	return nil
}

func readBounded(f *os.File, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, &os.PathError{Op: "read", Path: f.Name(), Err: err}
	}
	if int64(len(b)) > limit {
		return nil, &os.PathError{Op: "read", Path: f.Name(), Err: fmt.Errorf("%w: more than %d bytes", ErrTooLarge, limit)}
	}
	return b, nil
}
