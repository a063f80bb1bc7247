package ext4

import (
	"errors"
	"fmt"
	"strings"
)

const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
	// whiteoutMeta prefixes AUFS bookkeeping files (.wh..wh.plnk, ...),
	// which OCI says to ignore.
	whiteoutMeta = ".wh..wh."

	// maxSymlinkHops is the kernel's MAXSYMLINKS.
	maxSymlinkHops = 40
	// maxDepth bounds directory nesting. No path deeper than PATH_MAX/2
	// components is usable anyway, and it keeps the recursive tree walks'
	// stack small on hostile input.
	maxDepth = 4096
)

// node is a name in the merged tree. A directory's node owns its inode.
// Other nodes may share an inode, which is how hard links are represented.
type node struct {
	name     string
	parent   *node // the root is its own parent
	inode    *inode
	children map[string]*node // directories only
	// layer is the last layer that created, replaced or walked through
	// this node. Whiteouts and opaque whiteouts use it to remove only what
	// is older than the current layer. What the current layer produced
	// stays, whatever the order of the entries in its tar.
	layer int
	depth int
}

// tree is the merged view of the layers applied so far.
type tree struct {
	root  *node
	layer int // layer currently being applied
	// implicitTime stamps directories that only exist because a deeper
	// entry needs them.
	implicitTime timestamp
	// freeData is called when the last name of a regular file goes away.
	freeData func(*inode)
}

func newTree(now timestamp, freeData func(*inode)) *tree {
	t := &tree{layer: -1, implicitTime: now, freeData: freeData}
	t.root = &node{inode: t.implicitDir(), children: map[string]*node{}, layer: -1}
	t.root.parent = t.root
	return t
}

func (t *tree) implicitDir() *inode {
	now := t.implicitTime
	return &inode{mode: sIFDIR | 0o755, atime: now, mtime: now, ctime: now}
}

// splitPath turns a tar entry name into components relative to the root.
// Leading "/" and "./" are dropped, and "." and ".." are resolved
// lexically. A name that climbs above the root is an error. Extracting it
// would write outside the image's tree, and silently re-rooting it could
// shadow a legitimate file.
func splitPath(name string) ([]string, error) {
	var comps []string
	for _, c := range strings.Split(name, "/") {
		switch c {
		case "", ".":
		case "..":
			if len(comps) == 0 {
				return nil, errors.New("path escapes the root")
			}
			comps = comps[:len(comps)-1]
		default:
			if len(c) > 255 {
				return nil, fmt.Errorf("name %.32q... longer than 255 bytes", c)
			}
			comps = append(comps, c)
		}
	}
	return comps, nil
}

// walkDir returns the directory named by comps. It follows the symlinks it
// meets on the way, but confines them to the root: an absolute target
// restarts from /, and ".." at the top stays there. Container runtimes
// resolve parents the same way when extracting. For example, an entry
// "lib/x" lands in "usr/lib/x" when a lower layer made "lib" a symlink to
// "usr/lib". With create set, walkDir makes missing directories (0755,
// owned by root) and marks every directory it passes as belonging to the
// current layer.
func (t *tree) walkDir(comps []string, create bool) (*node, error) {
	cur := t.root
	hops := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = cur.parent
			continue
		}
		child := cur.children[c]
		if child == nil {
			if !create {
				return nil, fmt.Errorf("directory %q does not exist", c)
			}
			var err error
			if child, err = t.add(cur, c, t.implicitDir()); err != nil {
				return nil, err
			}
		}
		if child.inode.isSymlink() {
			if hops++; hops > maxSymlinkHops {
				return nil, errors.New("too many levels of symbolic links")
			}
			target := child.inode.target
			if strings.HasPrefix(target, "/") {
				cur = t.root
			}
			comps = append(strings.Split(target, "/"), comps...)
			continue
		}
		if !child.inode.isDir() {
			return nil, fmt.Errorf("%q is not a directory", c)
		}
		if create {
			child.layer = t.layer
		}
		cur = child
	}
	return cur, nil
}

// lookup returns the node at comps without following a final symlink, or
// nil if there is none.
func (t *tree) lookup(comps []string) *node {
	if len(comps) == 0 {
		return t.root
	}
	dir, err := t.walkDir(comps[:len(comps)-1], false)
	if err != nil {
		return nil
	}
	return dir.children[comps[len(comps)-1]]
}

// add links a new name for in under parent. The name must be free.
func (t *tree) add(parent *node, name string, in *inode) (*node, error) {
	if parent.depth >= maxDepth {
		return nil, fmt.Errorf("directories nested deeper than %d", maxDepth)
	}
	n := &node{name: name, parent: parent, inode: in, layer: t.layer, depth: parent.depth + 1}
	if in.isDir() {
		n.children = map[string]*node{}
	} else {
		if in.links >= maxLinks {
			return nil, fmt.Errorf("more than %d hard links", maxLinks)
		}
		in.links++
	}
	parent.children[name] = n
	return n, nil
}

// put places in at parent/name with the OCI replacement rules. A directory
// over a directory merges with it: the existing children stay, and the new
// metadata wins. Anything else replaces whatever was there, including a
// whole subtree.
func (t *tree) put(parent *node, name string, in *inode) error {
	if old := parent.children[name]; old != nil {
		if old.inode.isDir() && in.isDir() {
			t.merge(old, in)
			return nil
		}
		t.remove(old)
	}
	_, err := t.add(parent, name, in)
	return err
}

// merge gives the existing directory dir the metadata of in, keeping its
// children.
func (t *tree) merge(dir *node, in *inode) {
	o := dir.inode
	o.mode, o.uid, o.gid = in.mode, in.uid, in.gid
	o.atime, o.mtime, o.ctime = in.atime, in.mtime, in.ctime
	o.xattrs = in.xattrs
	dir.layer = t.layer
}

// link makes parent/name another name for target's inode.
func (t *tree) link(parent *node, name string, target *node) error {
	old := parent.children[name]
	if old == target {
		old.layer = t.layer
		return nil
	}
	// Hold a reference to the inode while the old name goes away. The
	// target may live in the subtree being replaced, and must not be freed
	// with it.
	in := target.inode
	if in.links >= maxLinks {
		return fmt.Errorf("more than %d hard links", maxLinks)
	}
	in.links++
	if old != nil {
		t.remove(old)
	}
	in.links-- // drop the temporary reference; add takes the real one
	_, err := t.add(parent, name, in)
	return err
}

// whiteout hides parent/name as far as lower layers are concerned. What
// the current layer itself put there stays.
func (t *tree) whiteout(parent *node, name string) {
	n := parent.children[name]
	switch {
	case n == nil:
	case n.layer < t.layer:
		t.remove(n)
	case n.inode.isDir():
		t.opaque(n)
	}
}

// opaque removes everything lower layers put under dir, keeping what the
// current layer created or walked through.
func (t *tree) opaque(dir *node) {
	for _, c := range dir.children {
		t.whiteout(dir, c.name)
	}
}

func (t *tree) remove(n *node) {
	delete(n.parent.children, n.name)
	t.release(n)
}

func (t *tree) release(n *node) {
	for _, c := range n.children {
		t.release(c)
	}
	if in := n.inode; !in.isDir() {
		in.links--
		if in.links == 0 && t.freeData != nil {
			t.freeData(in)
		}
	}
}
