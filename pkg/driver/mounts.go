package driver

import (
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// boxMounts reads from the kernel where a box is mounted: targets outside
// the box that show it (staging and publish paths), and whether its base
// is bind-mounted read-only in place. Nothing is remembered between calls,
// so this is right after a restart too.
type boxMounts struct {
	outside     []string
	baseMounted bool
}

func readBoxMounts(box layout.Box) (boxMounts, error) {
	var res boxMounts
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return res, fmt.Errorf("read mounts: %w", err)
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
		switch {
		case mi.MountPoint == box.BasePath():
			res.baseMounted = true
		case within(mi.MountPoint, box.Root()):
			// Some other mount inside the box: part of the box, not a user.
		default:
			res.outside = append(res.outside, mi.MountPoint)
		}
	}
	return res, nil
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}
