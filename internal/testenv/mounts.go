package testenv

import (
	"fmt"
	"sort"
	"strings"
	"syscall"

	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/internal/mountinfo"
)

// Within reports whether p is dir or lies below it.
func Within(p, dir string) bool {
	d := strings.TrimSuffix(dir, "/")
	return p == dir || p == d || strings.HasPrefix(p, d+"/")
}

// MountsUnder lists the mounts at or below any of dirs, one entry per
// mount (a path mounted twice appears twice), deepest first.
func MountsUnder(dirs ...string) ([]mount.MountInfo, error) {
	infos, err := mountinfo.Read()
	if err != nil {
		return nil, err
	}
	var out []mount.MountInfo
	for _, mi := range infos {
		for _, d := range dirs {
			if Within(mi.MountPoint, d) {
				out = append(out, mi)
				break
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		return strings.Count(out[i].MountPoint, "/") > strings.Count(out[j].MountPoint, "/")
	})
	return out, nil
}

// UnmountAll detaches everything at or below dir, deepest first, so that a
// failed test leaves no mounts to poison the next one. It tries a plain
// unmount first and detaches lazily only when that keeps failing, as a
// mount still busy in a dying process would otherwise survive it.
func UnmountAll(dir string) error {
	for i := range 5 {
		ms, err := MountsUnder(dir)
		if err != nil {
			return err
		}
		if len(ms) == 0 {
			return nil
		}
		for _, m := range ms {
			if err := syscall.Unmount(m.MountPoint, 0); err != nil && i >= 2 {
				_ = syscall.Unmount(m.MountPoint, syscall.MNT_DETACH)
			}
		}
	}
	ms, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	if len(ms) > 0 {
		left := make([]string, len(ms))
		for i, m := range ms {
			left[i] = m.MountPoint
		}
		return fmt.Errorf("still mounted after 5 rounds of unmounting: %v", left)
	}
	return nil
}
