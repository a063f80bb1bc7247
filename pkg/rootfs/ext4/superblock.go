package ext4

import (
	"encoding/binary"
	"hash/crc32"
)

// checksummer computes the crc32c checksums of metadata_csum. ext4 uses the
// raw CRC, without the usual inversion before and after. hash/crc32 inverts
// on entry and on exit, so sum complements both the seed and the result to
// undo that.
type checksummer struct {
	tab  *crc32.Table
	seed uint32 // crc32c(~0, uuid), the starting value for this filesystem
}

func newChecksummer(uuid [16]byte) checksummer {
	c := checksummer{tab: crc32.MakeTable(crc32.Castagnoli)}
	c.seed = c.sum(^uint32(0), uuid[:])
	return c
}

func (c checksummer) sum(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, c.tab, p)
}

// sumU32 is sum over v's four little-endian bytes, computed inline: it
// runs a few times per inode, and a slice for crc32 would be garbage.
func (c checksummer) sumU32(seed, v uint32) uint32 {
	crc := seed
	for range 4 {
		crc = c.tab[byte(crc)^byte(v)] ^ crc>>8
		v >>= 8
	}
	return crc
}

// inodeSeed is the starting value for the checksums of what one inode owns:
// its directory blocks, its extent-tree blocks and the inode itself.
func (c checksummer) inodeSeed(ino uint32) uint32 {
	const generation = 0
	return c.sumU32(c.sumU32(c.seed, ino), generation)
}

// sbParams holds the superblock fields that depend on the image. groupNr
// also differs between the copies of one image.
type sbParams struct {
	blocks, freeBlocks uint64
	inodes, freeInodes uint32
	inodesPerGroup     uint32
	uuid, hashSeed     [16]byte
	label              [16]byte
	time               int64
	jnlBlocks          [jnlBlocksLen]uint32
	groupNr            uint16 // which group this copy lives in
}

// encodeSuperblock returns the superblock (superblockSize bytes).
func (c checksummer) encodeSuperblock(p *sbParams) []byte {
	sb := make([]byte, superblockSize)
	le := binary.LittleEndian
	le.PutUint32(sb[sInodesCount:], p.inodes)
	le.PutUint32(sb[sBlocksCountLo:], uint32(p.blocks))
	le.PutUint32(sb[sFreeBlocksCountLo:], uint32(p.freeBlocks))
	le.PutUint32(sb[sFreeInodesCount:], p.freeInodes)
	le.PutUint32(sb[sFirstDataBlock:], 0) // 0 for blocks larger than 1 KiB
	le.PutUint32(sb[sLogBlockSize:], 2)   // blockSize is 1024 << 2
	le.PutUint32(sb[sLogClusterSize:], 2) // a cluster is one block (no bigalloc)
	le.PutUint32(sb[sBlocksPerGroup:], blocksPerGroup)
	le.PutUint32(sb[sClustersPerGroup:], blocksPerGroup)
	le.PutUint32(sb[sInodesPerGroup:], p.inodesPerGroup)
	// The image's creation, last write and last check all happened at
	// p.time.
	lo, hi := splitTime(p.time)
	le.PutUint32(sb[sWtime:], lo)
	sb[sWtimeHi] = hi
	le.PutUint32(sb[sLastcheck:], lo)
	sb[sLastcheckHi] = hi
	le.PutUint32(sb[sMkfsTime:], lo)
	sb[sMkfsTimeHi] = hi
	le.PutUint16(sb[sMaxMntCount:], 0xFFFF) // -1: the mount count never forces a check
	le.PutUint16(sb[sMagic:], ext4SuperMagic)
	le.PutUint16(sb[sState:], ext4ValidFS)
	le.PutUint16(sb[sErrors:], ext4ErrorsContinue)
	le.PutUint32(sb[sRevLevel:], ext4DynamicRev)
	le.PutUint32(sb[sFirstIno:], firstIno)
	le.PutUint16(sb[sInodeSize:], inodeSize)
	le.PutUint16(sb[sBlockGroupNr:], p.groupNr)
	le.PutUint32(sb[sFeatureCompat:], ext4FeatureCompatHasJournal|ext4FeatureCompatExtAttr|ext4FeatureCompatDirIndex)
	le.PutUint32(sb[sFeatureIncompat:], ext4FeatureIncompatFiletype|ext4FeatureIncompatExtents|
		ext4FeatureIncompat64bit|ext4FeatureIncompatFlexBG)
	le.PutUint32(sb[sFeatureRoCompat:], ext4FeatureRoCompatSparseSuper|ext4FeatureRoCompatLargeFile|
		ext4FeatureRoCompatHugeFile|ext4FeatureRoCompatDirNlink|ext4FeatureRoCompatExtraIsize|
		ext4FeatureRoCompatMetadataCsum)
	copy(sb[sUUID:], p.uuid[:])
	copy(sb[sVolumeName:], p.label[:])
	le.PutUint32(sb[sJournalInum:], journalIno)
	copy(sb[sHashSeed:], p.hashSeed[:])
	sb[sDefHashVersion] = dxHashHalfMD4
	sb[sJnlBackupType] = ext3JnlBackupBlocks
	le.PutUint16(sb[sDescSize:], descSize)
	le.PutUint32(sb[sDefaultMountOpts:], ext4DefmXattrUser|ext4DefmACL)
	for i, v := range p.jnlBlocks {
		le.PutUint32(sb[sJnlBlocks+4*i:], v)
	}
	le.PutUint32(sb[sBlocksCountHi:], uint32(p.blocks>>32))
	le.PutUint32(sb[sFreeBlocksCountHi:], uint32(p.freeBlocks>>32))
	le.PutUint16(sb[sMinExtraIsize:], extraIsize)
	le.PutUint16(sb[sWantExtraIsize:], extraIsize)
	le.PutUint32(sb[sFlags:], ext2FlagsUnsignedHash)
	sb[sLogGroupsPerFlex] = logGroupsPerFlex
	sb[sChecksumType] = ext4Crc32cChksum
	le.PutUint32(sb[sChecksum:], c.sum(^uint32(0), sb[:sChecksum]))
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

// encodeGroupDesc fills dst (descSize bytes, zeroed) with the descriptor of
// group number group.
func (c checksummer) encodeGroupDesc(dst []byte, group uint32, d *groupDesc) {
	le := binary.LittleEndian
	le.PutUint32(dst[bgBlockBitmapLo:], uint32(d.blockBitmap))
	le.PutUint32(dst[bgInodeBitmapLo:], uint32(d.inodeBitmap))
	le.PutUint32(dst[bgInodeTableLo:], uint32(d.inodeTable))
	le.PutUint16(dst[bgFreeBlocksCountLo:], uint16(d.freeBlocks))
	le.PutUint16(dst[bgFreeInodesCountLo:], uint16(d.freeInodes))
	le.PutUint16(dst[bgUsedDirsCountLo:], uint16(d.usedDirs))
	le.PutUint16(dst[bgFlags:], d.flags)
	le.PutUint16(dst[bgBlockBitmapCsumLo:], uint16(d.blockBitmapCsum))
	le.PutUint16(dst[bgInodeBitmapCsumLo:], uint16(d.inodeBitmapCsum))
	le.PutUint16(dst[bgItableUnusedLo:], uint16(d.itableUnused))
	le.PutUint32(dst[bgBlockBitmapHi:], uint32(d.blockBitmap>>32))
	le.PutUint32(dst[bgInodeBitmapHi:], uint32(d.inodeBitmap>>32))
	le.PutUint32(dst[bgInodeTableHi:], uint32(d.inodeTable>>32))
	le.PutUint16(dst[bgFreeBlocksCountHi:], uint16(d.freeBlocks>>16))
	le.PutUint16(dst[bgFreeInodesCountHi:], uint16(d.freeInodes>>16))
	le.PutUint16(dst[bgUsedDirsCountHi:], uint16(d.usedDirs>>16))
	le.PutUint16(dst[bgItableUnusedHi:], uint16(d.itableUnused>>16))
	le.PutUint16(dst[bgBlockBitmapCsumHi:], uint16(d.blockBitmapCsum>>16))
	le.PutUint16(dst[bgInodeBitmapCsumHi:], uint16(d.inodeBitmapCsum>>16))
	// The descriptor checksum covers the group number, then the descriptor
	// with bg_checksum itself zeroed, which it still is at this point.
	crc := c.sumU32(c.seed, group)
	crc = c.sum(crc, dst[:descSize])
	le.PutUint16(dst[bgChecksum:], uint16(crc))
}
