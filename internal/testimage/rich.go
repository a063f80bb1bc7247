package testimage

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// EntryType is the kind of a tree entry.
type EntryType string

// Entry types.
const (
	TypeDir     EntryType = "dir"
	TypeFile    EntryType = "file"
	TypeSymlink EntryType = "symlink"
	TypeChar    EntryType = "char"
	TypeBlock   EntryType = "block"
	TypeFIFO    EntryType = "fifo"
)

// Entry is one path of a flattened image.
type Entry struct {
	Type EntryType
	// Mode is the permission bits including setuid (04000), setgid (02000)
	// and sticky (01000); no file-type bits.
	Mode     uint32
	UID, GID int
	// Size and SHA256 (hex) of a regular file's content.
	Size   int64
	SHA256 string
	// Link is a symlink's target.
	Link string
	// Nlink is the link count of regular files (hard links), 1 for
	// symlinks, devices and FIFOs, 0 (unchecked) for directories.
	Nlink int
	// LinkGroup is the first path of a set of hard links; entries with the
	// same non-empty LinkGroup are the same inode.
	LinkGroup string
	// Xattrs holds extended attributes (from PAX SCHILY.xattr. records).
	Xattrs map[string][]byte
	// ModTime, with nanoseconds.
	ModTime            time.Time
	DevMajor, DevMinor int64
}

// Tree is a flattened image: absolute slash paths ("/etc/passwd") to
// entries. The root directory is not included.
type Tree map[string]Entry

// Xattr values of the Rich image.
var (
	// XattrCapability is a VFS_CAP_REVISION_2 security.capability value
	// (effective, CAP_NET_BIND_SERVICE permitted).
	XattrCapability = []byte{
		0x01, 0x00, 0x00, 0x02, // magic_etc: revision 2 | effective
		0x00, 0x04, 0x00, 0x00, // permitted[0]: bit 10
		0x00, 0x00, 0x00, 0x00, // inheritable[0]
		0x00, 0x00, 0x00, 0x00, // permitted[1]
		0x00, 0x00, 0x00, 0x00, // inheritable[1]
	}
	// XattrBig is a 600-byte value: too big to fit in an ext4 inode.
	XattrBig = []byte(strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyz-_", 16)[:600])
)

// LongSymlinkTarget is longer than the 60 bytes of an ext4 fast symlink.
const LongSymlinkTarget = "/usr/lib/a-rather-long-directory-name-for-testing/and-another-level/target-file"

// richBase is the first mtime; entries step by 1.5 s.
var richBase = time.Date(2023, 5, 6, 7, 8, 9, 123456789, time.UTC)

type richSpec struct {
	path   string // absolute
	typ    byte   // tar type flag
	mode   int64
	uid    int
	body   string
	link   string // symlink target or hardlink target (absolute)
	xattrs map[string]string
	major  int64
	minor  int64
}

// The two layers of Rich, in tar order. Layer 2 removes /a/gone (a
// whiteout), /gonedir (a whited-out directory) and the layer-1 content
// of /opq (an opaque directory that has entries in both layers), adds
// /a/added and /opq/new and replaces /over.
var richLayers = [][]richSpec{
	{
		{path: "/a", typ: tar.TypeDir, mode: 0o755},
		{path: "/a/keep", typ: tar.TypeReg, mode: 0o644, body: "kept from layer 1\n"},
		{path: "/a/gone", typ: tar.TypeReg, mode: 0o644, body: "whited out by layer 2\n"},
		{path: "/gonedir", typ: tar.TypeDir, mode: 0o755},
		{path: "/gonedir/child", typ: tar.TypeReg, mode: 0o644, body: "in a whited-out directory\n"},
		{path: "/opq", typ: tar.TypeDir, mode: 0o755},
		{path: "/opq/old", typ: tar.TypeReg, mode: 0o644, body: "hidden by the opaque marker\n"},
		{path: "/opq/sub", typ: tar.TypeDir, mode: 0o755},
		{path: "/opq/sub/deep", typ: tar.TypeReg, mode: 0o644, body: "also hidden\n"},
		{path: "/over", typ: tar.TypeReg, mode: 0o644, body: "version one\n"},
		{path: "/empty", typ: tar.TypeReg, mode: 0o644},
		{path: "/hl", typ: tar.TypeDir, mode: 0o755},
		{path: "/hl/orig", typ: tar.TypeReg, mode: 0o644, body: "three names, one inode\n"},
		{path: "/hl/link1", typ: tar.TypeLink, link: "/hl/orig"},
		{path: "/hl/link2", typ: tar.TypeLink, link: "/hl/orig"},
		{path: "/hl/pair-a", typ: tar.TypeReg, mode: 0o600, body: "two names\n"},
		{path: "/hl/pair-b", typ: tar.TypeLink, link: "/hl/pair-a"},
		{path: "/usr", typ: tar.TypeDir, mode: 0o755},
		{path: "/usr/bin", typ: tar.TypeDir, mode: 0o755},
		{path: "/usr/bin/suid", typ: tar.TypeReg, mode: 0o4755, body: "#!/bin/sh\nid -u\n"},
		{path: "/usr/bin/short", typ: tar.TypeSymlink, mode: 0o777, link: "suid"},
		{path: "/usr/lib", typ: tar.TypeDir, mode: 0o755},
		{path: "/usr/lib/long", typ: tar.TypeSymlink, mode: 0o777, link: LongSymlinkTarget},
		{path: "/home", typ: tar.TypeDir, mode: 0o755},
		{path: "/home/user", typ: tar.TypeDir, mode: 0o750, uid: 1000},
		{path: "/home/user/notes.txt", typ: tar.TypeReg, mode: 0o640, uid: 1000, body: "owned by 1000:1000\n"},
		{path: "/x", typ: tar.TypeDir, mode: 0o755},
		{path: "/x/xattrs", typ: tar.TypeReg, mode: 0o755, body: "has extended attributes\n", xattrs: map[string]string{
			"user.test":           "hello",
			"security.capability": string(XattrCapability),
			"user.big":            string(XattrBig),
		}},
		{path: "/dev", typ: tar.TypeDir, mode: 0o755},
		{path: "/dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		{path: "/run", typ: tar.TypeDir, mode: 0o755},
		{path: "/run/fifo", typ: tar.TypeFifo, mode: 0o600},
	},
	{
		{path: "/a", typ: tar.TypeDir, mode: 0o755},
		{path: "/a/.wh.gone", typ: tar.TypeReg, mode: 0o644},
		{path: "/a/added", typ: tar.TypeReg, mode: 0o644, body: "added in layer 2\n"},
		{path: "/.wh.gonedir", typ: tar.TypeReg, mode: 0o644},
		{path: "/opq", typ: tar.TypeDir, mode: 0o711},
		{path: "/opq/.wh..wh..opq", typ: tar.TypeReg, mode: 0o644},
		{path: "/opq/new", typ: tar.TypeReg, mode: 0o644, body: "the only entry of /opq\n"},
		{path: "/over", typ: tar.TypeReg, mode: 0o600, body: "version two, longer\n"},
	},
}

// richMtime is the mtime of the i-th spec of layer l.
func richMtime(l, i int) time.Time {
	return richBase.Add(time.Duration(l*1000+i) * 1500 * time.Millisecond)
}

// Rich is a two-layer image exercising whiteouts, an opaque directory,
// hard links (link counts 3 and 2), short and long symlinks, setuid, uid
// and gid 1000, xattrs (user.test, security.capability, a 600-byte
// user.big), a character device, a FIFO, an empty file, and mtimes with
// nanoseconds. RichTree is what it must flatten to.
func Rich(t testing.TB) v1.Image {
	t.Helper()
	var layers []v1.Layer
	for l, specs := range richLayers {
		var entries []tarEntry
		for i, s := range specs {
			h := tar.Header{
				Typeflag: s.typ,
				Name:     strings.TrimPrefix(s.path, "/"),
				Mode:     s.mode,
				Uid:      s.uid,
				Gid:      s.uid,
				ModTime:  richMtime(l, i),
				Devmajor: s.major,
				Devminor: s.minor,
			}
			if s.uid != 0 {
				h.Uname, h.Gname = "user", "user"
			}
			switch s.typ {
			case tar.TypeDir:
				h.Name += "/"
			case tar.TypeSymlink:
				h.Linkname = s.link
			case tar.TypeLink:
				h.Linkname = strings.TrimPrefix(s.link, "/")
			}
			if len(s.xattrs) > 0 {
				h.PAXRecords = map[string]string{}
				for k, v := range s.xattrs {
					h.PAXRecords["SCHILY.xattr."+k] = v
				}
			}
			entries = append(entries, tarEntry{hdr: h, body: []byte(s.body)})
		}
		layers = append(layers, tarLayer(t, entries))
	}
	return build(t, v1.Config{
		Env:        []string{"PATH=/usr/bin:/bin"},
		Cmd:        []string{"/usr/bin/suid"},
		WorkingDir: "/home/user",
		User:       "1000:1000",
	}, layers...)
}

// RichTree is the flattened tree of Rich, written out by hand from the
// layer specs (layer 2's whiteouts applied explicitly), not computed by a
// general layer applier.
func RichTree() Tree {
	tree := Tree{}
	add := func(l, i int, s richSpec) {
		e := Entry{Mode: uint32(s.mode), UID: s.uid, GID: s.uid, ModTime: richMtime(l, i)}
		switch s.typ {
		case tar.TypeDir:
			e.Type = TypeDir
		case tar.TypeReg:
			e.Type, e.Nlink = TypeFile, 1
			sum := sha256.Sum256([]byte(s.body))
			e.Size, e.SHA256 = int64(len(s.body)), hex.EncodeToString(sum[:])
		case tar.TypeSymlink:
			e.Type, e.Nlink, e.Link = TypeSymlink, 1, s.link
		case tar.TypeChar:
			e.Type, e.Nlink, e.DevMajor, e.DevMinor = TypeChar, 1, s.major, s.minor
		case tar.TypeFifo:
			e.Type, e.Nlink = TypeFIFO, 1
		case tar.TypeLink:
			e = tree[s.link] // same inode as the target
		}
		if len(s.xattrs) > 0 {
			e.Xattrs = map[string][]byte{}
			for k, v := range s.xattrs {
				e.Xattrs[k] = []byte(v)
			}
		}
		tree[s.path] = e
	}
	for i, s := range richLayers[0] {
		add(0, i, s)
	}
	// Layer 2, by hand.
	for _, p := range []string{"/a/gone", "/gonedir", "/gonedir/child", "/opq/old", "/opq/sub", "/opq/sub/deep"} {
		delete(tree, p)
	}
	for i, s := range richLayers[1] {
		if strings.Contains(s.path, "/.wh.") {
			continue
		}
		add(1, i, s)
	}
	// Hard links.
	for _, group := range [][]string{{"/hl/orig", "/hl/link1", "/hl/link2"}, {"/hl/pair-a", "/hl/pair-b"}} {
		for _, p := range group {
			e := tree[p]
			e.Nlink, e.LinkGroup = len(group), group[0]
			e.Xattrs = maps.Clone(e.Xattrs)
			tree[p] = e
		}
	}
	return tree
}
