package ext4

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/bits"
	"slices"
)

// Finish writes all metadata and gives the file its final size. The image
// is complete when it returns without error.
func (w *Writer) Finish(ctx context.Context) (Stats, error) {
	if err := w.usable(); err != nil {
		return Stats{}, err
	}
	w.finished = true
	st, err := w.finish(ctx)
	return st, w.fail(err)
}

func (w *Writer) finish(ctx context.Context) (Stats, error) {
	if err := w.releaseFreed(); err != nil {
		return Stats{}, err
	}
	t := w.tree
	if t.child(t.root, lostFound) == 0 {
		in := t.implicitDir()
		in.mode = sIFDIR | 0o700
		if _, err := t.add(t.root, lostFound, t.newInode(in, nil)); err != nil {
			return Stats{}, err
		}
	}
	inodes := w.numberInodes()
	w.sizeInodes(inodes)
	xblocks := w.prepareXattrs(inodes)
	journal := &inode{mode: sIFREG | 0o600, num: journalIno, links: 1, atime: w.now, mtime: w.now, ctime: w.now}
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	g, err := w.planGeometry(inodes, xblocks, journal)
	if err != nil {
		return Stats{}, err
	}
	if err := w.writeMetadata(ctx, g, inodes, xblocks, journal); err != nil {
		return Stats{}, err
	}
	if err := w.f.Truncate(int64(g.totalBlocks) * blockSize); err != nil {
		return Stats{}, fmt.Errorf("ext4: sizing image: %w", err)
	}
	st := w.stats
	st.LayerBytes = w.readBytes
	st.ImageBytes = int64(g.totalBlocks) * blockSize
	st.Inodes = int64(len(inodes) - 1)
	st.FreeInodes = int64(g.groups*g.inodesPerGroup) - st.Inodes
	for grp := range g.groups {
		st.FreeBytes += int64(blocksPerGroup-w.usedInGroup(grp)) * blockSize
	}
	return st, nil
}

// dirInfo is what Finish needs to write a directory.
type dirInfo struct {
	parentNum    uint32 // inode number of ".."
	entOff, entN uint32 // the children, in name order, in Writer.ents
	blocks       uint32 // directory blocks
}

// dirInfo returns the directory in's dirInfo, adding it if it has none.
func (w *Writer) dirInfo(in *inode) *dirInfo {
	if in.dir == 0 {
		w.dirs = append(w.dirs, dirInfo{})
		in.dir = uint32(len(w.dirs))
	}
	return &w.dirs[in.dir-1]
}

// dirEntries returns the children of the directory in, in name order.
func (w *Writer) dirEntries(in *inode) []nodeID {
	d := &w.dirs[in.dir-1]
	return w.ents[d.entOff : d.entOff+d.entN]
}

// numberInodes assigns inode numbers in depth-first name order, so that
// the inodes of one directory's entries are neighbours in the inode table.
// The result is indexed by inode number. Reserved numbers other than the
// root's are 0.
func (w *Writer) numberInodes() []inodeID {
	t := w.tree
	root := t.node(t.root)
	// Every inode stored so far is an upper bound on those in the image,
	// and every indexed name is an entry of some directory.
	inodes := make([]inodeID, firstIno, int(firstIno)+int(t.inodes.n))
	inodes[rootIno] = root.inode
	w.ents = make([]nodeID, 0, t.index.count)
	rootIn := t.inode(root.inode)
	rootIn.num = rootIno
	w.dirInfo(rootIn).parentNum = rootIno
	if lf := t.child(t.root, lostFound); t.inodeOf(lf).isDir() {
		t.inodeOf(lf).num = lostFoundIno
		inodes = append(inodes, t.node(lf).inode)
	}
	stack := []nodeID{t.root}
	var children []nodeID
	for len(stack) > 0 {
		n := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		children = children[:0]
		for c := t.node(n).first; c != 0; c = t.node(c).next {
			children = append(children, c)
		}
		// Names are unique in a directory, so the order is total.
		slices.SortFunc(children, func(a, b nodeID) int { return bytes.Compare(t.name(t.node(a)), t.name(t.node(b))) })
		inodes = w.numberEntries(n, children, inodes)
		// Push in reverse so that subdirectories are visited in name order.
		for i := len(children) - 1; i >= 0; i-- {
			if c := children[i]; t.inodeOf(c).isDir() {
				stack = append(stack, c)
			}
		}
	}
	return inodes
}

// numberEntries gives the next free numbers to the children of directory n
// that have none yet, and appends them to inodes. A hard link to an inode
// numbered earlier keeps that number. It also records n's entries (in the
// order of children), the parent of each subdirectory and n's link count.
func (w *Writer) numberEntries(n nodeID, children []nodeID, inodes []inodeID) []inodeID {
	t := w.tree
	dir := t.inodeOf(n)
	d := w.dirInfo(dir)
	d.entOff, d.entN = uint32(len(w.ents)), uint32(len(children))
	w.ents = append(w.ents, children...)
	subdirs := uint32(0)
	for _, id := range children {
		c := t.inodeOf(id)
		if c.num == 0 {
			c.num = uint32(len(inodes))
			inodes = append(inodes, t.node(id).inode)
		}
		if c.isDir() {
			w.dirInfo(c).parentNum = dir.num
			subdirs++
		}
	}
	nlink := 2 + subdirs
	if nlink > maxLinks {
		nlink = 1 // with dir_nlink, 1 means "too many to count"
	}
	dir.links = uint16(nlink)
	return inodes
}

// sizeInodes sets the number of blocks and the size of every numbered
// directory, and counts the inodes by type for Stats.
func (w *Writer) sizeInodes(inodes []inodeID) {
	t := w.tree
	for _, id := range inodes {
		if id == 0 {
			continue
		}
		in := t.inode(id)
		switch in.mode & sIFMT {
		case sIFDIR:
			minBlocks := 1
			if in.num == lostFoundIno {
				minBlocks = lostFoundBlocks
			}
			count, _ := w.dirBlocks(in, minBlocks, nil)
			w.dirs[in.dir-1].blocks = uint32(count)
			in.size = uint64(count) * blockSize
			w.stats.Dirs++
		case sIFREG:
			w.stats.Files++
			w.stats.DataBytes += int64(in.size)
		case sIFLNK:
			w.stats.Symlinks++
		default:
			w.stats.Specials++
		}
		if !in.isDir() {
			w.stats.HardLinks += int64(in.links - 1)
		}
	}
}

// ownBlocks is how many blocks Finish allocates for in's content:
// directory blocks, or a long symlink's target block.
func (w *Writer) ownBlocks(in *inode) uint64 {
	switch {
	case in.isDir():
		return uint64(w.dirs[in.dir-1].blocks)
	case in.isSymlink() && len(w.tree.target(in)) > fastSymlinkMax:
		return 1
	}
	return 0
}

// prepareXattrs splits every inode's attributes between the inode body and
// an external block. Inodes with identical blocks share one, as the kernel
// does.
func (w *Writer) prepareXattrs(inodes []inodeID) []*xattrBlock {
	var blocks []*xattrBlock
	shared := map[string]*xattrBlock{}
	for _, id := range inodes {
		if id == 0 {
			continue
		}
		x := w.tree.extra(w.tree.inode(id))
		if x == nil || len(x.xattrs) == 0 {
			continue
		}
		ibody, rest := splitXattrs(x.xattrs)
		x.ibodyXattrs = ibody
		if len(rest) == 0 {
			continue
		}
		body := newXattrBlockBody(rest)
		b := shared[string(body)]
		if b == nil || b.refcount >= maxXattrRefcount {
			b = &xattrBlock{body: body}
			shared[string(body)] = b
			blocks = append(blocks, b)
		}
		b.refcount++
		x.xblock = b
	}
	return blocks
}

// writeMetadata writes everything but file data. It goes in ascending block
// order as far as possible, so that the block writer can merge neighbours.
func (w *Writer) writeMetadata(ctx context.Context, g *geometry, inodes []inodeID, xblocks []*xattrBlock, journal *inode) error {
	descs := make([]groupDesc, g.groups)
	for grp := range descs {
		d := &descs[grp]
		d.blockBitmap, d.inodeBitmap, d.inodeTable = g.blockBitmap[grp], g.inodeBitmap[grp], g.inodeTable[grp]
	}
	steps := []func() error{
		func() error { return w.writeBlockBitmaps(g, descs) },
		func() error { return w.writeInodeBitmaps(g, descs, uint64(len(inodes)-1)) },
		func() error { return w.writeInodeTables(ctx, g, descs, inodes, journal) },
		func() error { return w.writeOwnedBlocks(inodes, xblocks, journal) },
		func() error { return w.writeSuperblocks(g, descs, uint64(len(inodes)-1), journal) },
		w.bw.flush,
	}
	for _, step := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// writeBlockBitmaps completes the block bitmap and writes it. The blocks of
// streamed data are already in w.used. This adds the blocks Finish
// allocated, the superblock and descriptor copies, and the padding past
// the last block, which must read as in use.
func (w *Writer) writeBlockBitmaps(g *geometry, descs []groupDesc) error {
	for _, r := range g.runs {
		w.used.setRange(r.start, r.n, true)
	}
	for grp := range g.groups {
		if isBackupGroup(grp) {
			w.used.setRange(grp*blocksPerGroup, 1+g.gdtBlocks, true)
		}
	}
	w.used.setRange(g.totalBlocks, g.groups*blocksPerGroup-g.totalBlocks, true)
	buf := make([]byte, blockSize)
	for grp := range g.groups {
		for i, word := range w.used[grp*blocksPerGroup/64 : (grp+1)*blocksPerGroup/64] {
			binary.LittleEndian.PutUint64(buf[8*i:], word)
		}
		d := &descs[grp]
		d.freeBlocks = uint32(blocksPerGroup - w.usedInGroup(grp))
		d.blockBitmapCsum = w.csum.sum(w.csum.seed, buf)
		if err := w.bw.writeSparse(d.blockBitmap, buf); err != nil {
			return err
		}
	}
	return nil
}

// usedInGroup counts the allocated blocks of group grp, including the
// bitmap padding past the end of the filesystem.
func (w *Writer) usedInGroup(grp uint64) uint64 {
	n := 0
	for _, word := range w.used[grp*blocksPerGroup/64 : (grp+1)*blocksPerGroup/64] {
		n += bits.OnesCount64(word)
	}
	return uint64(n)
}

// writeInodeBitmaps marks inodes 1..used in use. The bits past
// inodesPerGroup pad the block and must be set, but the checksum covers
// only the real bits. A group with no inode in use gets no bitmap block and
// is flagged uninitialized instead, which saves a block write per group in
// a mostly empty filesystem.
func (w *Writer) writeInodeBitmaps(g *geometry, descs []groupDesc, used uint64) error {
	ipg := g.inodesPerGroup
	buf := make([]byte, blockSize)
	for grp := range g.groups {
		n := inodesInGroup(g, used, grp)
		d := &descs[grp]
		d.freeInodes = uint32(ipg - n)
		d.itableUnused = uint32(ipg - n)
		d.flags = ext4BGInodeZeroed
		if n == 0 {
			d.flags |= ext4BGInodeUninit
			continue
		}
		var bm bitmap
		bm.setRange(0, n, true)
		bm.setRange(ipg, maxInodesPerGroup-ipg, true)
		for i, word := range bm {
			binary.LittleEndian.PutUint64(buf[8*i:], word)
		}
		d.inodeBitmapCsum = w.csum.sum(w.csum.seed, buf[:ipg/8])
		if err := w.bw.writeSparse(d.inodeBitmap, buf); err != nil {
			return err
		}
	}
	return nil
}

// writeInodeTables writes the inode tables up to the last inode in use. The
// rest stays a hole, which reads as the zeroed table that the descriptors
// promise.
func (w *Writer) writeInodeTables(ctx context.Context, g *geometry, descs []groupDesc, inodes []inodeID, journal *inode) error {
	used := uint64(len(inodes) - 1)
	var table []byte
	for grp := range g.groups {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := inodesInGroup(g, used, grp)
		if n == 0 {
			break
		}
		size := int(ceilDiv(n, inodesPerBlock) * blockSize)
		if cap(table) < size {
			table = make([]byte, size)
		}
		table = table[:size]
		clear(table)
		for i := range n {
			num := uint32(grp*g.inodesPerGroup + i + 1)
			dst := table[i*inodeSize : (i+1)*inodeSize]
			var in *inode
			switch {
			case num == journalIno:
				in = journal
			case inodes[num] != 0:
				in = w.tree.inode(inodes[num])
			default:
				// A reserved, unused inode. mke2fs leaves these all zero
				// apart from the checksum.
				w.csum.setInodeChecksum(dst, num)
				continue
			}
			if err := w.iblock(in, dst[iBlock:iBlock+iBlockLen]); err != nil {
				return err
			}
			w.csum.encodeInode(dst, in, w.tree.extra(in), w.dataBlocks(in), w.tree.target(in))
			if in.isDir() {
				descs[grp].usedDirs++
			}
		}
		if err := w.bw.write(g.inodeTable[grp], table); err != nil {
			return err
		}
	}
	return nil
}

// writeOwnedBlocks writes the blocks that inodes own besides file data.
// These are directory blocks, long symlink targets, xattr blocks, the
// journal superblock and extent-tree nodes.
func (w *Writer) writeOwnedBlocks(inodes []inodeID, xblocks []*xattrBlock, journal *inode) error {
	bw := &w.bw
	t := w.tree
	for _, id := range inodes {
		if id == 0 {
			continue
		}
		switch in := t.inode(id); {
		case in.isDir():
			exts := w.extents(in)
			emit := func(i int, blk []byte) error { return bw.write(physicalBlock(exts, uint64(i)), blk) }
			if _, err := w.dirBlocks(in, int(w.dirs[in.dir-1].blocks), emit); err != nil {
				return err
			}
		case in.isSymlink() && in.nExt > 0:
			blk := make([]byte, blockSize)
			copy(blk, t.target(in))
			if err := bw.write(w.extents(in)[0].start, blk); err != nil {
				return err
			}
		}
	}
	for _, x := range xblocks {
		if err := bw.write(x.blk, w.csum.encodeXattrBlock(x)); err != nil {
			return err
		}
	}
	if err := bw.write(w.extents(journal)[0].start, journalSuperblock(w.dataBlocks(journal), w.uuid)); err != nil {
		return err
	}
	write := func(in *inode) error {
		x := t.extra(in)
		if x == nil || len(x.treeBlocks) == 0 {
			return nil
		}
		var root [iBlockLen]byte
		return w.csum.extentTree(root[:], w.extents(in), x.treeBlocks, w.csum.inodeSeed(in.num), bw.write)
	}
	for _, id := range inodes[rootIno:] {
		if id != 0 {
			if err := write(t.inode(id)); err != nil {
				return err
			}
		}
	}
	return write(journal)
}

// writeSuperblocks writes the group descriptor table and the superblock:
// the primary copy in group 0 and the sparse_super backups.
func (w *Writer) writeSuperblocks(g *geometry, descs []groupDesc, used uint64, journal *inode) error {
	gdt := make([]byte, g.gdtBlocks*blockSize)
	p := &sbParams{
		blocks:         g.totalBlocks,
		inodes:         uint32(g.groups * g.inodesPerGroup),
		freeInodes:     uint32(g.groups*g.inodesPerGroup - used),
		inodesPerGroup: uint32(g.inodesPerGroup),
		uuid:           w.uuid,
		hashSeed:       w.hashSeed,
		time:           w.now.seconds(),
	}
	for grp := range descs {
		w.csum.encodeGroupDesc(gdt[grp*descSize:], uint32(grp), &descs[grp])
		p.freeBlocks += uint64(descs[grp].freeBlocks)
	}
	copy(p.label[:], w.opts.Label)
	var err error
	if p.jnlBlocks, err = w.journalBackup(journal); err != nil {
		return err
	}
	for grp := range g.groups {
		if !isBackupGroup(grp) {
			continue
		}
		p.groupNr = uint16(grp)
		blk := make([]byte, blockSize)
		offset := 0
		if grp == 0 {
			offset = superblockOffset
		}
		copy(blk[offset:], w.csum.encodeSuperblock(p))
		if err := w.bw.write(grp*blocksPerGroup, blk); err != nil {
			return err
		}
		if err := w.bw.write(grp*blocksPerGroup+1, gdt); err != nil {
			return err
		}
	}
	return nil
}

// journalBackup returns the superblock's s_jnl_blocks. It holds a copy of
// the journal inode's i_block and size, so that e2fsck can still find the
// journal if inode 8 is damaged.
func (w *Writer) journalBackup(journal *inode) ([jnlBlocksLen]uint32, error) {
	var backup [jnlBlocksLen]uint32
	root := make([]byte, iBlockLen)
	if err := w.iblock(journal, root); err != nil {
		return backup, err
	}
	for i := range iBlockLen / 4 {
		backup[i] = binary.LittleEndian.Uint32(root[4*i:])
	}
	backup[jnlBlocksSizeHigh] = uint32(journal.size >> 32)
	backup[jnlBlocksSize] = uint32(journal.size)
	return backup, nil
}

// iblock writes the i_block content of in to root (iBlockLen bytes,
// zeroed).
func (w *Writer) iblock(in *inode, root []byte) error {
	target := w.tree.target(in)
	switch {
	case in.usesExtents(target):
		var tree []uint64
		if x := w.tree.extra(in); x != nil {
			tree = x.treeBlocks
		}
		return w.csum.extentTree(root, w.extents(in), tree, w.csum.inodeSeed(in.num), nil)
	case in.isSymlink():
		copy(root, target)
	case in.mode&sIFMT == sIFCHR || in.mode&sIFMT == sIFBLK:
		var major, minor uint32
		if x := w.tree.extra(in); x != nil {
			major, minor = x.devMajor, x.devMinor
		}
		putDevice(root, major, minor)
	}
	return nil
}

// physicalBlock maps a logical block through extents that cover it.
func physicalBlock(exts []extent, logical uint64) uint64 {
	for _, e := range exts {
		if off := logical - uint64(e.logical); logical >= uint64(e.logical) && off < uint64(e.length) {
			return e.start + off
		}
	}
	panic(fmt.Sprintf("ext4: logical block %d not mapped", logical))
}
