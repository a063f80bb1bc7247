package driver

// The read-only base bind is the one mount the plugin makes inside a box,
// which is pod-writable territory. So it is made on a verified inode, by
// file descriptor, in one step: the base link is opened beneath the box
// root without following any link, checked by device and inode against
// the cache, cloned with open_tree, made read-only with mount_setattr
// while still detached, and attached with move_mount. There is no moment
// when it is writable, and no name a pod could swap in between.
//
// Unmounting works the same way round: every mount inside the box is
// found by its mount ID, wherever the pod has since renamed it to, opened
// beneath the box root, checked to be that very mount, and detached
// through its descriptor.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
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

// mountBaseReadOnly bind-mounts the box's base link read-only onto itself.
// The base is shared by every box, so inside a pod it must be read-only
// even to root, which file modes cannot promise but a mount can.
func (d *Driver) mountBaseReadOnly(box layout.Box, r *volumeRecord) error {
	f, err := openBase(box)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "volume %s: cannot open its base %s: %v", box.ID(), box.BasePath(), err)
	}
	defer f.Close()
	fd := int(f.Fd())
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_INO|unix.STATX_TYPE, &stx); err != nil {
		return fmt.Errorf("statx %s: %w", box.BasePath(), err)
	}
	dev := unix.Mkdev(stx.Dev_major, stx.Dev_minor)
	if stx.Mode&unix.S_IFMT != unix.S_IFREG {
		return status.Errorf(codes.FailedPrecondition, "volume %s: its base %s is not a regular file (mode %#o): the box was tampered with, and nothing was mounted", box.ID(), box.BasePath(), stx.Mode&unix.S_IFMT)
	}
	if err := d.checkBaseIdentity(box, r, dev, stx.Ino); err != nil {
		return err
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		// Mounted already (a retried stage). It is the base, as checked
		// above; make sure it is read-only too.
		return mountSetReadOnly(fd, box.BasePath())
	}
	tree, err := unix.OpenTree(fd, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return fmt.Errorf("open_tree %s: %w", box.BasePath(), err)
	}
	defer unix.Close(tree)
	if err := mountSetReadOnly(tree, box.BasePath()); err != nil {
		return err
	}
	if err := unix.MoveMount(tree, "", fd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount the read-only base onto %s: %w", box.BasePath(), err)
	}
	return nil
}

// checkBaseIdentity accepts the file at the box's base path only if it is
// the base this volume was given: the inode recorded for the volume, or,
// before one is recorded, a cached base of the volume's image. The inode
// is recorded at unstage (recordBaseInode), off the path a pod's start
// waits on, so that a box keeps its own base once the cache's copy is
// gone.
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

// recordBaseInode writes into the volume's record the inode of the base
// its box links, once that base is still checked against the cache. A
// record that has one already, or a box whose link is not a cached base,
// is left as it is.
func (d *Driver) recordBaseInode(box layout.Box) error {
	r, err := d.readRecord(box)
	if err != nil || r.BaseInode != 0 {
		return nil
	}
	f, err := openBase(box)
	if err != nil {
		return nil
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil
	}
	if err := d.checkBaseIdentity(box, r, uint64(st.Dev), st.Ino); err != nil {
		return nil
	}
	r.BaseInode = st.Ino
	return d.writeRecord(r)
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
	p := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil {
		return &os.PathError{Op: "unmount", Path: mi.MountPoint, Err: err}
	}
	return nil
}
