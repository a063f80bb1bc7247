package testimage

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// FromDir reads a mounted filesystem back as a Tree, as a guest would see
// it. ext4's own lost+found is skipped.
func FromDir(root string) (Tree, error) {
	tree := Tree{}
	inodes := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, root), "/")
		if rel == "/" {
			return nil
		}
		if rel == "/lost+found" {
			return filepath.SkipDir
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		e := Entry{Mode: st.Mode & 0o7777, UID: int(st.Uid), GID: int(st.Gid), ModTime: time.Unix(st.Mtim.Unix())}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			e.Type = TypeDir
		case unix.S_IFREG:
			e.Type, e.Size, e.Nlink = TypeFile, st.Size, int(st.Nlink)
			sum, err := fileSHA256(p)
			if err != nil {
				return err
			}
			e.SHA256 = sum
			if first, ok := inodes[st.Ino]; ok {
				e.LinkGroup = first
				if g := tree[first]; g.LinkGroup == "" {
					g.LinkGroup = first
					tree[first] = g
				}
			} else {
				inodes[st.Ino] = rel
			}
		case unix.S_IFLNK:
			e.Type, e.Nlink = TypeSymlink, 1
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			e.Type = TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				e.Type = TypeBlock
			}
			e.Nlink, e.DevMajor, e.DevMinor = 1, int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			e.Type, e.Nlink = TypeFIFO, 1
		}
		if e.Xattrs, err = xattrsOf(p); err != nil {
			return err
		}
		tree[rel] = e
		return nil
	})
	return tree, err
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func xattrsOf(p string) (map[string][]byte, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return nil, nil
	}
	out := map[string][]byte{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		out[name] = v[:m]
	}
	return out, nil
}

// FromTar reads a flattened image tar (go-containerregistry's
// mutate.Extract, which is what `crane export` prints) as a Tree. Hard
// links become a LinkGroup; link counts are the group sizes.
func FromTar(r io.Reader) (Tree, error) {
	tr := tar.NewReader(r)
	tree := Tree{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		p := path.Clean("/" + h.Name)
		if p == "/" {
			continue
		}
		e := Entry{Mode: uint32(h.Mode) & 0o7777, UID: h.Uid, GID: h.Gid, ModTime: h.ModTime, Nlink: 1}
		for k, v := range h.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if e.Xattrs == nil {
					e.Xattrs = map[string][]byte{}
				}
				e.Xattrs[name] = []byte(v)
			}
		}
		switch h.Typeflag {
		case tar.TypeDir:
			e.Type, e.Nlink = TypeDir, 0
		case tar.TypeReg:
			hs := sha256.New()
			n, err := io.Copy(hs, tr)
			if err != nil {
				return nil, err
			}
			e.Type, e.Size, e.SHA256 = TypeFile, n, hex.EncodeToString(hs.Sum(nil))
		case tar.TypeLink:
			tp := path.Clean("/" + h.Linkname)
			target, ok := tree[tp]
			if !ok {
				return nil, fmt.Errorf("hard link %s to %s, which is not in the tar before it", p, tp)
			}
			if target.LinkGroup == "" {
				target.LinkGroup = tp
				tree[tp] = target
			}
			e = target
		case tar.TypeSymlink:
			e.Type, e.Link = TypeSymlink, h.Linkname
		case tar.TypeChar, tar.TypeBlock:
			e.Type = TypeChar
			if h.Typeflag == tar.TypeBlock {
				e.Type = TypeBlock
			}
			e.DevMajor, e.DevMinor = h.Devmajor, h.Devminor
		case tar.TypeFifo:
			e.Type = TypeFIFO
		default:
			return nil, fmt.Errorf("%s: unexpected tar type %q", p, h.Typeflag)
		}
		tree[p] = e
	}
	groups := map[string]int{}
	for _, e := range tree {
		if e.LinkGroup != "" {
			groups[e.LinkGroup]++
		}
	}
	for p, e := range tree {
		if e.LinkGroup != "" {
			e.Nlink = groups[e.LinkGroup]
			tree[p] = e
		}
	}
	return tree, nil
}

// Diff lists every difference between want and got, sorted. A directory's
// link count is not compared, nor a directory mtime want does not set
// (implicit parents), nor a symlink's mode (Linux ignores it) or mtime.
// POSIX ACL xattrs are compared by name only: the kernel re-encodes them.
func Diff(want, got Tree) []string {
	var diffs []string
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			diffs = append(diffs, "missing "+p)
			continue
		}
		check := func(field string, a, b any) {
			if fmt.Sprint(a) != fmt.Sprint(b) {
				diffs = append(diffs, fmt.Sprintf("%s %s: want %v, got %v", p, field, a, b))
			}
		}
		check("type", w.Type, g.Type)
		if w.Type != TypeSymlink {
			check("mode", fmt.Sprintf("%o", w.Mode), fmt.Sprintf("%o", g.Mode))
		}
		check("owner", fmt.Sprint(w.UID, ":", w.GID), fmt.Sprint(g.UID, ":", g.GID))
		check("link target", w.Link, g.Link)
		check("sha256", w.SHA256, g.SHA256)
		check("size", w.Size, g.Size)
		check("device", fmt.Sprint(w.DevMajor, ",", w.DevMinor), fmt.Sprint(g.DevMajor, ",", g.DevMinor))
		check("xattrs", xattrString(w.Xattrs), xattrString(g.Xattrs))
		if w.Type != TypeDir {
			check("nlink", w.Nlink, g.Nlink)
			check("hard-link group", w.LinkGroup != "", g.LinkGroup != "")
		}
		if w.Type != TypeSymlink && !w.ModTime.IsZero() {
			check("mtime", w.ModTime.UTC().Format(time.RFC3339Nano), g.ModTime.UTC().Format(time.RFC3339Nano))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, "unexpected "+p)
		}
	}
	sort.Strings(diffs)
	return diffs
}

func xattrString(m map[string][]byte) string {
	var parts []string
	for k, v := range m {
		if strings.HasPrefix(k, "system.posix_acl") {
			v = nil
		}
		parts = append(parts, k+"="+hex.EncodeToString(v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}
