package rootfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// IsBaseOf reports whether the file with the given device and inode is a
// base in the cache for image digest, built by any builder version. The
// base of the current builder version is looked at first, with one stat;
// the directory is listed only for a box made by an older builder. A
// box's base/rootfs.ext4 is a hard link to such a file; checking the inode
// rather than the name is what stops a pod from swapping the link for a
// file of its choosing, or for a link to somewhere else on the host.
func (c *Cache) IsBaseOf(digest, builder string, dev, ino uint64) (bool, error) {
	k := Key{Digest: digest, Builder: builder}
	if err := k.Validate(); err != nil {
		return false, err
	}
	if ok, err := sameRegular(c.Path(k), dev, ino); err != nil || ok {
		return ok, err
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
		if ok, err := sameRegular(p, dev, ino); err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

// sameRegular reports whether p is a regular file with device dev and
// inode ino; a missing p is not an error.
func sameRegular(p string, dev, ino uint64) (bool, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		if os.IsNotExist(err) {
			return false, nil
		}
		return false, fmt.Errorf("rootfs: stat base %s: %w", p, err)
	}
	return st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Dev) == dev && st.Ino == ino, nil
}
