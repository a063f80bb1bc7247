package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

// ErrNotGrowable marks a base that PlanGrow refuses to grow: not an ext4
// image, damaged, or not one this package's Writer writes today (another
// tool's image, or an older layout). The error wrapping it says which check
// failed.
var ErrNotGrowable = errors.New("not a base image this package can grow")

// baseImage is what growth needs of a base, read and checked by readBase.
type baseImage struct {
	size      int64  // bytes in the base file
	block0    []byte // block 0: boot area, primary superblock, padding
	csum      checksummer
	blocks    uint64
	groups    uint64
	ipg       uint64 // inodes per group
	gdtBlocks uint64
	gdt       []byte // the classic descriptor table, gdtBlocks blocks
	// freeBlocks and freeInodes are the sums over the descriptors, which
	// match the superblock's counts in a base.
	freeBlocks, freeInodes uint64
	// lastBitmap is the block bitmap of the last group.
	lastBitmap []byte
}

// Features of a base, exactly as encodeSuperblock sets them. Anything else
// (meta_bg, resize_inode, bigalloc, a checksum seed, a journal that needs
// recovery, ...) changes where metadata lives or what it means.
const (
	baseCompat   = ext4FeatureCompatHasJournal | ext4FeatureCompatExtAttr | ext4FeatureCompatDirIndex
	baseIncompat = ext4FeatureIncompatFiletype | ext4FeatureIncompatExtents | ext4FeatureIncompat64bit | ext4FeatureIncompatFlexBG
	baseRoCompat = ext4FeatureRoCompatSparseSuper | ext4FeatureRoCompatLargeFile | ext4FeatureRoCompatHugeFile |
		ext4FeatureRoCompatDirNlink | ext4FeatureRoCompatExtraIsize | ext4FeatureRoCompatMetadataCsum
)

// Group descriptor flags a base uses. A base never has BLOCK_UNINIT
// groups: every block bitmap is written (or is a hole that reads as the
// all-free bitmap it is).
const baseGroupFlags = ext4BGInodeUninit | ext4BGInodeZeroed

func notGrowable(format string, args ...any) error {
	return fmt.Errorf("ext4: base: %s: %w", fmt.Sprintf(format, args...), ErrNotGrowable)
}

// readBlocks reads n blocks from blk on, refusing to read past size. A
// short read without an error is still an error: the base is a regular
// file of known size.
func readBlocks(r io.ReaderAt, size int64, blk, n uint64, what string) ([]byte, error) {
	if n == 0 || blk >= uint64(size)/blockSize || n > uint64(size)/blockSize-blk {
		return nil, notGrowable("%s (blocks %d..%d) lie past the end of the %d-byte file", what, blk, blk+n-1, size)
	}
	p := make([]byte, n*blockSize)
	got, err := r.ReadAt(p, int64(blk)*blockSize)
	if got == len(p) {
		return p, nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return nil, fmt.Errorf("ext4: base: reading %s at block %d: %w", what, blk, err)
}

// readBase reads the superblock, the descriptor table and the last group's
// block bitmap of a base of size bytes, and checks that they describe the
// geometry this package's Writer writes, with every checksum right. It
// reads at most the table plus two blocks, whatever the bytes claim.
func readBase(r io.ReaderAt, size int64) (*baseImage, error) {
	if size < blockSize || size > maxSize {
		return nil, notGrowable("its size, %d bytes, is outside 4 KiB..16 TiB", size)
	}
	block0, err := readBlocks(r, size, 0, 1, "the superblock")
	if err != nil {
		return nil, err
	}
	b := &baseImage{size: size, block0: block0}
	if err := b.checkSuperblock(); err != nil {
		return nil, err
	}
	if b.gdt, err = readBlocks(r, size, 1, b.gdtBlocks, "the group descriptor table"); err != nil {
		return nil, err
	}
	if err := b.checkDescriptors(); err != nil {
		return nil, err
	}
	last := b.desc(b.groups - 1)
	if b.lastBitmap, err = readBlocks(r, size, last.blockBitmap, 1, "the last group's block bitmap"); err != nil {
		return nil, err
	}
	if err := b.checkLastBitmap(last); err != nil {
		return nil, err
	}
	return b, nil
}

// sb is the primary superblock.
func (b *baseImage) sb() []byte { return b.block0[superblockOffset : superblockOffset+superblockSize] }

func (b *baseImage) checkSuperblock() error {
	sb := b.sb()
	le := binary.LittleEndian
	u16 := func(off int) uint64 { return uint64(le.Uint16(sb[off:])) }
	u32 := func(off int) uint64 { return uint64(le.Uint32(sb[off:])) }
	if m := u16(sMagic); m != ext4SuperMagic {
		return notGrowable("the superblock's magic is %#x, not ext4's %#x", m, ext4SuperMagic)
	}
	// The checksum comes first: with it right, every other mismatch is a
	// different layout, not a damaged block.
	if sb[sChecksumType] != ext4Crc32cChksum || u32(sFeatureRoCompat)&ext4FeatureRoCompatMetadataCsum == 0 {
		return notGrowable("the superblock has no crc32c metadata checksums")
	}
	var uuid [16]byte
	copy(uuid[:], sb[sUUID:])
	b.csum = newChecksummer(uuid)
	if got, want := u32(sChecksum), uint64(b.csum.sum(^uint32(0), sb[:sChecksum])); got != want {
		return notGrowable("the superblock's checksum is %#x, but its bytes sum to %#x", got, want)
	}
	if c, i, ro := u32(sFeatureCompat), u32(sFeatureIncompat), u32(sFeatureRoCompat); c != baseCompat || i != baseIncompat || ro != baseRoCompat {
		return notGrowable("its features are compat %#x, incompat %#x, ro_compat %#x, not a base's %#x, %#x, %#x",
			c, i, ro, baseCompat, baseIncompat, baseRoCompat)
	}
	for _, f := range []struct {
		name      string
		got, want uint64
	}{
		{"revision level", u32(sRevLevel), ext4DynamicRev},
		{"state", u16(sState), ext4ValidFS}, // clean: no error, no orphans
		{"log block size", u32(sLogBlockSize), 2},
		{"log cluster size", u32(sLogClusterSize), 2},
		{"first data block", u32(sFirstDataBlock), 0},
		{"blocks per group", u32(sBlocksPerGroup), blocksPerGroup},
		{"clusters per group", u32(sClustersPerGroup), blocksPerGroup},
		{"inode size", u16(sInodeSize), inodeSize},
		{"descriptor size", u16(sDescSize), descSize},
		{"first inode", u32(sFirstIno), firstIno},
		{"reserved GDT blocks", u16(sReservedGdtBlocks), 0},
		{"first meta_bg", u32(sFirstMetaBg), 0},
		{"reserved blocks (low)", u32(sRBlocksCountLo), 0},
		{"reserved blocks (high)", u32(sRBlocksCountHi), 0},
		{"group number", u16(sBlockGroupNr), 0},
	} {
		if f.got != f.want {
			return notGrowable("the superblock's %s is %d, not %d", f.name, f.got, f.want)
		}
	}
	b.blocks = u32(sBlocksCountLo) | u32(sBlocksCountHi)<<32
	// The first test keeps the product from wrapping around.
	if b.blocks > maxSize/blockSize || b.blocks*blockSize != uint64(b.size) {
		return notGrowable("the filesystem has %d blocks, but the file has %d bytes", b.blocks, b.size)
	}
	b.groups = ceilDiv(b.blocks, blocksPerGroup)
	b.gdtBlocks = ceilDiv(b.groups, descsPerBlock)
	b.ipg = u32(sInodesPerGroup)
	if b.ipg == 0 || b.ipg > maxInodesPerGroup || b.ipg%inodesPerBlock != 0 {
		return notGrowable("the superblock's inodes per group, %d, is not a positive multiple of %d up to %d",
			b.ipg, inodesPerBlock, maxInodesPerGroup)
	}
	if n := u32(sInodesCount); n != b.groups*b.ipg {
		return notGrowable("the superblock counts %d inodes, but %d groups of %d make %d", n, b.groups, b.ipg, b.groups*b.ipg)
	}
	return nil
}

// desc decodes the descriptor of base group grp.
func (b *baseImage) desc(grp uint64) groupDesc {
	return decodeGroupDesc(b.gdt[grp*descSize : (grp+1)*descSize])
}

func (b *baseImage) checkDescriptors() error {
	for grp := range b.groups {
		raw := b.gdt[grp*descSize : (grp+1)*descSize]
		if got, want := binary.LittleEndian.Uint16(raw[bgChecksum:]), b.csum.descChecksum(raw, uint32(grp)); got != want {
			return notGrowable("group %d's descriptor checksum is %#x, but its bytes sum to %#x", grp, got, want)
		}
		d := decodeGroupDesc(raw)
		if d.flags&^baseGroupFlags != 0 {
			return notGrowable("group %d has descriptor flags %#x; a base uses only %#x", grp, d.flags, baseGroupFlags)
		}
		for _, m := range []struct {
			name     string
			blk, len uint64
		}{
			{"block bitmap", d.blockBitmap, 1},
			{"inode bitmap", d.inodeBitmap, 1},
			{"inode table", d.inodeTable, b.ipg * inodeSize / blockSize},
		} {
			if m.blk <= b.gdtBlocks || m.blk >= b.blocks || m.len > b.blocks-m.blk {
				return notGrowable("group %d's %s at block %d is outside the filesystem's data area", grp, m.name, m.blk)
			}
			// Growth rewrites the superblock and descriptor copies, so
			// nothing else may live there.
			if h, ok := b.inBackupArea(m.blk, m.len); ok {
				return notGrowable("group %d's %s at block %d overlaps the superblock and descriptor copies of group %d", grp, m.name, m.blk, h)
			}
		}
		if d.freeBlocks > blocksPerGroup || uint64(d.freeInodes) > b.ipg || uint64(d.itableUnused) > b.ipg {
			return notGrowable("group %d counts %d free blocks, %d free and %d unused inodes, more than a group has",
				grp, d.freeBlocks, d.freeInodes, d.itableUnused)
		}
		b.freeBlocks += uint64(d.freeBlocks)
		b.freeInodes += uint64(d.freeInodes)
	}
	sb := b.sb()
	le := binary.LittleEndian
	if n := uint64(le.Uint32(sb[sFreeBlocksCountLo:])) | uint64(le.Uint32(sb[sFreeBlocksCountHi:]))<<32; n != b.freeBlocks {
		return notGrowable("the superblock counts %d free blocks, the descriptors %d", n, b.freeBlocks)
	}
	if n := uint64(le.Uint32(sb[sFreeInodesCount:])); n != b.freeInodes {
		return notGrowable("the superblock counts %d free inodes, the descriptors %d", n, b.freeInodes)
	}
	return nil
}

// inBackupArea reports whether blocks blk..blk+n-1 (n at most a group)
// overlap the superblock and descriptor copies at the start of a
// sparse_super backup group, and which group's.
func (b *baseImage) inBackupArea(blk, n uint64) (uint64, bool) {
	for h := blk / blocksPerGroup; h <= (blk+n-1)/blocksPerGroup; h++ {
		if isBackupGroup(h) && blk < h*blocksPerGroup+1+b.gdtBlocks && blk+n > h*blocksPerGroup {
			return h, true
		}
	}
	return 0, false
}

// checkLastBitmap checks the last group's block bitmap against its
// descriptor: the checksum, the free count, and the padding past the end
// of the filesystem, which growth turns into free blocks and so must be
// nothing but padding.
func (b *baseImage) checkLastBitmap(d groupDesc) error {
	bm := b.lastBitmap
	if got, want := d.blockBitmapCsum, b.csum.sum(b.csum.seed, bm); got != want {
		return notGrowable("the last group's block bitmap checksum is %#x, but its bytes sum to %#x", got, want)
	}
	used := 0
	for i := 0; i < len(bm); i += 8 {
		used += bits.OnesCount64(binary.LittleEndian.Uint64(bm[i:]))
	}
	if free := uint64(blocksPerGroup - used); free != uint64(d.freeBlocks) {
		return notGrowable("the last group's block bitmap has %d free blocks, its descriptor says %d", free, d.freeBlocks)
	}
	for bit := b.blocks - (b.groups-1)*blocksPerGroup; bit < blocksPerGroup; bit++ {
		if bm[bit/8]&(1<<(bit%8)) == 0 {
			return notGrowable("block %d, past the end of the filesystem, is free in the last group's bitmap", (b.groups-1)*blocksPerGroup+bit)
		}
	}
	return nil
}

// decodeGroupDesc is the inverse of encodeGroupDesc.
func decodeGroupDesc(raw []byte) groupDesc {
	le := binary.LittleEndian
	u16 := func(lo, hi int) uint32 { return uint32(le.Uint16(raw[lo:])) | uint32(le.Uint16(raw[hi:]))<<16 }
	u64 := func(lo, hi int) uint64 { return uint64(le.Uint32(raw[lo:])) | uint64(le.Uint32(raw[hi:]))<<32 }
	return groupDesc{
		blockBitmap:     u64(bgBlockBitmapLo, bgBlockBitmapHi),
		inodeBitmap:     u64(bgInodeBitmapLo, bgInodeBitmapHi),
		inodeTable:      u64(bgInodeTableLo, bgInodeTableHi),
		freeBlocks:      u16(bgFreeBlocksCountLo, bgFreeBlocksCountHi),
		freeInodes:      u16(bgFreeInodesCountLo, bgFreeInodesCountHi),
		usedDirs:        u16(bgUsedDirsCountLo, bgUsedDirsCountHi),
		itableUnused:    u16(bgItableUnusedLo, bgItableUnusedHi),
		flags:           le.Uint16(raw[bgFlags:]),
		blockBitmapCsum: u16(bgBlockBitmapCsumLo, bgBlockBitmapCsumHi),
		inodeBitmapCsum: u16(bgInodeBitmapCsumLo, bgInodeBitmapCsumHi),
	}
}

// descChecksum is bg_checksum for the descriptor raw of group grp: the
// crc32c of the group number and the descriptor with bg_checksum taken as
// zero, cut to 16 bits.
func (c checksummer) descChecksum(raw []byte, grp uint32) uint16 {
	var zero [2]byte
	crc := c.sumU32(c.seed, grp)
	crc = c.sum(crc, raw[:bgChecksum])
	crc = c.sum(crc, zero[:])
	crc = c.sum(crc, raw[bgChecksum+2:descSize])
	return uint16(crc)
}
