package driver

// Mounts inside a box, which is pod-writable territory. The plugin makes
// them by file descriptor on inodes it checked (owned.go), and removes
// them the same way round: every mount inside the box is found by its
// mount ID, wherever the pod has since renamed it to, opened beneath the
// box root, checked to be that very mount, and detached through its
// descriptor.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/internal/mountinfo"
	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// checkMountAPI refuses to run on a kernel without the new mount API:
// mount_setattr arrived in Linux 5.12. A probe with a bad descriptor
// answers EBADF where the call exists and ENOSYS where it does not.
func checkMountAPI() error {
	err := unix.MountSetattr(-1, "", 0, &unix.MountAttr{})
	if errors.Is(err, unix.ENOSYS) {
		return errors.New("this kernel lacks mount_setattr(2): boxlite-csi needs Linux 5.12 or later, to make the read-only base mount in one step")
	}
	return nil
}

// openBase opens the box's base link beneath the box root, without
// following any link, as an O_PATH descriptor.
func openBase(box layout.Box) (*os.File, error) {
	root, err := safeopen.OpenRoot(box.Root())
	if err != nil {
		return nil, err
	}
	defer root.Close()
	rel, err := filepath.Rel(box.Root(), box.BasePath())
	if err != nil {
		return nil, err
	}
	return root.OpenPath(rel)
}

// checkBaseIdentity accepts the file at the box's base path only if it is
// the base this volume was given: the inode in the volume record, where an
// earlier release recorded one, or else a cached base of the volume's
// image. This release keeps that identity as the plugin-owned link
// instead (owned.go), so the check runs only when that link is missing or
// the overlay was just made.
func (d *Driver) checkBaseIdentity(box layout.Box, r *volumeRecord, dev, ino uint64) error {
	var st unix.Stat_t
	if err := unix.Stat(box.Root(), &st); err != nil {
		return fmt.Errorf("stat %s: %w", box.Root(), err)
	}
	sameFS := uint64(st.Dev) == dev
	if r.BaseInode != 0 {
		if sameFS && ino == r.BaseInode {
			return nil
		}
		return status.Errorf(codes.FailedPrecondition, "volume %s: %s is not the base its overlay was created over (inode %d, want %d): the box was tampered with, and nothing was mounted", box.ID(), box.BasePath(), ino, r.BaseInode)
	}
	ok, err := d.cache.IsBaseOf(r.Digest, d.builder.Version(), dev, ino)
	if err != nil {
		return err
	}
	if !ok || !sameFS {
		return status.Errorf(codes.FailedPrecondition, "volume %s: %s is not a cached base of image %s: the box was tampered with, and nothing was mounted", box.ID(), box.BasePath(), r.Digest)
	}
	return nil
}

func mountSetReadOnly(fd int, what string) error {
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("make the mount at %s read-only: %w", what, err)
	}
	return nil
}

// unmountInside detaches every mount at or below dir, a directory the
// plugin owns under the home (a box, or a box being deleted), deepest
// first. It finds them by mount ID and detaches each through a
// descriptor opened beneath dir, so a pod that renamed a mounted path or
// planted a link where it was cannot turn the unmount onto another mount.
func unmountInside(dir string) error {
	infos, err := mountinfo.Read()
	if err != nil {
		return err
	}
	var inside []mount.MountInfo
	for _, mi := range infos {
		if mi.MountPoint != dir && within(mi.MountPoint, dir) {
			inside = append(inside, mi)
		}
	}
	if len(inside) == 0 {
		return nil
	}
	sort.Slice(inside, func(i, j int) bool {
		return strings.Count(inside[i].MountPoint, "/") > strings.Count(inside[j].MountPoint, "/")
	})
	root, err := safeopen.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	var errs []error
	for _, mi := range inside {
		if err := unmountByID(root, dir, mi); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// unmountByID detaches mount mi, whose mount point lies inside root, after
// checking that the path still leads to that very mount.
func unmountByID(root *safeopen.Root, dir string, mi mount.MountInfo) error {
	rel, err := filepath.Rel(dir, mi.MountPoint)
	if err != nil {
		return err
	}
	f, err := root.OpenPath(rel)
	if err != nil {
		return fmt.Errorf("unmount %s: %w", mi.MountPoint, err)
	}
	defer f.Close()
	var stx unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_MNT_ID, &stx); err != nil {
		return fmt.Errorf("statx %s: %w", mi.MountPoint, err)
	}
	if stx.Mask&unix.STATX_MNT_ID == 0 || stx.Mnt_id != uint64(mi.ID) {
		return fmt.Errorf("unmount %s: the path no longer leads to mount %d (it leads to %d); left as it is", mi.MountPoint, mi.ID, stx.Mnt_id)
	}
	return detach(f, mi.MountPoint)
}
