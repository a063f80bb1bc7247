package rootfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// IsBaseOf reports whether the file with the given device and inode is a
// base in the cache for image digest, built by any builder version. A
// box's base/rootfs.ext4 is a hard link to such a file; checking the inode
// rather than the name is what stops a pod from swapping the link for a
// file of its choosing, or for a link to somewhere else on the host.
func (c *Cache) IsBaseOf(digest string, dev, ino uint64) (bool, error) {
	if err := (Key{Digest: digest, Builder: "x"}).Validate(); err != nil {
		return false, err
	}
	dir := c.cfg.Home.Images().DiskImagesDir()
	prefix := "sha256-" + strings.TrimPrefix(digest, "sha256:") + "."
	names, err := filepath.Glob(filepath.Join(dir, prefix+"*.ext4"))
	if err != nil {
		return false, err
	}
	for _, p := range names {
		if _, ok := parseFileName(filepath.Base(p)); !ok {
			continue
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			if os.IsNotExist(err) {
				continue
			}
			return false, fmt.Errorf("rootfs: stat base %s: %w", p, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Dev) == dev && st.Ino == ino {
			return true, nil
		}
	}
	return false, nil
}
