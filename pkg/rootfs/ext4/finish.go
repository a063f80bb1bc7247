package ext4

import (
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"math/bits"
	"slices"
)

const (
	lostFound = "lost+found"
	// bytesPerInode is mke2fs's default inode ratio, applied to the space
	// left for the guest.
	bytesPerInode = 16384
	// minSpareInodes is the least number of free inodes in any image.
	minSpareInodes = 16384
	maxInodes      = 1 << 31
	// maxInodesPerGroup is what one inode bitmap block can track.
	maxInodesPerGroup = 8 * blockSize
	// sizeAlign rounds the image to 1 MiB.
	sizeAlign = 256
)

// run is a range of blocks.
type run struct{ start, n uint64 }

// geometry is the final shape of the filesystem.
type geometry struct {
	groups         uint64
	inodesPerGroup uint64
	itableBlocks   uint64 // per group
	gdtBlocks      uint64
	totalBlocks    uint64
	end            uint64 // first block after everything allocated
	blockBitmap    []uint64
	inodeBitmap    []uint64
	inodeTable     []uint64
	runs           []run // blocks allocated by Finish
}

// Finish writes all metadata and gives the file its final size. The image
// is complete when it returns without error.
func (b *Builder) Finish(ctx context.Context) (Stats, error) {
	if err := b.usable(); err != nil {
		return Stats{}, err
	}
	b.finished = true
	st, err := b.finish(ctx)
	return st, b.fail(err)
}

func (b *Builder) finish(ctx context.Context) (Stats, error) {
	if err := b.releaseFreed(); err != nil {
		return Stats{}, err
	}
	root := b.tree.root
	if root.children[lostFound] == nil {
		in := b.tree.implicitDir()
		in.mode = sIFDIR | 0o700
		if _, err := b.tree.add(root, lostFound, in); err != nil {
			return Stats{}, err
		}
	}
	inodes := b.numberInodes()
	xblocks := b.prepareXattrs(inodes)
	journal := &inode{mode: sIFREG | 0o600, num: journalIno, nlink: 1, atime: b.now, mtime: b.now, ctime: b.now}
	if err := ctx.Err(); err != nil {
		return Stats{}, err
	}
	g, err := b.layout(inodes, xblocks, journal)
	if err != nil {
		return Stats{}, err
	}
	if err := b.writeMetadata(ctx, g, inodes, xblocks, journal); err != nil {
		return Stats{}, err
	}
	if err := b.f.Truncate(int64(g.totalBlocks) * blockSize); err != nil {
		return Stats{}, fmt.Errorf("ext4: sizing image: %w", err)
	}
	st := b.stats
	st.ImageBytes = int64(g.totalBlocks) * blockSize
	st.Inodes = int64(len(inodes) - 1)
	st.FreeInodes = int64(g.groups*g.inodesPerGroup) - st.Inodes
	for grp := range g.groups {
		st.FreeBytes += int64(blocksPerGroup-b.usedInGroup(grp)) * blockSize
	}
	return st, nil
}

// numberInodes assigns inode numbers in depth-first name order, so that the
// inodes of one directory's entries are neighbours in the inode table, and
// fills in what Finish needs per inode. The result is indexed by inode
// number; reserved numbers other than the root are nil.
func (b *Builder) numberInodes() []*inode {
	root := b.tree.root
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
		dir := n.inode
		names := slices.Sorted(maps.Keys(n.children))
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
			dir.nlink = 1 // dir_nlink: "many"
		}
		for i := len(names) - 1; i >= 0; i-- {
			if c := n.children[names[i]]; c.inode.isDir() {
				stack = append(stack, c)
			}
		}
	}
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
			count, _ := b.csum.dirBlocks(in.num, in.parentNum, in.entries, minBlocks, nil)
			in.dataBlocks = uint64(count)
			in.size = in.dataBlocks * blockSize
			b.stats.Dirs++
		case sIFREG:
			for _, e := range in.extents {
				in.dataBlocks += uint64(e.length)
			}
			b.stats.Files++
			b.stats.DataBytes += int64(in.size)
		case sIFLNK:
			if len(in.target) > fastSymlinkMax {
				in.dataBlocks = 1
			}
			b.stats.Symlinks++
		default:
			b.stats.Specials++
		}
		if !in.isDir() {
			in.nlink = in.links
			b.stats.HardLinks += int64(in.links - 1)
		}
	}
	return inodes
}

// prepareXattrs splits every inode's attributes between the inode body and
// an external block. Identical blocks are shared, as the kernel does.
func (b *Builder) prepareXattrs(inodes []*inode) []*xattrBlock {
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

// layout finds the group count at which everything fits: metadata size
// depends on the group count, which depends on the total size. It only
// grows, so the loop ends after a step or two.
func (b *Builder) layout(inodes []*inode, xblocks []*xattrBlock, journal *inode) (*geometry, error) {
	used := uint64(len(inodes) - 1)
	space := uint64(max(b.opts.Headroom, b.opts.MinSize))
	wantInodes := min(used+max(used/4, minSpareInodes, space/bytesPerInode), maxInodes)
	headroom := ceilDiv(uint64(b.opts.Headroom), blockSize) + uint64(float64(b.alloc.next)*b.opts.HeadroomRatio)
	minBlocks := ceilDiv(uint64(b.opts.MinSize), blockSize)
	maxGroups := (b.alloc.skip - 1) * descsPerBlock
	groups := max(1, ceilDiv(b.alloc.next+headroom, blocksPerGroup), ceilDiv(wantInodes, maxInodesPerGroup))
	for {
		if groups > maxGroups {
			return nil, fmt.Errorf("ext4: image needs %d block groups, more than the %d the limits reserved", groups, maxGroups)
		}
		g := b.tryLayout(groups, wantInodes, journalBlocks(max(b.alloc.next+headroom, minBlocks)), inodes, xblocks, journal)
		total := max(g.end+headroom, minBlocks)
		total = ceilDiv(total, sizeAlign) * sizeAlign
		if need := ceilDiv(total, blocksPerGroup); need > groups {
			groups = need
			continue
		}
		// The group count may have been overshot by a previous round: the
		// last group must exist, and be big enough to hold its backup
		// superblock area and some space.
		total = max(total, (groups-1)*blocksPerGroup+1)
		minLast := uint64(sizeAlign)
		if isBackupGroup(groups - 1) {
			minLast += b.alloc.skip
		}
		if last := total - (groups-1)*blocksPerGroup; last < minLast {
			total += minLast - last
		}
		g.totalBlocks = total
		return g, nil
	}
}

// tryLayout places all metadata after the data for a given group count.
// It works on a copy of the allocation cursor, so it can be repeated.
func (b *Builder) tryLayout(groups, wantInodes, journalSize uint64, inodes []*inode, xblocks []*xattrBlock, journal *inode) *geometry {
	c := b.alloc
	g := &geometry{groups: groups, gdtBlocks: ceilDiv(groups, descsPerBlock)}
	g.inodesPerGroup = ceilDiv(ceilDiv(wantInodes, groups), inodesPerBlock) * inodesPerBlock
	g.itableBlocks = g.inodesPerGroup / inodesPerBlock
	mark := func(start, n uint64) {
		if k := len(g.runs); k > 0 && g.runs[k-1].start+g.runs[k-1].n == start {
			g.runs[k-1].n += n
			return
		}
		g.runs = append(g.runs, run{start, n})
	}
	contig := func(n uint64) uint64 {
		start := c.takeContig(n)
		mark(start, n)
		return start
	}
	extents := func(n uint64) []extent {
		exts := c.takeExtents(n)
		for _, e := range exts {
			mark(e.start, uint64(e.length))
		}
		return exts
	}
	for range groups {
		g.blockBitmap = append(g.blockBitmap, contig(1))
	}
	for range groups {
		g.inodeBitmap = append(g.inodeBitmap, contig(1))
	}
	for range groups {
		g.inodeTable = append(g.inodeTable, contig(g.itableBlocks))
	}
	for _, in := range inodes {
		if in != nil && !in.isReg() && in.dataBlocks > 0 {
			in.extents = extents(in.dataBlocks)
		}
	}
	for _, x := range xblocks {
		x.blk = contig(1)
	}
	journal.dataBlocks = journalSize
	journal.size = journal.dataBlocks * blockSize
	journal.extents = extents(journal.dataBlocks)
	for _, in := range append(slices.Clip(inodes[rootIno:]), journal) {
		if in == nil {
			continue
		}
		in.treeBlocks = in.treeBlocks[:0]
		for _, e := range extents(uint64(treeBlockCount(len(in.extents)))) {
			for i := range uint64(e.length) {
				in.treeBlocks = append(in.treeBlocks, e.start+i)
			}
		}
	}
	g.end = c.next
	return g
}

// writeMetadata writes everything but file data, in ascending block order
// as far as possible so that the block writer can merge neighbours.
func (b *Builder) writeMetadata(ctx context.Context, g *geometry, inodes []*inode, xblocks []*xattrBlock, journal *inode) error {
	descs := make([]groupDesc, g.groups)
	for grp := range descs {
		d := &descs[grp]
		d.blockBitmap, d.inodeBitmap, d.inodeTable = g.blockBitmap[grp], g.inodeBitmap[grp], g.inodeTable[grp]
	}
	steps := []func() error{
		func() error { return b.writeBlockBitmaps(g, descs) },
		func() error { return b.writeInodeBitmaps(g, descs, uint64(len(inodes)-1)) },
		func() error { return b.writeInodeTables(ctx, g, descs, inodes, journal) },
		func() error { return b.writeOwnedBlocks(inodes, xblocks, journal) },
		func() error { return b.writeSuperblocks(g, descs, uint64(len(inodes)-1), journal) },
		b.w.flush,
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

// writeBlockBitmaps completes the block bitmap and writes it. Streamed data
// is already in b.used; added here are the blocks Finish allocated, the
// superblock and descriptor copies, and the padding past the last block,
// which must read as in use.
func (b *Builder) writeBlockBitmaps(g *geometry, descs []groupDesc) error {
	for _, r := range g.runs {
		b.used.setRange(r.start, r.n, true)
	}
	for grp := range g.groups {
		if isBackupGroup(grp) {
			b.used.setRange(grp*blocksPerGroup, 1+g.gdtBlocks, true)
		}
	}
	b.used.setRange(g.totalBlocks, g.groups*blocksPerGroup-g.totalBlocks, true)
	buf := make([]byte, blockSize)
	for grp := range g.groups {
		for i, word := range b.used[grp*blocksPerGroup/64 : (grp+1)*blocksPerGroup/64] {
			binary.LittleEndian.PutUint64(buf[8*i:], word)
		}
		d := &descs[grp]
		d.freeBlocks = uint32(blocksPerGroup - b.usedInGroup(grp))
		d.blockBitmapCsum = b.csum.sum(b.csum.seed, buf)
		if err := b.w.writeSparse(d.blockBitmap, buf); err != nil {
			return err
		}
	}
	return nil
}

// usedInGroup counts the allocated blocks of group grp, bitmap padding past
// the end of the filesystem included.
func (b *Builder) usedInGroup(grp uint64) uint64 {
	n := 0
	for _, w := range b.used[grp*blocksPerGroup/64 : (grp+1)*blocksPerGroup/64] {
		n += bits.OnesCount64(w)
	}
	return uint64(n)
}

// inodesInGroup is how many of inodes 1..used fall in group grp.
func inodesInGroup(g *geometry, used, grp uint64) uint64 {
	return min(g.inodesPerGroup, used-min(used, grp*g.inodesPerGroup))
}

// writeInodeBitmaps marks inodes 1..used in use. Bits past inodesPerGroup
// pad the block and must be set; the checksum covers only the real bits.
// Groups without inodes in use are flagged uninitialized instead, which
// saves writing a bitmap block per group of a mostly empty filesystem.
func (b *Builder) writeInodeBitmaps(g *geometry, descs []groupDesc, used uint64) error {
	ipg := g.inodesPerGroup
	buf := make([]byte, blockSize)
	for grp := range g.groups {
		n := inodesInGroup(g, used, grp)
		d := &descs[grp]
		d.freeInodes = uint32(ipg - n)
		d.itableUnused = uint32(ipg - n)
		d.flags = bgInodeZeroed
		if n == 0 {
			d.flags |= bgInodeUninit
			continue
		}
		var bm bitmap
		bm.setRange(0, n, true)
		bm.setRange(ipg, maxInodesPerGroup-ipg, true)
		for i, word := range bm {
			binary.LittleEndian.PutUint64(buf[8*i:], word)
		}
		d.inodeBitmapCsum = b.csum.sum(b.csum.seed, buf[:ipg/8])
		if err := b.w.writeSparse(d.inodeBitmap, buf); err != nil {
			return err
		}
	}
	return nil
}

// writeInodeTables writes the inode tables as far as inodes are in use; the
// rest stays a hole, which is the zeroed table the descriptors promise.
func (b *Builder) writeInodeTables(ctx context.Context, g *geometry, descs []groupDesc, inodes []*inode, journal *inode) error {
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
				b.csum.setInodeChecksum(dst, num) // reserved and unused, as mke2fs leaves them
				continue
			}
			root, err := b.iblock(in)
			if err != nil {
				return err
			}
			b.csum.encodeInode(dst, in, root)
			if in.isDir() {
				descs[grp].usedDirs++
			}
		}
		if err := b.w.write(g.inodeTable[grp], table); err != nil {
			return err
		}
	}
	return nil
}

// writeOwnedBlocks writes the blocks inodes own besides file data:
// directories, long symlinks, xattr blocks, the journal superblock and
// extent-tree nodes.
func (b *Builder) writeOwnedBlocks(inodes []*inode, xblocks []*xattrBlock, journal *inode) error {
	w := &b.w
	for _, in := range inodes {
		switch {
		case in == nil:
		case in.isDir():
			emit := func(i int, blk []byte) error { return w.write(physicalBlock(in.extents, uint64(i)), blk) }
			if _, err := b.csum.dirBlocks(in.num, in.parentNum, in.entries, int(in.dataBlocks), emit); err != nil {
				return err
			}
		case in.isSymlink() && in.dataBlocks > 0:
			blk := make([]byte, blockSize)
			copy(blk, in.target)
			if err := w.write(in.extents[0].start, blk); err != nil {
				return err
			}
		}
	}
	for _, x := range xblocks {
		if err := w.write(x.blk, b.csum.encodeXattrBlock(x)); err != nil {
			return err
		}
	}
	if err := w.write(journal.extents[0].start, journalSuperblock(journal.dataBlocks, b.uuid)); err != nil {
		return err
	}
	for _, in := range append(slices.Clip(inodes[rootIno:]), journal) {
		if in == nil || len(in.treeBlocks) == 0 {
			continue
		}
		if _, err := b.csum.extentTree(in.extents, in.treeBlocks, b.csum.inodeSeed(in.num), w.write); err != nil {
			return err
		}
	}
	return nil
}

// writeSuperblocks writes the group descriptor table and the superblock,
// primary and sparse_super backups.
func (b *Builder) writeSuperblocks(g *geometry, descs []groupDesc, used uint64, journal *inode) error {
	gdt := make([]byte, g.gdtBlocks*blockSize)
	p := &sbParams{
		blocks:         g.totalBlocks,
		inodes:         uint32(g.groups * g.inodesPerGroup),
		freeInodes:     uint32(g.groups*g.inodesPerGroup - used),
		inodesPerGroup: uint32(g.inodesPerGroup),
		uuid:           b.uuid,
		hashSeed:       b.hashSeed,
		time:           b.now.sec,
	}
	for grp := range descs {
		b.csum.encodeGroupDesc(gdt[grp*descSize:], uint32(grp), &descs[grp])
		p.freeBlocks += uint64(descs[grp].freeBlocks)
	}
	copy(p.label[:], b.opts.Label)
	// s_jnl_blocks: a copy of the journal inode's i_block and size, so that
	// e2fsck can recover the journal if inode 8 is damaged.
	jroot, err := b.iblock(journal)
	if err != nil {
		return err
	}
	for i := range 15 {
		p.jnlBlocks[i] = binary.LittleEndian.Uint32(jroot[4*i:])
	}
	p.jnlBlocks[15] = uint32(journal.size >> 32)
	p.jnlBlocks[16] = uint32(journal.size)
	for grp := range g.groups {
		if !isBackupGroup(grp) {
			continue
		}
		p.groupNr = uint16(grp)
		blk := make([]byte, blockSize)
		offset := 0
		if grp == 0 {
			offset = 1024 // the primary sits after the boot sector
		}
		copy(blk[offset:], b.csum.encodeSuperblock(p))
		if err := b.w.write(grp*blocksPerGroup, blk); err != nil {
			return err
		}
		if err := b.w.write(grp*blocksPerGroup+1, gdt); err != nil {
			return err
		}
	}
	return nil
}

// iblock returns the 60-byte i_block content of in.
func (b *Builder) iblock(in *inode) ([]byte, error) {
	switch {
	case in.usesExtents():
		return b.csum.extentTree(in.extents, in.treeBlocks, b.csum.inodeSeed(in.num), nil)
	case in.isSymlink():
		root := make([]byte, 60)
		copy(root, in.target)
		return root, nil
	case in.mode&sIFMT == sIFCHR || in.mode&sIFMT == sIFBLK:
		return deviceBlock(in.devMajor, in.devMinor), nil
	}
	return nil, nil
}

// physicalBlock maps a logical block through extents (which cover it).
func physicalBlock(exts []extent, logical uint64) uint64 {
	for _, e := range exts {
		if off := logical - uint64(e.logical); logical >= uint64(e.logical) && off < uint64(e.length) {
			return e.start + off
		}
	}
	panic(fmt.Sprintf("ext4: logical block %d not mapped", logical))
}
