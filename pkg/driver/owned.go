package driver

// What the plugin owns inside a box is kept outside it. A box is
// published read-write to its pod, so a pod can rename, replace or link
// anything in it; but it cannot rename, unlink or write through a
// read-only mount point (EBUSY, EROFS). So the two things the plugin puts
// in a box for the runtime live in the records directory, which no pod
// sees, and are mounted read-only into the box at stage:
//
//	<home>/volumes/<id>.base/rootfs.ext4  hard link to the volume's base,
//	                                      mounted on <box>/base
//	<home>/volumes/<id>.box.json          the runtime's manifest,
//	                                      mounted on <box>/box.json
//
// The box keeps its own copies underneath (base/rootfs.ext4 and
// box.json), so that it stays self-contained without mounts, after a
// reboot and for an earlier release after a rollback. The plugin never
// trusts those copies: the base is checked by inode before it is adopted,
// and box.json is only compared byte for byte before it is rewritten.
//
// That is two mounts in a box. Each view of the box (the staging path,
// each target path) is an rbind, which copies them, so a staged volume
// published once has eight mounts in the node's table; the README's
// security model has the measurement (TestMountCount).

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

const (
	ownedBaseSuffix     = ".base"
	ownedManifestSuffix = ".box.json"
	// baseName is the base link's name, in the box's base/ and in the
	// plugin-owned directory mounted there.
	baseName = "rootfs.ext4"
)

// ownedBaseDir is the plugin-owned directory mounted on <box>/base.
func (d *Driver) ownedBaseDir(id string) string {
	return filepath.Join(d.recordsDir(), id+ownedBaseSuffix)
}

// ownedManifestPath is the plugin-owned box.json mounted on <box>/box.json.
func (d *Driver) ownedManifestPath(id string) string {
	return filepath.Join(d.recordsDir(), id+ownedManifestSuffix)
}

// ensureOwnedBase makes the plugin-owned link to the volume's base. The
// link is the plugin's record of which base the box's overlay is written
// over: once it exists it is used as it is, whatever the box's own link
// says. It is made from the box's link, checked by device and inode
// against the volume record or the cache, when it is missing or when the
// overlay was just created (and so over the base just linked from the
// cache).
func (d *Driver) ensureOwnedBase(box layout.Box, r *volumeRecord, freshOverlay bool) error {
	dir := d.ownedBaseDir(box.ID())
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	df, err := safeopen.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer df.Close()
	var owned unix.Stat_t
	haveOwned := unix.Fstatat(df.FD(), baseName, &owned, unix.AT_SYMLINK_NOFOLLOW) == nil &&
		owned.Mode&unix.S_IFMT == unix.S_IFREG
	if haveOwned && !freshOverlay {
		return nil
	}
	f, err := openBase(box)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "volume %s: cannot open its base %s: %v", box.ID(), box.BasePath(), err)
	}
	defer f.Close()
	var stx unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_INO|unix.STATX_TYPE, &stx); err != nil {
		return fmt.Errorf("statx %s: %w", box.BasePath(), err)
	}
	if stx.Mode&unix.S_IFMT != unix.S_IFREG {
		return status.Errorf(codes.FailedPrecondition, "volume %s: its base %s is not a regular file (mode %#o): the box was tampered with, and nothing was mounted", box.ID(), box.BasePath(), stx.Mode&unix.S_IFMT)
	}
	dev := unix.Mkdev(stx.Dev_major, stx.Dev_minor)
	if haveOwned && owned.Dev == dev && owned.Ino == stx.Ino {
		return nil
	}
	if err := d.checkBaseIdentity(box, r, dev, stx.Ino); err != nil {
		return err
	}
	if haveOwned {
		if err := unix.Unlinkat(df.FD(), baseName, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("replace %s: %w", filepath.Join(dir, baseName), err)
		}
	}
	// Linking the descriptor links exactly the inode just checked, not
	// whatever the name leads to by now. The link is not made durable
	// here: lost in a power cut, it is made again at the next stage from
	// the box's own link, which pins the same base in the cache.
	if err := unix.Linkat(int(f.Fd()), "", df.FD(), baseName, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("link the base of volume %s into %s: %w", box.ID(), dir, err)
	}
	return nil
}

// mountOwnedBase mounts the plugin-owned base directory read-only on
// <box>/base, unless it is there already. root is the box's root.
func (d *Driver) mountOwnedBase(root *safeopen.Root, box layout.Box) error {
	src := d.ownedBaseDir(box.ID())
	// A box staged by an earlier release has its base file mounted on
	// base/rootfs.ext4. The staging and target paths have copies of it of
	// their own, so the box's one can go; left there, it would be hidden
	// under the new mount, where no path could reach it to unmount it.
	old, mounted, err := mountAt(root, relIn(box, box.BasePath()))
	if err != nil {
		return fmt.Errorf("volume %s: %w", box.ID(), err)
	}
	if mounted {
		err = detach(old, box.BasePath())
		old.Close()
		if err != nil {
			return err
		}
	}
	return mountReadOnlyAt(root, box, src, relIn(box, box.BaseDir()), unix.S_IFDIR)
}

// refreshManifest brings box.json up to date: the plugin-owned copy, and
// its read-only mount on the box's box.json. The box's own copy
// underneath is the one createBox wrote, which is what a reader of a box
// with no mounts sees (after a reboot, or an earlier release after a
// rollback); it is only rewritten if something other than a regular file
// is there, since a mount needs a file to cover. What a pod may have left
// there is never read. root is the box's root.
func (d *Driver) refreshManifest(root *safeopen.Root, box layout.Box, m *boxManifest) error {
	want, err := encodeManifest(m)
	if err != nil {
		return err
	}
	owned := d.ownedManifestPath(box.ID())
	if got, err := safeopen.ReadRegular(owned, int64(len(want))); err != nil || !bytes.Equal(got, want) {
		if err := writeManifest(filepath.Dir(owned), filepath.Base(owned), want, false); err != nil {
			return err
		}
	}
	mnt, mounted, err := mountAt(root, manifestName)
	if err != nil {
		return fmt.Errorf("volume %s: %w", box.ID(), err)
	}
	if mounted {
		// Mounted by an earlier stage: current if it shows the owned file,
		// otherwise it goes, and the current one is mounted instead.
		same, err := sameInode(mnt, owned)
		if err == nil && !same {
			err = detach(mnt, box.ManifestPath())
		}
		mnt.Close()
		if err != nil || same {
			return err
		}
	}
	if st, err := root.Lstat(manifestName); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		if err := writeManifest(box.Root(), manifestName, want, false); err != nil {
			return err
		}
	}
	return mountReadOnlyAt(root, box, owned, manifestName, unix.S_IFREG)
}

// rewriteOwnedManifest replaces the content of the plugin-owned box.json
// in place, keeping its inode. Staging and publish binds are private, so a
// new mount on box.json in the plugin's namespace would never reach the
// pods' views; every view mounts this one inode, so new content does. The
// content is written in one write at offset 0 and padded with spaces (valid
// JSON whitespace) to at least the old length, so the file never shrinks
// and a reader never sees a tail of the old content after the new. No
// owned copy (never staged) is fine: the next NodeStage writes it.
func (d *Driver) rewriteOwnedManifest(box layout.Box, m *boxManifest) error {
	want, err := encodeManifest(m)
	if err != nil {
		return err
	}
	owned := d.ownedManifestPath(box.ID())
	// Non-blocking: a pod whose root owns the file as the plugin does can
	// take a read lease on it through its read-only view, and an open for
	// writing would then wait out the lease-break time.
	f, err := os.OpenFile(owned, os.O_RDWR|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", owned, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", owned, err)
	}
	if pad := int(st.Size()) - len(want); pad > 0 {
		want = append(append(want[:len(want)-1], bytes.Repeat([]byte(" "), pad)...), '\n')
	}
	if _, err := f.WriteAt(want, 0); err != nil {
		return fmt.Errorf("rewrite %s: %w", owned, err)
	}
	return nil
}

// mountAt reports the mount whose root is at rel beneath root, if any.
func mountAt(root *safeopen.Root, rel string) (*os.File, bool, error) {
	f, err := root.OpenPath(rel)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	var stx unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, 0, &stx); err != nil {
		f.Close()
		return nil, false, fmt.Errorf("statx %s: %w", f.Name(), err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 || stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		f.Close()
		return nil, false, nil
	}
	return f, true, nil
}

// sameInode reports whether the open file f is the inode at path p.
func sameInode(f *os.File, p string) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return false, fmt.Errorf("fstat %s: %w", f.Name(), err)
	}
	if err := unix.Lstat(p, &b); err != nil {
		return false, fmt.Errorf("stat %s: %w", p, err)
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// detach lazily unmounts the mount whose root f is, through the
// descriptor, so that no path a pod could have changed is resolved.
func detach(f *os.File, what string) error {
	if err := unix.Unmount("/proc/self/fd/"+strconv.Itoa(int(f.Fd())), unix.MNT_DETACH); err != nil {
		return &os.PathError{Op: "unmount", Path: what, Err: err}
	}
	return nil
}

// mountReadOnlyAt bind-mounts src, a plugin-owned file or directory, on
// rel beneath the box root, read-only, in one step: src is cloned with
// open_tree, made read-only with mount_setattr while still detached, and
// attached with move_mount to a descriptor of the target opened without
// following links. There is no moment when the mount is writable, and no
// name a pod could swap in between. The target must be of type want (a
// directory or a regular file). If the target is already the root of a
// mount of src, that mount is made sure to be read-only and kept, which
// is what makes a retried stage cheap.
func mountReadOnlyAt(root *safeopen.Root, box layout.Box, src, rel string, want uint32) error {
	what := filepath.Join(box.Root(), rel)
	t, err := root.OpenPath(rel)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "volume %s: cannot open %s to mount on it: %v", box.ID(), what, err)
	}
	defer t.Close()
	var stx unix.Statx_t
	if err := unix.Statx(int(t.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_INO|unix.STATX_TYPE, &stx); err != nil {
		return fmt.Errorf("statx %s: %w", what, err)
	}
	if uint32(stx.Mode)&unix.S_IFMT != want {
		return status.Errorf(codes.FailedPrecondition, "volume %s: %s is not a %s (mode %#o): the box was tampered with, and nothing was mounted", box.ID(), what, typeName(want), stx.Mode&unix.S_IFMT)
	}
	var sst unix.Stat_t
	if err := unix.Lstat(src, &sst); err != nil {
		return fmt.Errorf("stat %s: %w", src, err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		if unix.Mkdev(stx.Dev_major, stx.Dev_minor) == sst.Dev && stx.Ino == sst.Ino {
			return mountSetReadOnly(int(t.Fd()), what)
		}
		return status.Errorf(codes.FailedPrecondition, "volume %s: something other than %s is mounted on %s; nothing was mounted", box.ID(), src, what)
	}
	sf, err := unix.Open(src, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: src, Err: err}
	}
	defer unix.Close(sf)
	tree, err := unix.OpenTree(sf, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return fmt.Errorf("open_tree %s: %w", src, err)
	}
	defer unix.Close(tree)
	if err := mountSetReadOnly(tree, src); err != nil {
		return err
	}
	if err := unix.MoveMount(tree, "", int(t.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount %s read-only onto %s: %w", src, what, err)
	}
	return nil
}

func typeName(mode uint32) string {
	if mode == unix.S_IFDIR {
		return "directory"
	}
	return "regular file"
}

// removeOwned removes a volume's plugin-owned files. The caller has
// unmounted them from the box, or removed the box.
func (d *Driver) removeOwned(id string) error {
	var errs []error
	for _, p := range []string{d.ownedBaseDir(id), d.ownedManifestPath(id)} {
		if err := sealed.RemoveAll(p); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// ownedID returns the volume ID a plugin-owned entry of the records
// directory belongs to, if name is one.
func ownedID(name string) (string, bool) {
	for _, s := range []string{ownedBaseSuffix, ownedManifestSuffix} {
		if id, ok := strings.CutSuffix(name, s); ok && id != "" && !strings.HasPrefix(id, ".") {
			return id, true
		}
	}
	return "", false
}

// relIn is p, a path inside the box, relative to the box root.
func relIn(box layout.Box, p string) string {
	rel, err := filepath.Rel(box.Root(), p)
	if err != nil {
		return p
	}
	return rel
}
