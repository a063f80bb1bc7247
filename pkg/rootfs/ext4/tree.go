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

// nodeID and inodeID index the tree's nodes and inodes. 0 means none.
type (
	nodeID  uint32
	inodeID uint32
)

// node is a name in the merged tree. A directory's node owns its inode.
// Other nodes may share an inode, which is how hard links are represented.
type node struct {
	nameOff uint32 // the name, in tree.names
	parent  nodeID // the root is its own parent
	inode   inodeID
	// A directory's children form a doubly linked list, in no particular
	// order; tree.index finds a child by name.
	first, prev, next nodeID
	// layer is the last layer that created, replaced or walked through
	// this node. Whiteouts and opaque whiteouts use it to remove only what
	// is older than the current layer. What the current layer produced
	// stays, whatever the order of the entries in its tar.
	layer   int32
	depth   uint16
	nameLen uint8
}

// tree is the merged view of the layers applied so far.
type tree struct {
	nodes  store[node]
	inodes store[inode]
	// extras holds what few inodes have (symlink targets, device numbers,
	// xattrs, extent-tree blocks), so that the common inode stays small.
	extras store[inodeExtra]
	names  nameArena
	index  childIndex
	root   nodeID
	layer  int32 // layer currently being applied
	// implicitTime stamps directories that only exist because a deeper
	// entry needs them.
	implicitTime timestamp
	// implicit counts those directories. Like entries they cost memory,
	// so they count toward MaxFiles.
	implicit int64
	// freeData is called when the last name of a regular file goes away.
	freeData func(*inode)
}

func newTree(now timestamp, freeData func(*inode)) *tree {
	t := &tree{layer: -1, implicitTime: now, freeData: freeData, index: newChildIndex()}
	t.root = nodeID(t.nodes.add(node{inode: t.newInode(t.implicitDir(), nil), layer: -1}))
	t.node(t.root).parent = t.root
	return t
}

func (t *tree) node(id nodeID) *node     { return t.nodes.at(uint32(id)) }
func (t *tree) inode(id inodeID) *inode  { return t.inodes.at(uint32(id)) }
func (t *tree) name(n *node) []byte      { return t.names.get(n.nameOff, n.nameLen) }
func (t *tree) inodeOf(id nodeID) *inode { return t.inode(t.node(id).inode) }

// newInode stores in, and x if it holds anything.
func (t *tree) newInode(in inode, x *inodeExtra) inodeID {
	if x != nil && !x.empty() {
		in.extra = t.extras.add(*x)
	}
	return inodeID(t.inodes.add(in))
}

// extra returns in's extra fields, or nil if it has none.
func (t *tree) extra(in *inode) *inodeExtra {
	if in.extra == 0 {
		return nil
	}
	return t.extras.at(in.extra)
}

// extraFor returns in's extra fields, adding them if it has none.
func (t *tree) extraFor(in *inode) *inodeExtra {
	if in.extra == 0 {
		in.extra = t.extras.add(inodeExtra{})
	}
	return t.extras.at(in.extra)
}

func (t *tree) xattrs(in *inode) []xattr {
	if x := t.extra(in); x != nil {
		return x.xattrs
	}
	return nil
}

func (t *tree) target(in *inode) string {
	if x := t.extra(in); x != nil {
		return x.target
	}
	return ""
}

func (t *tree) implicitDir() inode {
	now := t.implicitTime
	return inode{mode: sIFDIR | 0o755, atime: now, mtime: now, ctime: now}
}

// child returns the node named name in dir, or 0.
func (t *tree) child(dir nodeID, name string) nodeID {
	_, id := t.index.find(t, dir, name)
	return id
}

// splitPath turns a tar entry name into components relative to the root.
// Leading "/" and "./" are dropped, and "." and ".." are resolved
// lexically. A name that climbs above the root is an error. Extracting it
// would write outside the image's tree, and silently re-rooting it could
// shadow a legitimate file.
func splitPath(name string) ([]string, error) {
	return appendPath(nil, name)
}

// appendPath is splitPath appending to comps, so that a caller can reuse
// one slice for every entry.
func appendPath(comps []string, name string) ([]string, error) {
	base := len(comps)
	for rest, more := name, true; more; {
		var c string
		c, rest, more = strings.Cut(rest, "/")
		switch c {
		case "", ".":
		case "..":
			if len(comps) == base {
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
func (t *tree) walkDir(comps []string, create bool) (nodeID, error) {
	cur := t.root
	hops := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = t.node(cur).parent
			continue
		}
		child := t.child(cur, c)
		if child == 0 {
			if !create {
				return 0, fmt.Errorf("directory %q does not exist", c)
			}
			var err error
			if child, err = t.add(cur, c, t.newInode(t.implicitDir(), nil)); err != nil {
				return 0, err
			}
			t.implicit++
		}
		in := t.inodeOf(child)
		if in.isSymlink() {
			if hops++; hops > maxSymlinkHops {
				return 0, errors.New("too many levels of symbolic links")
			}
			target := t.target(in)
			if strings.HasPrefix(target, "/") {
				cur = t.root
			}
			comps = append(strings.Split(target, "/"), comps...)
			continue
		}
		if !in.isDir() {
			return 0, fmt.Errorf("%q is not a directory", c)
		}
		if create {
			t.node(child).layer = t.layer
		}
		cur = child
	}
	return cur, nil
}

// lookup returns the node at comps without following a final symlink, or
// 0 if there is none.
func (t *tree) lookup(comps []string) nodeID {
	if len(comps) == 0 {
		return t.root
	}
	dir, err := t.walkDir(comps[:len(comps)-1], false)
	if err != nil {
		return 0
	}
	return t.child(dir, comps[len(comps)-1])
}

// add links a new name for in under parent. The name must be free.
func (t *tree) add(parent nodeID, name string, in inodeID) (nodeID, error) {
	p := t.node(parent)
	if p.depth >= maxDepth {
		return 0, fmt.Errorf("directories nested deeper than %d", maxDepth)
	}
	ino := t.inode(in)
	if !ino.isDir() {
		if ino.links >= maxLinks {
			return 0, fmt.Errorf("more than %d hard links", maxLinks)
		}
	}
	off, err := t.names.add(name)
	if err != nil {
		return 0, err
	}
	if !ino.isDir() {
		ino.links++
	}
	id := nodeID(t.nodes.add(node{nameOff: off, nameLen: uint8(len(name)), parent: parent, inode: in, layer: t.layer, depth: p.depth + 1, next: p.first}))
	if p.first != 0 {
		t.node(p.first).prev = id
	}
	p.first = id
	t.index.insert(t, id)
	return id, nil
}

// put places in at parent/name with the OCI replacement rules. A directory
// over a directory merges with it: the existing children stay, and the new
// metadata wins. Anything else replaces whatever was there, including a
// whole subtree.
//
// put stores in (and x, if it holds anything) unless it merges, and
// returns the inode now at parent/name.
func (t *tree) put(parent nodeID, name string, in inode, x *inodeExtra) (*inode, error) {
	if old := t.child(parent, name); old != 0 {
		if t.inodeOf(old).isDir() && in.isDir() {
			var xs []xattr
			if x != nil {
				xs = x.xattrs
			}
			t.merge(old, &in, xs)
			return t.inodeOf(old), nil
		}
		t.remove(old)
	}
	id := t.newInode(in, x)
	if _, err := t.add(parent, name, id); err != nil {
		return nil, err
	}
	return t.inode(id), nil
}

// merge gives the existing directory dir the metadata of in and the
// attributes xs, keeping its children.
func (t *tree) merge(dir nodeID, in *inode, xs []xattr) {
	o := t.inodeOf(dir)
	o.mode, o.uid, o.gid = in.mode, in.uid, in.gid
	o.atime, o.mtime, o.ctime = in.atime, in.mtime, in.ctime
	if len(xs) > 0 {
		t.extraFor(o).xattrs = xs
	} else if x := t.extra(o); x != nil {
		x.xattrs = nil
	}
	t.node(dir).layer = t.layer
}

// link makes parent/name another name for target's inode.
func (t *tree) link(parent nodeID, name string, target nodeID) error {
	old := t.child(parent, name)
	if old == target {
		t.node(old).layer = t.layer
		return nil
	}
	// Hold a reference to the inode while the old name goes away. The
	// target may live in the subtree being replaced, and must not be freed
	// with it.
	id := t.node(target).inode
	in := t.inode(id)
	if in.links >= maxLinks {
		return fmt.Errorf("more than %d hard links", maxLinks)
	}
	in.links++
	if old != 0 {
		t.remove(old)
	}
	in.links-- // drop the temporary reference; add takes the real one
	_, err := t.add(parent, name, id)
	return err
}

// whiteout hides parent/name as far as lower layers are concerned. What
// the current layer itself put there stays.
func (t *tree) whiteout(parent nodeID, name string) {
	if n := t.child(parent, name); n != 0 {
		t.whiteoutNode(n)
	}
}

func (t *tree) whiteoutNode(id nodeID) {
	switch n := t.node(id); {
	case n.layer < t.layer:
		t.remove(id)
	case t.inode(n.inode).isDir():
		t.opaque(id)
	}
}

// opaque removes everything lower layers put under dir, keeping what the
// current layer created or walked through.
func (t *tree) opaque(dir nodeID) {
	for c := t.node(dir).first; c != 0; {
		next := t.node(c).next // c may go away
		t.whiteoutNode(c)
		c = next
	}
}

// remove unlinks n from its directory and releases its subtree.
func (t *tree) remove(id nodeID) {
	n := t.node(id)
	t.index.delete(t, id)
	if n.prev != 0 {
		t.node(n.prev).next = n.next
	} else {
		t.node(n.parent).first = n.next
	}
	if n.next != 0 {
		t.node(n.next).prev = n.prev
	}
	n.prev, n.next = 0, 0
	t.release(id)
}

// release drops the names in n's subtree, which is already unreachable,
// and the file references n holds.
func (t *tree) release(id nodeID) {
	n := t.node(id)
	for c := n.first; c != 0; c = t.node(c).next {
		t.index.delete(t, c)
		t.release(c)
	}
	if in := t.inode(n.inode); !in.isDir() {
		in.links--
		if in.links == 0 && t.freeData != nil {
			t.freeData(in)
		}
	}
}
