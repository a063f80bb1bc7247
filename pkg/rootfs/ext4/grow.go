package ext4

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
)

// GrowBlockSize is the size of every BlockWrite: the filesystem's block.
const GrowBlockSize = blockSize

// BlockWrite is one block of a GrowPlan.
type BlockWrite struct {
	Offset uint64 // byte offset in the disk, a multiple of GrowBlockSize
	// Data is GrowBlockSize bytes. Past the base it is never all zero.
	// Inside the base it can be: the last group's block bitmap is all
	// zero once every block of a whole group is free. It must still
	// replace the base's block, so an overlay must store it (a hole in
	// an allocated cluster is fine; leaving the cluster unallocated, so
	// that it reads the base, is not). Copies of one block (a
	// descriptor block's backups) share a slice: do not modify it.
	Data []byte
}

// GrowPlan grows a base's filesystem in place: applied over the base, the
// writes turn a disk of Size bytes or more into a clean filesystem of Size
// bytes that mounts, checks clean and resizes further like any other.
// Nothing else needs writing: every block they do not cover that lies past
// the base must read as zeros, as the unwritten clusters of a qcow2 overlay
// over a shorter backing file do.
type GrowPlan struct {
	// Writes are sorted by Offset, one block each, no two at one offset.
	Writes []BlockWrite
	// Size is the filesystem's size in bytes after growth: Blocks blocks.
	// It can fall short of the size asked for by up to a block, or by a
	// last group too small to be worth its metadata (at most about 10 MiB).
	Size uint64
	// Blocks, FreeBlocks, Inodes and FreeInodes are the superblock's
	// counts after growth. The guest's statfs reports FreeBlocks as
	// f_bfree, Inodes as f_files and FreeInodes as f_ffree right after
	// mounting.
	Blocks, FreeBlocks uint64
	Inodes, FreeInodes uint64
}

// PlanGrow returns the block writes that grow the filesystem in base, an
// image of baseSize bytes that this package's Writer wrote, to newSize
// bytes (rounded down to a whole block). The base is only read. newSize
// equal to baseSize gives a plan without writes; a smaller one is an error.
//
// The base is parsed defensively: it must be exactly the layout Writer
// writes (features, geometry, clean state, checksums), and anything else
// is refused with an error wrapping ErrNotGrowable. So is an image that
// PlanGrow grew by whole groups: no base has lazily initialized groups or
// meta_bg.
//
// Growth extends the base's last group and adds groups that are
// initialized lazily: BLOCK_UNINIT, INODE_UNINIT and ITABLE_ZEROED, with
// their bitmaps and inode tables inside themselves and past the base, so
// they cost no writes. The last group is the exception: e2fsck wants its
// block bitmap initialized, so that bitmap is written. Besides it, what is
// written is the superblock and its backups, the descriptor blocks that
// change (with meta_bg once the classic table is full; the package
// documentation's Growth section says why) and the last base group's block
// bitmap: about 30 blocks for 20 GiB, 60 for 100 GiB and 410 for 1 TiB.
func PlanGrow(base io.ReaderAt, baseSize int64, newSize uint64) (GrowPlan, error) {
	b, err := readBase(base, baseSize)
	if err != nil {
		return GrowPlan{}, err
	}
	switch {
	case newSize < uint64(baseSize):
		return GrowPlan{}, fmt.Errorf("ext4: growing the base to %d bytes: it is already %d bytes, and filesystems do not shrink", newSize, baseSize)
	case newSize > maxSize:
		return GrowPlan{}, fmt.Errorf("ext4: growing the base to %d bytes: more than the 16 TiB this package supports", newSize)
	}
	g, err := newGrowGeometry(b.blocks, b.ipg, newSize/blockSize)
	if err != nil {
		return GrowPlan{}, err
	}
	return b.plan(&g)
}

// plan computes the writes for geometry g.
func (b *baseImage) plan(g *growGeometry) (GrowPlan, error) {
	p := GrowPlan{
		Size:       g.blocks * blockSize,
		Blocks:     g.blocks,
		FreeBlocks: b.freeBlocks,
		Inodes:     g.groups * g.inodesPerGroup,
		FreeInodes: b.freeInodes + (g.groups-g.oldGroups)*g.inodesPerGroup,
	}
	if g.blocks == g.oldBlocks {
		return p, nil
	}
	// descs is the whole descriptor table after growth, classic blocks
	// then meta_bg blocks: descriptor block i describes groups
	// i*descsPerBlock onwards, wherever its copies live.
	descs := make([]byte, ceilDiv(g.groups, descsPerBlock)*blockSize)
	copy(descs, b.gdt)
	var writes []BlockWrite
	add := func(blk uint64, data []byte) {
		writes = append(writes, BlockWrite{Offset: blk * blockSize, Data: data})
	}

	// The last base group grows into the blocks its bitmap's padding
	// covered, when it was partial.
	lastOld := g.oldGroups - 1
	grownBlocks := g.groupBlocks(lastOld) - (g.oldBlocks - lastOld*blocksPerGroup)
	firstChanged := g.oldGroups / descsPerBlock // first descriptor block that changes
	if grownBlocks > 0 {
		d := b.desc(lastOld)
		bm := slices.Clone(b.lastBitmap)
		for bit := g.oldBlocks - lastOld*blocksPerGroup; bit < g.groupBlocks(lastOld); bit++ {
			bm[bit/8] &^= 1 << (bit % 8)
		}
		d.freeBlocks += uint32(grownBlocks)
		d.blockBitmapCsum = b.csum.sum(b.csum.seed, bm)
		raw := descs[lastOld*descSize : (lastOld+1)*descSize]
		// Only the two fields change. Rewriting them in place keeps
		// whatever else the descriptor holds, byte for byte.
		le := binary.LittleEndian
		le.PutUint16(raw[bgFreeBlocksCountLo:], uint16(d.freeBlocks))
		le.PutUint16(raw[bgFreeBlocksCountHi:], uint16(d.freeBlocks>>16))
		le.PutUint16(raw[bgBlockBitmapCsumLo:], uint16(d.blockBitmapCsum))
		le.PutUint16(raw[bgBlockBitmapCsumHi:], uint16(d.blockBitmapCsum>>16))
		le.PutUint16(raw[bgChecksum:], b.csum.descChecksum(raw, uint32(lastOld)))
		p.FreeBlocks += grownBlocks
		firstChanged = lastOld / descsPerBlock
		add(d.blockBitmap, bm)
	}
	baseEnd := ceilDiv(uint64(b.size), blockSize)
	for grp := g.oldGroups; grp < g.groups; grp++ {
		d := g.newGroupDesc(grp, baseEnd)
		p.FreeBlocks += uint64(d.freeBlocks)
		if d.flags&ext4BGBlockUninit == 0 {
			bm := g.newGroupBitmap(grp)
			d.blockBitmapCsum = b.csum.sum(b.csum.seed, bm)
			add(d.blockBitmap, bm)
		}
		raw := descs[grp*descSize : (grp+1)*descSize]
		clear(raw)
		b.csum.encodeGroupDesc(raw, uint32(grp), &d)
	}

	// Superblocks, and the descriptor blocks each backup group holds. A
	// base group's copies are rewritten only where they changed; a new
	// group's are all written, since its blocks read as zeros.
	sbs := b.superblocks(g, p)
	descBlock := func(i uint64) []byte { return descs[i*blockSize : (i+1)*blockSize] }
	for grp := range g.groups {
		if !isBackupGroup(grp) {
			continue
		}
		add(grp*blocksPerGroup, sbs(grp))
		for i := range g.gdtBlocks {
			if blk, ok := g.descBlockAt(grp, i); ok && (grp >= g.oldGroups || i >= firstChanged) {
				add(blk, descBlock(i))
			}
		}
	}
	// meta_bg descriptor blocks, in the first, second and last group of
	// each meta-group past the classic table. All of them are new.
	for i := g.gdtBlocks; i*descsPerBlock < g.groups; i++ {
		for _, grp := range [...]uint64{i * descsPerBlock, i*descsPerBlock + 1, (i+1)*descsPerBlock - 1} {
			if grp < g.groups {
				blk, _ := g.descBlockAt(grp, i)
				add(blk, descBlock(i))
			}
		}
	}
	slices.SortFunc(writes, func(x, y BlockWrite) int { return cmp.Compare(x.Offset, y.Offset) })
	// readBase keeps the base's metadata out of the copies' places, so
	// two writes to one block would be a bug here: refuse rather than
	// let one of them silently win.
	for i := 1; i < len(writes); i++ {
		if writes[i].Offset == writes[i-1].Offset {
			return GrowPlan{}, fmt.Errorf("ext4: planning growth to %d blocks: block %d would be written twice", g.blocks, writes[i].Offset/blockSize)
		}
	}
	p.Writes = writes
	return p, nil
}

// superblocks returns the superblock block of group grp after growth,
// made from the base's primary copy with the counts of p.
func (b *baseImage) superblocks(g *growGeometry, p GrowPlan) func(grp uint64) []byte {
	sb := slices.Clone(b.sb())
	le := binary.LittleEndian
	le.PutUint32(sb[sBlocksCountLo:], uint32(p.Blocks))
	le.PutUint32(sb[sBlocksCountHi:], uint32(p.Blocks>>32))
	le.PutUint32(sb[sFreeBlocksCountLo:], uint32(p.FreeBlocks))
	le.PutUint32(sb[sFreeBlocksCountHi:], uint32(p.FreeBlocks>>32))
	le.PutUint32(sb[sInodesCount:], uint32(p.Inodes))
	le.PutUint32(sb[sFreeInodesCount:], uint32(p.FreeInodes))
	if g.metaBG {
		le.PutUint32(sb[sFeatureIncompat:], le.Uint32(sb[sFeatureIncompat:])|ext4FeatureIncompatMetaBG)
		le.PutUint32(sb[sFirstMetaBg:], uint32(g.gdtBlocks))
	}
	return func(grp uint64) []byte {
		blk := make([]byte, blockSize)
		off := 0
		if grp == 0 {
			// Block 0 keeps its boot area and padding.
			copy(blk, b.block0)
			off = superblockOffset
		}
		s := blk[off : off+superblockSize]
		copy(s, sb)
		// s_block_group_nr is 16 bits wide; e2fsprogs truncates it too.
		le.PutUint16(s[sBlockGroupNr:], uint16(grp))
		le.PutUint32(s[sChecksum:], b.csum.sum(^uint32(0), s[:sChecksum]))
		return blk
	}
}

// Apply writes the plan's blocks to w, the disk being grown (opened over
// the base, and at least p.Size bytes).
func (p *GrowPlan) Apply(w io.WriterAt) error {
	for _, bw := range p.Writes {
		if _, err := w.WriteAt(bw.Data, int64(bw.Offset)); err != nil {
			return fmt.Errorf("ext4: writing grown filesystem block at byte %d: %w", bw.Offset, err)
		}
	}
	return nil
}
