package ext4

import (
	"context"
	"encoding/binary"
	"fmt"
	"maps"
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
	root := w.tree.root
	if root.children[lostFound] == nil {
		in := w.tree.implicitDir()
		in.mode = sIFDIR | 0o700
		if _, err := w.tree.add(root, lostFound, in); err != nil {
			return Stats{}, err
		}
	}
	inodes := w.numberInodes()
	w.sizeInodes(inodes)
	xblocks := w.prepareXattrs(inodes)
	journal := &inode{mode: sIFREG | 0o600, num: journalIno, nlink: 1, atime: w.now, mtime: w.now, ctime: w.now}
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
	st.ImageBytes = int64(g.totalBlocks) * blockSize
	st.Inodes = int64(len(inodes) - 1)
	st.FreeInodes = int64(g.groups*g.inodesPerGroup) - st.Inodes
	for grp := range g.groups {
		st.FreeBytes += int64(blocksPerGroup-w.usedInGroup(grp)) * blockSize
	}
	return st, nil
}

// numberInodes assigns inode numbers in depth-first name order, so that
// the inodes of one directory's entries are neighbours in the inode table.
// The result is indexed by inode number. Reserved numbers other than the
// root's are nil.
func (w *Writer) numberInodes() []*inode {
	root := w.tree.root
	inodes := make([]*inode, firstIno)
	inodes[rootIno] = root.inode
	root.inode.num, root.inode.parentNum = rootIno, rootIno
	if lf := root.children[lostFound]; lf.inode.isDir() {
		lf.inode.num = lostFoundIno
		inodes = append(inodes, lf.inode)
	}
	stack := []*node{root}
	for len(stack) > 0 {
		n := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		names := slices.Sorted(maps.Keys(n.children))
		inodes = numberEntries(n, names, inodes)
		// Push in reverse so that subdirectories are visited in name order.
		for i := len(names) - 1; i >= 0; i-- {
			if c := n.children[names[i]]; c.inode.isDir() {
				stack = append(stack, c)
			}
		}
	}
	return inodes
}

// numberEntries gives the next free numbers to the children of directory n
// that have none yet, and appends them to inodes. A hard link to an inode
// numbered earlier keeps that number. It also fills in n's entries (in the
// order of names), the parent of each subdirectory and n's link count.
func numberEntries(n *node, names []string, inodes []*inode) []*inode {
	dir := n.inode
	dir.entries = make([]dirent, len(names))
	subdirs := uint32(0)
	for i, name := range names {
		c := n.children[name].inode
		if c.num == 0 {
			c.num = uint32(len(inodes))
			inodes = append(inodes, c)
		}
		dir.entries[i] = dirent{name: name, inode: c}
		if c.isDir() {
			c.parentNum = dir.num
			subdirs++
		}
	}
	dir.nlink = 2 + subdirs
	if dir.nlink > maxLinks {
		dir.nlink = 1 // with dir_nlink, 1 means "too many to count"
	}
	return inodes
}

// sizeInodes sets the number of data blocks, the size and the final link
// count of every numbered inode, and counts them by type for Stats.
func (w *Writer) sizeInodes(inodes []*inode) {
	for _, in := range inodes {
		if in == nil {
			continue
		}
		switch in.mode & sIFMT {
		case sIFDIR:
			minBlocks := 1
			if in.num == lostFoundIno {
				minBlocks = lostFoundBlocks
			}
			count, _ := w.csum.dirBlocks(in.num, in.parentNum, in.entries, minBlocks, nil)
			in.dataBlocks = uint64(count)
			in.size = in.dataBlocks * blockSize
			w.stats.Dirs++
		case sIFREG:
			for _, e := range in.extents {
				in.dataBlocks += uint64(e.length)
			}
			w.stats.Files++
			w.stats.DataBytes += int64(in.size)
		case sIFLNK:
			if len(in.target) > fastSymlinkMax {
				in.dataBlocks = 1
			}
			w.stats.Symlinks++
		default:
			w.stats.Specials++
		}
		if !in.isDir() {
			in.nlink = in.links
			w.stats.HardLinks += int64(in.links - 1)
		}
	}
}

// prepareXattrs splits every inode's attributes between the inode body and
// an external block. Inodes with identical blocks share one, as the kernel
// does.
func (w *Writer) prepareXattrs(inodes []*inode) []*xattrBlock {
	var blocks []*xattrBlock
	shared := map[string]*xattrBlock{}
	for _, in := range inodes {
		if in == nil || len(in.xattrs) == 0 {
			continue
		}
		ibody, rest := splitXattrs(in.xattrs)
		in.ibodyXattrs = ibody
		if len(rest) == 0 {
			continue
		}
		body := newXattrBlockBody(rest)
		x := shared[string(body)]
		if x == nil || x.refcount >= maxXattrRefcount {
			x = &xattrBlock{body: body}
			shared[string(body)] = x
			blocks = append(blocks, x)
		}
		x.refcount++
		in.xblock = x
	}
	return blocks
}

// writeMetadata writes everything but file data. It goes in ascending block
// order as far as possible, so that the block writer can merge neighbours.
func (w *Writer) writeMetadata(ctx context.Context, g *geometry, inodes []*inode, xblocks []*xattrBlock, journal *inode) error {
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
func (w *Writer) writeInodeTables(ctx context.Context, g *geometry, descs []groupDesc, inodes []*inode, journal *inode) error {
	used := uint64(len(inodes) - 1)
	for grp := range g.groups {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := inodesInGroup(g, used, grp)
		if n == 0 {
			break
		}
		table := make([]byte, ceilDiv(n, inodesPerBlock)*blockSize)
		for i := range n {
			num := uint32(grp*g.inodesPerGroup + i + 1)
			dst := table[i*inodeSize : (i+1)*inodeSize]
			in := inodes[num]
			if num == journalIno {
				in = journal
			}
			if in == nil {
				// A reserved, unused inode. mke2fs leaves these all zero
				// apart from the checksum.
				w.csum.setInodeChecksum(dst, num)
				continue
			}
			root, err := w.iblock(in)
			if err != nil {
				return err
			}
			w.csum.encodeInode(dst, in, root)
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
func (w *Writer) writeOwnedBlocks(inodes []*inode, xblocks []*xattrBlock, journal *inode) error {
	bw := &w.bw
	for _, in := range inodes {
		switch {
		case in == nil:
		case in.isDir():
			emit := func(i int, blk []byte) error { return bw.write(physicalBlock(in.extents, uint64(i)), blk) }
			if _, err := w.csum.dirBlocks(in.num, in.parentNum, in.entries, int(in.dataBlocks), emit); err != nil {
				return err
			}
		case in.isSymlink() && in.dataBlocks > 0:
			blk := make([]byte, blockSize)
			copy(blk, in.target)
			if err := bw.write(in.extents[0].start, blk); err != nil {
				return err
			}
		}
	}
	for _, x := range xblocks {
		if err := bw.write(x.blk, w.csum.encodeXattrBlock(x)); err != nil {
			return err
		}
	}
	if err := bw.write(journal.extents[0].start, journalSuperblock(journal.dataBlocks, w.uuid)); err != nil {
		return err
	}
	for _, in := range append(slices.Clip(inodes[rootIno:]), journal) {
		if in == nil || len(in.treeBlocks) == 0 {
			continue
		}
		if _, err := w.csum.extentTree(in.extents, in.treeBlocks, w.csum.inodeSeed(in.num), bw.write); err != nil {
			return err
		}
	}
	return nil
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
		time:           w.now.sec,
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
	root, err := w.iblock(journal)
	if err != nil {
		return backup, err
	}
	for i := range iBlockLen / 4 {
		backup[i] = binary.LittleEndian.Uint32(root[4*i:])
	}
	backup[jnlBlocksSizeHigh] = uint32(journal.size >> 32)
	backup[jnlBlocksSize] = uint32(journal.size)
	return backup, nil
}

// iblock returns the i_block content of in (iBlockLen bytes).
func (w *Writer) iblock(in *inode) ([]byte, error) {
	switch {
	case in.usesExtents():
		return w.csum.extentTree(in.extents, in.treeBlocks, w.csum.inodeSeed(in.num), nil)
	case in.isSymlink():
		root := make([]byte, iBlockLen)
		copy(root, in.target)
		return root, nil
	case in.mode&sIFMT == sIFCHR || in.mode&sIFMT == sIFBLK:
		return deviceBlock(in.devMajor, in.devMinor), nil
	}
	return nil, nil
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
