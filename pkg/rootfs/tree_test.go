package rootfs

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
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
)

// dirTree reads a mounted filesystem back as a testimage.Tree, skipping
// lost+found (ext4's, not the image's).
func dirTree(t *testing.T, root string) testimage.Tree {
	t.Helper()
	tree := testimage.Tree{}
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
		e := testimage.Entry{
			Mode: st.Mode & 0o7777, UID: int(st.Uid), GID: int(st.Gid),
			ModTime: time.Unix(st.Mtim.Unix()),
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			e.Type = testimage.TypeDir
		case unix.S_IFREG:
			e.Type, e.Size, e.Nlink = testimage.TypeFile, st.Size, int(st.Nlink)
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			e.SHA256 = hex.EncodeToString(sum[:])
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
			e.Type, e.Nlink = testimage.TypeSymlink, 1
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			e.Type = testimage.TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				e.Type = testimage.TypeBlock
			}
			e.Nlink, e.DevMajor, e.DevMinor = 1, int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			e.Type, e.Nlink = testimage.TypeFIFO, 1
		}
		e.Xattrs = xattrs(t, p)
		tree[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

func xattrs(t *testing.T, p string) map[string][]byte {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return nil
	}
	out := map[string][]byte{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		out[name] = v[:m]
	}
	return out
}

// exportTree flattens img the way `crane export` does (go-containerregistry's
// mutate.Extract) and reads the result as a Tree. Hard links become a
// LinkGroup; link counts are the group sizes.
func exportTree(t *testing.T, img v1.Image) testimage.Tree {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	tree := testimage.Tree{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := path.Clean("/" + h.Name)
		if p == "/" {
			continue
		}
		e := testimage.Entry{Mode: uint32(h.Mode) & 0o7777, UID: h.Uid, GID: h.Gid, ModTime: h.ModTime, Nlink: 1}
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
			e.Type, e.Nlink = testimage.TypeDir, 0
		case tar.TypeReg:
			e.Type, e.Size = testimage.TypeFile, h.Size
			hs := sha256.New()
			if _, err := io.Copy(hs, tr); err != nil {
				t.Fatal(err)
			}
			e.SHA256 = hex.EncodeToString(hs.Sum(nil))
		case tar.TypeLink:
			target := tree[path.Clean("/"+h.Linkname)]
			group := target.LinkGroup
			if group == "" {
				group = path.Clean("/" + h.Linkname)
				target.LinkGroup = group
				tree[group] = target
			}
			e = target
			e.LinkGroup = group
		case tar.TypeSymlink:
			e.Type, e.Link = testimage.TypeSymlink, h.Linkname
			e.Mode = 0o777 // Linux ignores symlink modes; extraction gives 0777
		case tar.TypeChar, tar.TypeBlock:
			e.Type = testimage.TypeChar
			if h.Typeflag == tar.TypeBlock {
				e.Type = testimage.TypeBlock
			}
			e.DevMajor, e.DevMinor = h.Devmajor, h.Devminor
		case tar.TypeFifo:
			e.Type = testimage.TypeFIFO
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
	return tree
}

// diffTrees lists every difference between want and got. Directory mtimes
// are only compared where want has one (implicit parents have none), and a
// directory's link count is not compared.
func diffTrees(want, got testimage.Tree) []string {
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
		check("mode", fmt.Sprintf("%o", w.Mode), fmt.Sprintf("%o", g.Mode))
		check("owner", fmt.Sprint(w.UID, ":", w.GID), fmt.Sprint(g.UID, ":", g.GID))
		check("link target", w.Link, g.Link)
		check("sha256", w.SHA256, g.SHA256)
		check("size", w.Size, g.Size)
		check("device", fmt.Sprint(w.DevMajor, ",", w.DevMinor), fmt.Sprint(g.DevMajor, ",", g.DevMinor))
		check("xattrs", xattrString(w.Xattrs), xattrString(g.Xattrs))
		if w.Type != testimage.TypeDir {
			check("nlink", w.Nlink, g.Nlink)
			check("hard-link group", w.LinkGroup != "", g.LinkGroup != "")
		}
		if w.Type != testimage.TypeSymlink && !w.ModTime.IsZero() {
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
		// POSIX ACLs are stored in ext4's own encoding and come back
		// through the kernel re-encoded; compare names only.
		if strings.HasPrefix(k, "system.posix_acl") {
			v = nil
		}
		parts = append(parts, k+"="+hex.EncodeToString(v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}
