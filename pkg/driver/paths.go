package driver

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// maxPathLen bounds staging and target paths (PATH_MAX).
const maxPathLen = 4096

// checkPath refuses a path the driver should never mount on: relative,
// unclean (a ".." could climb out of the kubelet directory), with a NUL,
// or absurdly long.
func checkPath(what, p string) error {
	switch {
	case p == "":
		return invalid("%s is required", what)
	case len(p) > maxPathLen:
		return invalid("%s is %d bytes, at most %d allowed", what, len(p), maxPathLen)
	case strings.ContainsRune(p, 0):
		return invalid("%s %q contains NUL", what, p)
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return invalid("%s %q must be an absolute, clean path", what, p)
	}
	return nil
}

// checkMountPath is checkPath for a path the driver creates, mounts on,
// unmounts or removes. On top, no existing component may be a symbolic
// link. Kubelet creates these paths as plain directories, so a link in one
// was planted to lead the driver out of the kubelet directory (to bind
// mount over /etc, or to remove someone else's directory). A node whose
// kubelet directory is itself reached through a link must give kubelet
// its real path.
func checkMountPath(what, p string) error {
	if err := checkPath(what, p); err != nil {
		return err
	}
	for q := p; ; q = filepath.Dir(q) {
		// Missing components are fine (they are created as directories);
		// any other error surfaces where the path is used.
		if fi, err := os.Lstat(q); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
			return invalid("%s %q: %s is a symbolic link, which could lead out of the kubelet directory", what, p, q)
		}
		if q == "/" {
			return nil
		}
	}
}
