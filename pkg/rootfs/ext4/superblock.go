package ext4

import (
	"encoding/binary"
	"hash/crc32"
)

// Feature bits; see the package comment for why this set.
const (
	compatHasJournal = 0x4
	compatExtAttr    = 0x8
	compatDirIndex   = 0x20

	incompatFiletype = 0x2
	incompatExtents  = 0x40
	incompat64bit    = 0x80
	incompatFlexBG   = 0x200

	roCompatSparseSuper  = 0x1
	roCompatLargeFile    = 0x2
	roCompatHugeFile     = 0x8
	roCompatDirNlink     = 0x20
	roCompatExtraIsize   = 0x40
	roCompatMetadataCsum = 0x400
)

const (
	sbMagic          = 0xEF53
	sbStateClean     = 1
	sbErrorsContinue = 1
	// sbFlagUnsignedHash records which dx hash variant the guest must use
	// for directories it indexes; stating it makes the choice
	// architecture-independent (e2fsck insists that one is set).
	sbFlagUnsignedHash = 0x2
	hashHalfMD4        = 1
	defmXattrUser      = 0x4
	defmACL            = 0x8
	jnlBackupBlocks    = 1 // s_jnl_blocks holds a copy of the journal inode's i_block
	checksumTypeCrc32c = 1

	// bgInodeUninit: no inode of the group is in use and its inode bitmap
	// was never written; the kernel and e2fsck treat it as empty.
	bgInodeUninit = 0x1
	bgInodeZeroed = 0x4 // inode table reads as zeros: no lazy init needed
)

// checksummer computes the crc32c-based metadata_csum checksums. ext4 uses
// the raw CRC (no pre/post inversion), while hash/crc32 inverts on entry and
// exit, hence the complements.
type checksummer struct {
	tab  *crc32.Table
	seed uint32 // crc32c(~0, uuid): the per-filesystem starting value
}

func newChecksummer(uuid [16]byte) checksummer {
	c := checksummer{tab: crc32.MakeTable(crc32.Castagnoli)}
	c.seed = c.sum(^uint32(0), uuid[:])
	return c
}

func (c checksummer) sum(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, c.tab, p)
}

func (c checksummer) sumU32(seed, v uint32) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return c.sum(seed, b[:])
}

// inodeSeed is the starting value for checksums of blocks owned by one inode
// (directory blocks, extent-tree blocks, the inode itself).
func (c checksummer) inodeSeed(ino uint32) uint32 {
	const generation = 0
	return c.sumU32(c.sumU32(c.seed, ino), generation)
}

// sbParams is what varies between superblocks.
type sbParams struct {
	blocks, freeBlocks uint64
	inodes, freeInodes uint32
	inodesPerGroup     uint32
	uuid, hashSeed     [16]byte
	label              [16]byte
	time               int64
	jnlBlocks          [17]uint32
	groupNr            uint16 // which group this copy lives in
}

// encodeSuperblock returns the 1024-byte superblock.
func (c checksummer) encodeSuperblock(p *sbParams) []byte {
	sb := make([]byte, 1024)
	le := binary.LittleEndian
	le.PutUint32(sb[0x00:], p.inodes)
	le.PutUint32(sb[0x04:], uint32(p.blocks))
	le.PutUint32(sb[0x0C:], uint32(p.freeBlocks))
	le.PutUint32(sb[0x10:], p.freeInodes)
	le.PutUint32(sb[0x14:], 0) // s_first_data_block: 0 for blocks > 1 KiB
	le.PutUint32(sb[0x18:], 2) // log2(blockSize) - 10
	le.PutUint32(sb[0x1C:], 2) // cluster size = block size (no bigalloc)
	le.PutUint32(sb[0x20:], blocksPerGroup)
	le.PutUint32(sb[0x24:], blocksPerGroup)
	le.PutUint32(sb[0x28:], p.inodesPerGroup)
	lo, hi := splitTime(p.time)
	le.PutUint32(sb[0x30:], lo) // s_wtime
	sb[0x274] = hi
	le.PutUint16(sb[0x36:], 0xFFFF) // s_max_mnt_count = -1: no forced checks
	le.PutUint16(sb[0x38:], sbMagic)
	le.PutUint16(sb[0x3A:], sbStateClean)
	le.PutUint16(sb[0x3C:], sbErrorsContinue)
	le.PutUint32(sb[0x40:], lo) // s_lastcheck
	sb[0x277] = hi
	le.PutUint32(sb[0x4C:], 1) // dynamic revision
	le.PutUint32(sb[0x54:], firstIno)
	le.PutUint16(sb[0x58:], inodeSize)
	le.PutUint16(sb[0x5A:], p.groupNr)
	le.PutUint32(sb[0x5C:], compatHasJournal|compatExtAttr|compatDirIndex)
	le.PutUint32(sb[0x60:], incompatFiletype|incompatExtents|incompat64bit|incompatFlexBG)
	le.PutUint32(sb[0x64:], roCompatSparseSuper|roCompatLargeFile|roCompatHugeFile|
		roCompatDirNlink|roCompatExtraIsize|roCompatMetadataCsum)
	copy(sb[0x68:], p.uuid[:])
	copy(sb[0x78:], p.label[:])
	le.PutUint32(sb[0xE0:], journalIno)
	copy(sb[0xEC:], p.hashSeed[:])
	sb[0xFC] = hashHalfMD4
	sb[0xFD] = jnlBackupBlocks
	le.PutUint16(sb[0xFE:], descSize)
	le.PutUint32(sb[0x100:], defmXattrUser|defmACL)
	le.PutUint32(sb[0x108:], lo) // s_mkfs_time
	sb[0x276] = hi
	for i, v := range p.jnlBlocks {
		le.PutUint32(sb[0x10C+4*i:], v)
	}
	le.PutUint32(sb[0x150:], uint32(p.blocks>>32))
	le.PutUint32(sb[0x158:], uint32(p.freeBlocks>>32))
	le.PutUint16(sb[0x15C:], extraIsize) // s_min_extra_isize
	le.PutUint16(sb[0x15E:], extraIsize) // s_want_extra_isize
	le.PutUint32(sb[0x160:], sbFlagUnsignedHash)
	sb[0x174] = logGroupsPerFlex
	sb[0x175] = checksumTypeCrc32c
	le.PutUint32(sb[0x3FC:], c.sum(^uint32(0), sb[:0x3FC]))
	return sb
}

// groupDesc is one block group descriptor.
type groupDesc struct {
	blockBitmap, inodeBitmap, inodeTable uint64
	freeBlocks, freeInodes, usedDirs     uint32
	itableUnused                         uint32
	flags                                uint16
	blockBitmapCsum, inodeBitmapCsum     uint32
}

func (c checksummer) encodeGroupDesc(dst []byte, group uint32, d *groupDesc) {
	le := binary.LittleEndian
	le.PutUint32(dst[0x00:], uint32(d.blockBitmap))
	le.PutUint32(dst[0x04:], uint32(d.inodeBitmap))
	le.PutUint32(dst[0x08:], uint32(d.inodeTable))
	le.PutUint16(dst[0x0C:], uint16(d.freeBlocks))
	le.PutUint16(dst[0x0E:], uint16(d.freeInodes))
	le.PutUint16(dst[0x10:], uint16(d.usedDirs))
	le.PutUint16(dst[0x12:], d.flags)
	le.PutUint16(dst[0x18:], uint16(d.blockBitmapCsum))
	le.PutUint16(dst[0x1A:], uint16(d.inodeBitmapCsum))
	le.PutUint16(dst[0x1C:], uint16(d.itableUnused))
	le.PutUint32(dst[0x20:], uint32(d.blockBitmap>>32))
	le.PutUint32(dst[0x24:], uint32(d.inodeBitmap>>32))
	le.PutUint32(dst[0x28:], uint32(d.inodeTable>>32))
	le.PutUint16(dst[0x2C:], uint16(d.freeBlocks>>16))
	le.PutUint16(dst[0x2E:], uint16(d.freeInodes>>16))
	le.PutUint16(dst[0x30:], uint16(d.usedDirs>>16))
	le.PutUint16(dst[0x32:], uint16(d.itableUnused>>16))
	le.PutUint16(dst[0x38:], uint16(d.blockBitmapCsum>>16))
	le.PutUint16(dst[0x3A:], uint16(d.inodeBitmapCsum>>16))
	// The descriptor checksum covers the group number and the descriptor
	// with the checksum field itself zeroed (it still is at this point).
	crc := c.sumU32(c.seed, group)
	crc = c.sum(crc, dst[:descSize])
	le.PutUint16(dst[0x1E:], uint16(crc))
}
