// Package mountinfo reads /proc/self/mountinfo with its paths decoded.
// The kernel writes a space in a path as \040 (a tab, a newline and a
// backslash likewise), which mount-utils leaves in place; a pod can name a
// directory in its box with any of them, so every comparison of mount
// paths must be made on decoded ones.
package mountinfo

import (
	"fmt"
	"strconv"
	"strings"

	mount "k8s.io/mount-utils"
)

// Read parses /proc/self/mountinfo and decodes each mount point and root.
func Read() ([]mount.MountInfo, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read /proc/self/mountinfo: %w", err)
	}
	for i := range infos {
		infos[i].MountPoint = Unescape(infos[i].MountPoint)
		infos[i].Root = Unescape(infos[i].Root)
	}
	return infos, nil
}

// Unescape decodes the kernel's three-digit octal escapes in a path.
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
