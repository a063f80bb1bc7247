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
// "ro".
//
// The bind is made detached (open_tree), made private and, if asked,
// read-only, and only then attached (move_mount), so it is never visible
// writable and never joins the peer group of its source. That matters:
// the staging path binds the box in the home, and a target binds the
// staging path, so as peers an unmount of one pod's target would
// propagate to the base/ and box.json mounts nested in the box, the
// staging path and every other pod's target, leaving the next pod a
// writable base/. Once attached below kubelet's directory the bind shares
// with kubelet's view of it as any mount there does, in a peer group of
// its own.
func (m *syscallMounter) Mount(source, target, fstype string, options []string) error {
	flags := unix.OPEN_TREE_CLONE | unix.OPEN_TREE_CLOEXEC
	switch {
	case slices.Contains(options, "rbind"):
		flags |= unix.AT_RECURSIVE
	case slices.Contains(options, "bind"):
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
	tree, err := unix.OpenTree(unix.AT_FDCWD, source, uint(flags))
	if err != nil {
		return fmt.Errorf("bind mount %s on %s: open_tree: %w", source, target, err)
	}
	defer unix.Close(tree)
	private := unix.MountAttr{Propagation: unix.MS_PRIVATE}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &private); err != nil {
		return fmt.Errorf("bind mount %s on %s: make it private: %w", source, target, err)
	}
	if slices.Contains(options, "ro") {
		// Only the top mount: nested mounts keep their own flags, and the
		// nested base/ and box.json are read-only already.
		if err := mountSetReadOnly(tree, target); err != nil {
			return err
		}
	}
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("bind mount %s on %s: move_mount: %w", source, target, err)
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
