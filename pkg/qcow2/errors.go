package qcow2

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrInvalidOption marks a request that the writer refuses before it touches
// the disk, such as a bad backing name, format or size. Callers map it to
// InvalidArgument.
var ErrInvalidOption = errors.New("invalid qcow2 option")

// CorruptError means the bytes at Path are not a qcow2 image this package
// accepts. A corrupt overlay may be recreated (after ProbeL1 has shown it
// maps no guest data) or set aside, so an I/O failure must never be
// reported as a CorruptError.
type CorruptError struct {
	Path   string
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("qcow2 image %s is corrupt: %s", e.Path, e.Reason)
}

// IOError means the image could not be read at all, because open, stat or
// read failed. The bytes may be intact, so callers must not delete the file.
type IOError struct {
	Path string
	Op   string // "open", "stat" or "read"
	Err  error
}

func (e *IOError) Error() string {
	return fmt.Sprintf("cannot %s image %s: %v", e.Op, e.Path, e.Err)
}

func (e *IOError) Unwrap() error { return e.Err }

// TamperedError means an overlay differs from what boxlite-csi wrote, so
// someone with write access to the box rewrote it: a well-formed header
// naming another backing, or something other than a regular file (a
// symbolic link, FIFO, device, directory) where the overlay or one of its
// directories should be. The overlay must be refused, and neither it nor
// the backing file it names may be opened.
type TamperedError struct {
	Path  string
	Field string
	Got   string
	Want  string
	// Err is the error that revealed the tampering, if any (ELOOP from an
	// open that refused a symbolic link, for example).
	Err error
}

func (e *TamperedError) Error() string {
	return fmt.Sprintf("qcow2 image %s was tampered with (its %s is %q, expected %q), so boxlite-csi refuses to use it", e.Path, e.Field, e.Got, e.Want)
}

func (e *TamperedError) Unwrap() error { return e.Err }

// TamperedFileType reports that the file at path, or field (such as
// "parent disks/") on the way to it, has the type in mode (st_mode, as
// from lstat) where want ("regular file", "directory") should be.
func TamperedFileType(path, field string, mode uint32, want string, cause error) *TamperedError {
	return &TamperedError{Path: path, Field: field, Got: FileTypeName(mode), Want: want, Err: cause}
}

// FileTypeName names the file type in st_mode for messages.
func FileTypeName(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symbolic link"
	case unix.S_IFIFO:
		return "named pipe (FIFO)"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	}
	return fmt.Sprintf("unknown file type %#o", mode&unix.S_IFMT)
}

// MissingBackingError means an overlay names a backing file that does not
// exist. The overlay may still hold a guest's writes, so it is kept.
type MissingBackingError struct {
	Overlay string
	Backing string
	Err     error
}

func (e *MissingBackingError) Error() string {
	return fmt.Sprintf("qcow2 %s has missing backing file %s: %v", e.Overlay, e.Backing, e.Err)
}

func (e *MissingBackingError) Unwrap() error { return e.Err }

// ChainError reports a backing chain that cannot be walked safely. The chain
// is too long, loops back on itself, holds something other than a regular
// file, or names a backing format other than raw and qcow2.
type ChainError struct {
	Path   string
	Reason string
}

func (e *ChainError) Error() string {
	return fmt.Sprintf("cannot follow the qcow2 backing chain of %s: %s", e.Path, e.Reason)
}

// IsCorrupt reports whether err says the image bytes are not a valid qcow2.
func IsCorrupt(err error) bool {
	var c *CorruptError
	return errors.As(err, &c)
}

// IsIO reports whether err is a failure to read the image at all.
func IsIO(err error) bool {
	var e *IOError
	return errors.As(err, &e)
}

// IsTampered reports whether err says the overlay was rewritten by someone
// other than boxlite-csi.
func IsTampered(err error) bool {
	var t *TamperedError
	return errors.As(err, &t)
}
