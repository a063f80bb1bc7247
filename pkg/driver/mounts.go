package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/internal/mountinfo"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// boxMounts reads from the kernel where a box is mounted: the targets
// outside the box that show it (staging and publish paths). Nothing is
// remembered between calls, so this is right after a restart too.
type boxMounts struct {
	outside []string
}

func readBoxMounts(box layout.Box) (boxMounts, error) {
	var res boxMounts
	infos, err := mountinfo.Read()
	if err != nil {
		return res, err
	}
	var st unix.Stat_t
	if err := unix.Stat(box.Root(), &st); err != nil {
		return res, fmt.Errorf("stat box %s: %w", box.Root(), err)
	}
	major, minor := int(unix.Major(st.Dev)), int(unix.Minor(st.Dev))

	// Find how the box directory is named inside its filesystem: the
	// mountinfo "root" of any mount that shows the box starts with it.
	var via *mount.MountInfo
	for i := range infos {
		mi := &infos[i]
		if mi.Major == major && mi.Minor == minor && within(box.Root(), mi.MountPoint) &&
			(via == nil || len(mi.MountPoint) > len(via.MountPoint)) {
			via = mi
		}
	}
	if via == nil {
		return res, fmt.Errorf("no mount of device %d:%d holds %s", major, minor, box.Root())
	}
	rel, _ := filepath.Rel(via.MountPoint, box.Root())
	rootInFS := filepath.Join(via.Root, rel)

	for _, mi := range infos {
		if mi.Major != major || mi.Minor != minor || !within(mi.Root, rootInFS) {
			continue
		}
		// A mount inside the box (its base) is part of the box, not a user.
		if !within(mi.MountPoint, box.Root()) {
			res.outside = append(res.outside, mi.MountPoint)
		}
	}
	return res, nil
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// publishedElsewhere returns a mount of the box that is neither the
// staging path nor the target (nor nested in them), if there is one.
func publishedElsewhere(box layout.Box, staging, target string) (string, error) {
	mounts, err := readBoxMounts(box)
	if err != nil {
		return "", err
	}
	for _, m := range mounts.outside {
		if !within(m, staging) && !within(m, target) {
			return m, nil
		}
	}
	return "", nil
}

// bindOnce rbind-mounts src on target unless target is mounted already,
// which is what makes NodeStage and NodePublish idempotent. A corrupted
// mount (its source vanished) is replaced. For a read-only bind that is
// already there it repairs the crash window between the bind and its
// read-only remount, rather than confirm a writable bind.
func (d *Driver) bindOnce(src, target string, readOnly bool) error {
	mounted, err := d.mounter.isMountPoint(target)
	switch {
	case err != nil && !mount.IsCorruptedMnt(err):
		return fmt.Errorf("check %s: %w", target, err)
	case err == nil && mounted:
		if readOnly {
			return d.mounter.ensureReadOnly(target)
		}
		return nil
	case err != nil:
		_ = d.mounter.Unmount(target)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return err
	}
	opts := []string{"rbind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	return d.mounter.Mount(src, target, "", opts)
}

// unmount detaches whatever is mounted at p (a corrupted mount included)
// and, if remove is set, removes the then-empty directory. A path that is
// not mounted or does not exist is fine: kubelet retries these calls and
// must never be told NotFound (kubernetes/kubernetes#90752).
func (d *Driver) unmount(p string, remove bool) error {
	mounted, err := d.mounter.isMountPoint(p)
	switch {
	case err != nil && mount.IsCorruptedMnt(err):
		mounted = true
	case err != nil:
		return fmt.Errorf("check %s: %w", p, err)
	}
	if mounted {
		if err := d.mounter.Unmount(p); err != nil && !errors.Is(err, unix.EINVAL) {
			return err
		}
	}
	if remove {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", p, err)
		}
	}
	return nil
}
