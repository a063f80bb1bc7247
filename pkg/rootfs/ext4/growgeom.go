package ext4

import "fmt"

// minGrowFree is the least free space, in blocks, a group added by growth
// must have after its own metadata. A last group smaller than that is left
// out, as mke2fs does, because it would cost descriptor and bitmap
// bookkeeping for next to no space.
const minGrowFree = sizeAlign

// maxGrowInodes is the largest s_inodes_count: the field is 32 bits wide.
const maxGrowInodes = 1<<32 - 1

// growGeometry is the shape of a base grown to a larger size. The base's
// groups keep their layout; only the last one is extended when it was
// partial. Every group added gets its block bitmap, inode bitmap and inode
// table inside itself, right after the superblock and descriptor copies
// it holds, so that it can be flagged BLOCK_UNINIT: the kernel initializes
// such a bitmap from that group's own metadata only. (The last group's
// bitmap is written instead; see newGroupDesc.)
//
// The classic descriptor table keeps the base's size (gdtBlocks), because
// the blocks right after it hold data. When the grown filesystem has more
// groups than those blocks describe, it switches to meta_bg with
// s_first_meta_bg = gdtBlocks: the descriptors of every later meta-group
// (descsPerBlock groups) live in one block at the start of its first group,
// with copies in its second and last groups. That costs three blocks per
// 8 GiB, where a classic table would have to be copied whole into every
// sparse_super backup group.
type growGeometry struct {
	oldBlocks, blocks uint64 // filesystem size in blocks, before and after
	oldGroups, groups uint64
	gdtBlocks         uint64 // classic descriptor blocks, the base's
	inodesPerGroup    uint64
	itableBlocks      uint64 // per group
	metaBG            bool   // whether groups past the classic table exist
}

// newGrowGeometry plans growth of a base of oldBlocks blocks with
// inodesPerGroup inodes per group to at most wantBlocks blocks. When
// wantBlocks is not larger, the geometry is the base's.
func newGrowGeometry(oldBlocks, inodesPerGroup, wantBlocks uint64) (growGeometry, error) {
	g := growGeometry{
		oldBlocks:      oldBlocks,
		blocks:         max(oldBlocks, wantBlocks),
		oldGroups:      ceilDiv(oldBlocks, blocksPerGroup),
		inodesPerGroup: inodesPerGroup,
		itableBlocks:   ceilDiv(inodesPerGroup*inodeSize, blockSize),
	}
	g.gdtBlocks = ceilDiv(g.oldGroups, descsPerBlock)
	g.setGroups()
	if g.groups > g.oldGroups {
		last := g.groups - 1
		if g.groupBlocks(last) < g.newGroupOverhead(last)+minGrowFree {
			g.blocks = last * blocksPerGroup
			g.setGroups()
		}
	}
	if inodes := g.groups * g.inodesPerGroup; inodes > maxGrowInodes {
		return g, fmt.Errorf("ext4: %d groups of %d inodes make %d inodes, more than the superblock's 32-bit count can hold",
			g.groups, g.inodesPerGroup, inodes)
	}
	return g, nil
}

func (g *growGeometry) setGroups() {
	g.groups = ceilDiv(g.blocks, blocksPerGroup)
	g.metaBG = g.groups > g.gdtBlocks*descsPerBlock
}

// groupBlocks is the number of blocks of group grp; only the last group
// can be short.
func (g *growGeometry) groupBlocks(grp uint64) uint64 {
	return min(blocksPerGroup, g.blocks-grp*blocksPerGroup)
}

// classic reports whether group grp's descriptor lives in the classic
// table (meta-groups below s_first_meta_bg).
func (g *growGeometry) classic(grp uint64) bool {
	return grp < g.gdtBlocks*descsPerBlock
}

// descCopies is the number of descriptor blocks at the start of group grp,
// right after its superblock copy if it has one. In the classic range a
// sparse_super backup group holds the whole classic table; in the meta_bg
// range the first, second and last groups of each meta-group hold that
// meta-group's one descriptor block, and nothing else does (e2fsprogs'
// ext2fs_super_and_bgd_loc2 and the kernel's ext4_bg_num_gdb agree).
func (g *growGeometry) descCopies(grp uint64) uint64 {
	if g.classic(grp) {
		if isBackupGroup(grp) {
			return g.gdtBlocks
		}
		return 0
	}
	switch grp % descsPerBlock {
	case 0, 1, descsPerBlock - 1:
		return 1
	}
	return 0
}

// startMeta is the number of blocks at the start of group grp taken by
// superblock and descriptor copies.
func (g *growGeometry) startMeta(grp uint64) uint64 {
	n := g.descCopies(grp)
	if isBackupGroup(grp) {
		n++
	}
	return n
}

// descBlockAt returns the block where group grp holds a copy of descriptor
// block i (i = the first group it describes / descsPerBlock). ok is false
// when grp holds no copy of it.
func (g *growGeometry) descBlockAt(grp, i uint64) (blk uint64, ok bool) {
	start := grp * blocksPerGroup
	if g.classic(grp) {
		if !isBackupGroup(grp) || i >= g.gdtBlocks {
			return 0, false
		}
		return start + 1 + i, true
	}
	if grp/descsPerBlock != i || g.descCopies(grp) == 0 {
		return 0, false
	}
	if isBackupGroup(grp) {
		return start + 1, true
	}
	return start, true
}

// newGroupDesc is the descriptor of group grp, one that growth adds.
// baseEnd is the size of the base file in blocks: blocks before it hold the
// base's bytes in the overlay, the rest read as zeros.
func (g *growGeometry) newGroupDesc(grp, baseEnd uint64) groupDesc {
	first := grp*blocksPerGroup + g.startMeta(grp)
	d := groupDesc{
		blockBitmap:  first,
		inodeBitmap:  first + 1,
		inodeTable:   first + 2,
		freeBlocks:   uint32(g.groupBlocks(grp) - g.startMeta(grp) - 2 - g.itableBlocks),
		freeInodes:   uint32(g.inodesPerGroup),
		itableUnused: uint32(g.inodesPerGroup),
		// Neither bitmap is ever read while these flags are set, so they
		// may read as zeros (or anything) and their checksums stay 0, as
		// e2fsprogs leaves them.
		flags: ext4BGBlockUninit | ext4BGInodeUninit,
	}
	// The last group's block bitmap is written instead (newGroupBitmap):
	// e2fsck refuses a BLOCK_UNINIT last group, whose bitmap padding
	// must be set on disk, and mke2fs never makes one.
	if grp == g.groups-1 {
		d.flags &^= ext4BGBlockUninit
	}
	// ITABLE_ZEROED is a promise that the table reads as zeros. Past the
	// base it does; a table that reached into the base would read the
	// base's bytes, and without the flag the guest zeroes it lazily.
	if d.inodeTable >= baseEnd {
		d.flags |= ext4BGInodeZeroed
	}
	return d
}

// newGroupOverhead is the number of blocks of group grp (one growth adds)
// that its own metadata takes.
func (g *growGeometry) newGroupOverhead(grp uint64) uint64 {
	return g.startMeta(grp) + 2 + g.itableBlocks
}

// newGroupBitmap is the block bitmap of group grp, one that growth adds:
// its own metadata in use, and the padding past the end of the
// filesystem, if it is the short last group.
func (g *growGeometry) newGroupBitmap(grp uint64) []byte {
	buf := make([]byte, blockSize)
	set := func(from, to uint64) {
		for bit := from; bit < to; bit++ {
			buf[bit/8] |= 1 << (bit % 8)
		}
	}
	set(0, g.newGroupOverhead(grp))
	set(g.groupBlocks(grp), blocksPerGroup)
	return buf
}
