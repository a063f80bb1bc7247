package driver

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
)

// syscallMounter is mount-utils' Interface with bind mounts done by
// mount(2) directly. mount-utils runs mount(8) for every call, about a
// millisecond of fork and exec each; a box needs three bind mounts per
// stage and publish, and a warm stage must take about a millisecond.
// Everything else (mount-point checks, mountinfo parsing, corrupted-mount
// detection) is mount-utils' own.
type syscallMounter struct {
	mount.Interface
}

func newMounter() *syscallMounter {
	return &syscallMounter{Interface: mount.New("")}
}

// Mount supports what the driver uses: "bind" or "rbind", optionally with
// "ro". A read-only bind needs a second, remount call: the kernel ignores
// MS_RDONLY on the bind itself.
func (m *syscallMounter) Mount(source, target, fstype string, options []string) error {
	var flags uintptr
	switch {
	case slices.Contains(options, "rbind"):
		flags = unix.MS_BIND | unix.MS_REC
	case slices.Contains(options, "bind"):
		flags = unix.MS_BIND
	default:
		return m.Interface.Mount(source, target, fstype, options)
	}
	for _, o := range options {
		switch o {
		case "bind", "rbind", "ro", "rw":
		default:
			return fmt.Errorf("mount %s on %s: unsupported bind option %q", source, target, o)
		}
	}
	if err := unix.Mount(source, target, "", flags, ""); err != nil {
		return fmt.Errorf("bind mount %s on %s: %w", source, target, err)
	}
	if slices.Contains(options, "ro") {
		// MS_REC is not needed here: nested mounts keep their own flags,
		// and the nested base is read-only already.
		if err := unix.Mount("", target, "", flags|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("remount %s read-only: %w", target, err)
		}
	}
	return nil
}

// Unmount detaches target and everything mounted below it. A box is
// rbind-mounted with its read-only base nested inside, and a lazy detach
// removes the whole tree at once, even while a pod still has files open.
func (m *syscallMounter) Unmount(target string) error {
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		return &os.PathError{Op: "unmount", Path: target, Err: err}
	}
	return nil
}

// ensureReadOnly remounts the bind mount at target read-only unless it
// already is. Mount makes a read-only bind in two calls, so a plugin killed
// between them leaves a writable bind that the retried call must repair
// rather than accept because "it is mounted".
func (m *syscallMounter) ensureReadOnly(target string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", target, err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return nil
	}
	if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("remount %s read-only: %w", target, err)
	}
	return nil
}

// isMountPoint reports whether p is a mount point. A missing path is not.
func (m *syscallMounter) isMountPoint(p string) (bool, error) {
	ok, err := m.IsMountPoint(p)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return ok, err
}

// syscallUnmount detaches p and everything below it.
func syscallUnmount(p string) error { return unix.Unmount(p, unix.MNT_DETACH) }
