// Package sealed keeps frozen layers unwritable. A frozen layer is an
// overlay a guest once wrote, now shared read-only by its volume, its
// snapshots and every volume restored from them. Its pod could still hold
// a descriptor of it (an O_PATH one can be reopened for writing through
// /proc), or have made a hard link to it in its box before it froze. So
// a read-only mount and file modes are not enough: the layer's inode gets
// the immutable attribute (FS_IMMUTABLE_FL), which refuses every open for
// writing, every new link and every rename or unlink, for root too, on
// any path or descriptor. On ext4 it also refuses writes through a
// descriptor opened before the attribute was set; tmpfs checks only at
// open, which is why a layer is sealed only once no writer has it open.
//
// The plugin itself must link a sealed layer into a new volume or
// snapshot, and unlink it when one goes. It lifts the attribute for that
// alone, inside a window guarded by a read lease (F_SETLEASE F_RDLCK): an
// open for writing during the window breaks the lease and waits until the
// window ends and the attribute is back. A broken lease is reported as
// ErrWriterDuringWindow, so the caller can say a process tried.
package sealed

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrUnsupported reports a filesystem without the immutable attribute
// (FS_IOC_SETFLAGS). Layers cannot be protected there, so the plugin
// refuses to make them.
var ErrUnsupported = errors.New("the filesystem does not support the immutable attribute")

// ErrWriterDuringWindow reports that a process tried to open a layer for
// writing while its attribute was lifted. The open waited, and found the
// layer immutable again; on a filesystem that checks only at open
// (tmpfs) it may hold a writable descriptor now.
var ErrWriterDuringWindow = errors.New("a process tried to open the layer for writing while the plugin linked it")

// ErrWriter reports a file that some process has open for writing, so it
// cannot be sealed, or its seal lifted, without that process writing to
// it.
var ErrWriter = errors.New("the file is open for writing in another process")

// immutableFL is FS_IMMUTABLE_FL from linux/fs.h, which x/sys/unix
// does not name.
const immutableFL = 0x00000010

// flags reads the inode flags of the open file f.
func flags(f *os.File) (int, error) {
	v, err := unix.IoctlGetInt(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return 0, flagError(f, "read the attributes of", err)
	}
	return v, nil
}

func setFlags(f *os.File, v int) error {
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, v); err != nil {
		return flagError(f, "set the attributes of", err)
	}
	return nil
}

func flagError(f *os.File, what string, err error) error {
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		err = fmt.Errorf("%w (%w)", ErrUnsupported, err)
	}
	return fmt.Errorf("%s %s: %w", what, f.Name(), err)
}

// IsSealed reports whether the open file f is immutable.
func IsSealed(f *os.File) (bool, error) {
	v, err := flags(f)
	return v&immutableFL != 0, err
}

// Seal makes the open file f immutable. It is idempotent.
func Seal(f *os.File) error {
	v, err := flags(f)
	if err != nil {
		return err
	}
	if v&immutableFL != 0 {
		return nil
	}
	return setFlags(f, v|immutableFL)
}

// Probe reports whether files in dir can be sealed so that even a
// descriptor opened for writing before the seal cannot write: it seals a
// temporary file it holds open for writing and tries a write through it.
// ext4 refuses that write; tmpfs (and, as far as is known, XFS) check the
// attribute only at open, and a process whose open for writing waited out
// a link window would keep a descriptor that writes, so layers are not
// made there.
func Probe(dir string) error {
	f, err := os.CreateTemp(dir, ".seal-probe-")
	if err != nil {
		return fmt.Errorf("probe %s for the immutable attribute: %w", dir, err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if err := Seal(f); err != nil {
		return err
	}
	_, werr := f.WriteAt([]byte{0}, 0)
	v, err := flags(f)
	if err != nil {
		return err
	}
	if err := setFlags(f, v&^immutableFL); err != nil {
		return err
	}
	if werr == nil {
		return fmt.Errorf("%s: %w: the filesystem lets a descriptor opened before the seal write through it", dir, ErrUnsupported)
	}
	return nil
}

// TakeReadLease takes a read lease on f, which must be open read-only.
// The kernel grants it only while no process has the file open for
// writing, and breaks it when one opens it for writing: that open then
// waits until the lease is released (or the lease-break time passes).
func TakeReadLease(f *os.File) error {
	if _, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_RDLCK); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("%s: %w", f.Name(), ErrWriter)
		}
		return fmt.Errorf("take a read lease on %s: %w", f.Name(), err)
	}
	return nil
}

// LeaseHeld reports whether f's read lease is intact: false once an open
// for writing has started to break it.
func LeaseHeld(f *os.File) (bool, error) {
	t, err := unix.FcntlInt(f.Fd(), unix.F_GETLEASE, 0)
	if err != nil {
		return false, fmt.Errorf("read the lease on %s: %w", f.Name(), err)
	}
	return t == unix.F_RDLCK, nil
}

// ReleaseLease drops f's lease; a pending open then proceeds.
func ReleaseLease(f *os.File) {
	_, _ = unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_UNLCK)
}

// window runs fn with f's immutable attribute lifted, under a read lease,
// and seals f again afterwards if it still has a name. f must be open
// read-only.
func window(f *os.File, fn func() error) error {
	if err := TakeReadLease(f); err != nil {
		return err
	}
	defer ReleaseLease(f)
	v, err := flags(f)
	if err != nil {
		return err
	}
	sealed := v&immutableFL != 0
	if sealed {
		if err := setFlags(f, v&^immutableFL); err != nil {
			return err
		}
	}
	ferr := fn()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return errors.Join(ferr, fmt.Errorf("fstat %s: %w", f.Name(), err))
	}
	if sealed && st.Nlink > 0 {
		if err := setFlags(f, v|immutableFL); err != nil {
			return errors.Join(ferr, err)
		}
	}
	held, err := LeaseHeld(f)
	if err != nil {
		return errors.Join(ferr, err)
	}
	if !held && st.Nlink > 0 {
		return errors.Join(ferr, fmt.Errorf("%s: %w", f.Name(), ErrWriterDuringWindow))
	}
	return ferr
}

// Dest is a directory entry to link a layer as.
type Dest struct {
	Dir  *os.File // the directory, open (an O_PATH descriptor is enough)
	Name string
}

// openLayer opens dir/name read-only without following a link or
// blocking, and refuses anything but a regular file.
func openLayer(dir *os.File, name string) (*os.File, error) {
	p := filepath.Join(dir.Name(), name)
	fd, err := unix.Openat2(int(dir.Fd()), name, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(fd), p)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		if err == nil {
			err = fmt.Errorf("mode %#o is not a regular file", st.Mode&unix.S_IFMT)
		}
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return f, nil
}

// Link links the layer dir/name as each of dsts that does not hold it
// already, lifting its seal for the links alone. An entry that holds
// another file is an error, never replaced.
func Link(dir *os.File, name string, dsts ...Dest) error {
	f, err := openLayer(dir, name)
	if err != nil {
		return err
	}
	defer f.Close()
	return LinkFile(f, dsts...)
}

// LinkFile is Link for a layer open read-only as f.
func LinkFile(f *os.File, dsts ...Dest) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("fstat %s: %w", f.Name(), err)
	}
	var todo []Dest
	for _, d := range dsts {
		var dst unix.Stat_t
		err := unix.Fstatat(int(d.Dir.Fd()), d.Name, &dst, unix.AT_SYMLINK_NOFOLLOW)
		switch {
		case err == nil && dst.Dev == st.Dev && dst.Ino == st.Ino:
		case err == nil:
			return fmt.Errorf("link %s as %s: %w", f.Name(), filepath.Join(d.Dir.Name(), d.Name), fs.ErrExist)
		case errors.Is(err, unix.ENOENT):
			todo = append(todo, d)
		default:
			return fmt.Errorf("stat %s: %w", filepath.Join(d.Dir.Name(), d.Name), err)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	return window(f, func() error {
		for _, d := range todo {
			if err := unix.Linkat(int(f.Fd()), "", int(d.Dir.Fd()), d.Name, unix.AT_EMPTY_PATH); err != nil {
				return fmt.Errorf("link %s as %s: %w", f.Name(), filepath.Join(d.Dir.Name(), d.Name), err)
			}
		}
		return nil
	})
}

// Unlink removes the entry dir/name, lifting the seal of the file it
// names for the unlink alone. A missing entry is fine. dir must be open
// (an O_PATH descriptor is enough).
func Unlink(dir *os.File, name string) error {
	err := unix.Unlinkat(int(dir.Fd()), name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EPERM) {
		return fmt.Errorf("remove %s: %w", filepath.Join(dir.Name(), name), err)
	}
	f, oerr := openLayer(dir, name)
	if oerr != nil {
		return fmt.Errorf("remove %s: %w", filepath.Join(dir.Name(), name), err)
	}
	defer f.Close()
	return window(f, func() error {
		if err := unix.Unlinkat(int(dir.Fd()), name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove %s: %w", filepath.Join(dir.Name(), name), err)
		}
		return nil
	})
}

// RemoveAll is os.RemoveAll for a tree that may hold sealed layers: each
// is unlinked through Unlink, which seals it again if it has other links.
// The walk is relative to directory descriptors opened without following
// links, so a directory swapped for a symbolic link while it runs is never
// followed out of the tree, and only entries a plain unlink refuses go
// through Unlink.
func RemoveAll(path string) error {
	err := os.RemoveAll(path)
	if err == nil || !errors.Is(err, unix.EPERM) {
		return err
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	if err := unlinkSealed(os.NewFile(uintptr(fd), path)); err != nil {
		return err
	}
	return os.RemoveAll(path)
}

// unlinkSealed unlinks, beneath the directory dir (which it closes), every
// regular file that a plain unlink refuses with EPERM, through Unlink.
func unlinkSealed(dir *os.File) error {
	defer dir.Close()
	entries, err := dir.ReadDir(-1)
	if err != nil {
		return fmt.Errorf("list %s: %w", dir.Name(), err)
	}
	for _, e := range entries {
		switch {
		case e.Type().IsDir():
			fd, err := unix.Openat(int(dir.Fd()), e.Name(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				continue // gone, or no longer a directory: not followed
			}
			if err := unlinkSealed(os.NewFile(uintptr(fd), filepath.Join(dir.Name(), e.Name()))); err != nil {
				return err
			}
		case e.Type().IsRegular():
			err := unix.Unlinkat(int(dir.Fd()), e.Name(), 0)
			if err == nil || errors.Is(err, unix.ENOENT) {
				continue
			}
			if !errors.Is(err, unix.EPERM) {
				return fmt.Errorf("remove %s: %w", filepath.Join(dir.Name(), e.Name()), err)
			}
			if err := Unlink(dir, e.Name()); err != nil {
				return err
			}
		}
	}
	return nil
}
