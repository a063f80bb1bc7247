package ext4

// This file names the on-disk format. It lists the byte offset of every
// field the encoders write, and the values stored in them. Each group mirrors one
// table of the kernel's ext4 documentation (Documentation/filesystems/ext4/,
// https://docs.kernel.org/filesystems/ext4/), so that an encoder line such
// as le.PutUint32(sb[sFeatureCompat:], ...) can be checked against the table
// row of the same name.
//
// A Go name is the kernel name in camel case. s_feature_compat becomes
// sFeatureCompat, and EXT4_FEATURE_COMPAT_HAS_JOURNAL becomes
// ext4FeatureCompatHasJournal. Two groups need a prefix the kernel does not
// have. Directory entry fields have bare names (inode, rec_len), so they get
// "de". The journal is the separate jbd2 format, and its s_ and h_ names
// would collide with the superblock's and the xattr header's, so they get
// "jbd2". Fields that are not listed are left zero.

// Superblock fields, from struct ext4_super_block in super.rst. The primary
// copy starts superblockOffset bytes into block 0, after the boot sector.
// Backup copies start at offset 0 of their block.
const (
	superblockOffset = 1024
	superblockSize   = 1024

	sInodesCount       = 0x0
	sBlocksCountLo     = 0x4
	sRBlocksCountLo    = 0x8
	sFreeBlocksCountLo = 0xC
	sFreeInodesCount   = 0x10
	sFirstDataBlock    = 0x14
	sLogBlockSize      = 0x18
	sLogClusterSize    = 0x1C
	sBlocksPerGroup    = 0x20
	sClustersPerGroup  = 0x24
	sInodesPerGroup    = 0x28
	sWtime             = 0x30
	sMaxMntCount       = 0x36
	sMagic             = 0x38
	sState             = 0x3A
	sErrors            = 0x3C
	sLastcheck         = 0x40
	sRevLevel          = 0x4C
	sFirstIno          = 0x54
	sInodeSize         = 0x58
	sBlockGroupNr      = 0x5A
	sFeatureCompat     = 0x5C
	sFeatureIncompat   = 0x60
	sFeatureRoCompat   = 0x64
	sUUID              = 0x68
	sVolumeName        = 0x78
	sReservedGdtBlocks = 0xCE // __le16
	sJournalInum       = 0xE0
	sHashSeed          = 0xEC
	sDefHashVersion    = 0xFC
	sJnlBackupType     = 0xFD
	sDescSize          = 0xFE
	sDefaultMountOpts  = 0x100
	sFirstMetaBg       = 0x104
	sMkfsTime          = 0x108
	sJnlBlocks         = 0x10C // __le32[17]
	sBlocksCountHi     = 0x150
	sRBlocksCountHi    = 0x154
	sFreeBlocksCountHi = 0x158
	sMinExtraIsize     = 0x15C
	sWantExtraIsize    = 0x15E
	sFlags             = 0x160
	sLogGroupsPerFlex  = 0x174
	sChecksumType      = 0x175
	sWtimeHi           = 0x274
	sMkfsTimeHi        = 0x276
	sLastcheckHi       = 0x277
	sChecksum          = 0x3FC
)

// Superblock values, from the same table. The package comment explains why
// this writer enables this particular feature set.
const (
	ext4SuperMagic     = 0xEF53 // s_magic
	ext4ValidFS        = 0x1    // s_state: cleanly unmounted
	ext4ErrorsContinue = 1      // s_errors
	ext4DynamicRev     = 1      // s_rev_level
	dxHashHalfMD4      = 1      // s_def_hash_version
	// ext3JnlBackupBlocks (s_jnl_backup_type) says that s_jnl_blocks holds
	// a copy of the journal inode's i_block.
	ext3JnlBackupBlocks = 1
	ext4DefmXattrUser   = 0x4 // s_default_mount_opts
	ext4DefmACL         = 0x8 // s_default_mount_opts
	// ext2FlagsUnsignedHash (s_flags) tells the guest which variant of the
	// directory hash to use for the directories it indexes. Stating it
	// makes the choice independent of the guest's architecture, and e2fsck
	// insists that one variant is set.
	ext2FlagsUnsignedHash = 0x2
	ext4Crc32cChksum      = 1 // s_checksum_type

	// s_jnl_blocks has jnlBlocksLen words. The first iBlockLen/4 are a copy
	// of the journal inode's i_block, followed by its i_size_high and its
	// i_size.
	jnlBlocksLen      = 17
	jnlBlocksSizeHigh = 15
	jnlBlocksSize     = 16

	ext4FeatureCompatHasJournal = 0x4
	ext4FeatureCompatExtAttr    = 0x8
	ext4FeatureCompatDirIndex   = 0x20

	ext4FeatureIncompatFiletype = 0x2
	ext4FeatureIncompatMetaBG   = 0x10 // never in a base; PlanGrow may set it (grow.go)
	ext4FeatureIncompatExtents  = 0x40
	ext4FeatureIncompat64bit    = 0x80
	ext4FeatureIncompatFlexBG   = 0x200

	ext4FeatureRoCompatSparseSuper  = 0x1
	ext4FeatureRoCompatLargeFile    = 0x2
	ext4FeatureRoCompatHugeFile     = 0x8
	ext4FeatureRoCompatDirNlink     = 0x20
	ext4FeatureRoCompatExtraIsize   = 0x40
	ext4FeatureRoCompatMetadataCsum = 0x400
)

// Group descriptor fields, from struct ext4_group_desc in group_descr.rst.
// This is the 64-byte form of the 64bit feature.
const (
	bgBlockBitmapLo     = 0x0
	bgInodeBitmapLo     = 0x4
	bgInodeTableLo      = 0x8
	bgFreeBlocksCountLo = 0xC
	bgFreeInodesCountLo = 0xE
	bgUsedDirsCountLo   = 0x10
	bgFlags             = 0x12
	bgBlockBitmapCsumLo = 0x18
	bgInodeBitmapCsumLo = 0x1A
	bgItableUnusedLo    = 0x1C
	bgChecksum          = 0x1E
	bgBlockBitmapHi     = 0x20
	bgInodeBitmapHi     = 0x24
	bgInodeTableHi      = 0x28
	bgFreeBlocksCountHi = 0x2C
	bgFreeInodesCountHi = 0x2E
	bgUsedDirsCountHi   = 0x30
	bgItableUnusedHi    = 0x32
	bgBlockBitmapCsumHi = 0x38
	bgInodeBitmapCsumHi = 0x3A
)

// Group descriptor bg_flags, from the same table.
const (
	// ext4BGInodeUninit marks a group whose inode bitmap was never written
	// because none of its inodes is in use. The kernel and e2fsck treat
	// the bitmap as empty.
	ext4BGInodeUninit = 0x1
	// ext4BGBlockUninit marks a group whose block bitmap was never
	// written. The kernel and e2fsck compute it from the group's own
	// metadata: its superblock and descriptor copies, and those of its
	// bitmaps and inode table that lie inside it. PlanGrow sets it on the
	// groups it adds.
	ext4BGBlockUninit = 0x2
	// ext4BGInodeZeroed says the inode table reads as zeros, so the kernel
	// need not zero it lazily after mounting.
	ext4BGInodeZeroed = 0x4
)

// Inode fields, from struct ext4_inode in inodes.rst. The l_i_ fields are
// the Linux view of the osd2 union at 0x74. The fields from i_extra_isize
// on exist because inodes are larger than the original 128 bytes.
const (
	iMode         = 0x0
	iUID          = 0x2
	iSizeLo       = 0x4
	iAtime        = 0x8
	iCtime        = 0xC
	iMtime        = 0x10
	iGID          = 0x18
	iLinksCount   = 0x1A
	iBlocksLo     = 0x1C
	iFlags        = 0x20
	iBlock        = 0x28 // iBlockLen bytes: extent tree root, fast symlink or device
	iFileACLLo    = 0x68
	iSizeHigh     = 0x6C
	lIBlocksHigh  = 0x74
	lIFileACLHigh = 0x76
	lIUIDHigh     = 0x78
	lIGIDHigh     = 0x7A
	lIChecksumLo  = 0x7C
	iExtraIsize   = 0x80
	iChecksumHi   = 0x82
	iCtimeExtra   = 0x84
	iMtimeExtra   = 0x88
	iAtimeExtra   = 0x8C
	iCrtime       = 0x90
	iCrtimeExtra  = 0x94

	iBlockLen = 60 // i_block is EXT4_N_BLOCKS (15) 32-bit words
	// goodOldInodeSize is EXT4_GOOD_OLD_INODE_SIZE, the size of the
	// original inode. i_extra_isize counts the bytes used after it.
	goodOldInodeSize = 128
)

// Inode values from the same document: the file types of i_mode, and the
// i_flags bit this writer sets.
const (
	sIFMT   = 0xF000
	sIFSOCK = 0xC000
	sIFLNK  = 0xA000
	sIFREG  = 0x8000
	sIFBLK  = 0x6000
	sIFDIR  = 0x4000
	sIFCHR  = 0x2000
	sIFIFO  = 0x1000

	// ext4ExtentsFL says that i_block holds an extent tree.
	ext4ExtentsFL = 0x80000
)

// Special inode numbers, from special_inodes.rst.
const (
	rootIno    = 2  // EXT4_ROOT_INO
	journalIno = 8  // EXT4_JOURNAL_INO
	firstIno   = 11 // EXT4_GOOD_OLD_FIRST_INO, the first non-reserved inode
	// lostFoundIno is the first non-reserved inode, by convention.
	lostFoundIno = 11
)

// Extent tree nodes, from struct ext4_extent_header, struct ext4_extent_idx
// and struct ext4_extent in ifork.rst. Every node (the 60-byte root in i_block,
// or a whole block) starts with the header, followed by eh_max entries of
// 12 bytes. Nodes in blocks end with struct ext4_extent_tail (et_checksum)
// right after those entries.
const (
	ehMagic          = 0x0
	ehEntries        = 0x2
	ehMax            = 0x4
	ehDepth          = 0x6
	extentHeaderSize = 12

	eiBlock  = 0x0 // index entry: first logical block of the child
	eiLeafLo = 0x4
	eiLeafHi = 0x8

	eeBlock         = 0x0 // leaf entry: first logical block of the extent
	eeLen           = 0x4
	eeStartHi       = 0x6
	eeStartLo       = 0x8
	extentEntrySize = 12 // an index entry or a leaf entry

	extentTailSize = 4
	ext4ExtMagic   = 0xF30A // eh_magic
)

// Directory entries, from struct ext4_dir_entry_2 and struct
// ext4_dir_entry_tail in directory.rst. The tail is a fake entry of
// dirTailSize bytes at the end of each block that holds the block's
// checksum.
const (
	deInode    = 0x0
	deRecLen   = 0x4
	deNameLen  = 0x6
	deFileType = 0x7
	deName     = 0x8

	detRecLen     = 0x4
	detReservedFt = 0x7
	detChecksum   = 0x8
	dirTailSize   = 12

	// File type codes for file_type (the filetype feature) and
	// det_reserved_ft.
	ext4FTUnknown = 0
	ext4FTRegFile = 1
	ext4FTDir     = 2
	ext4FTChrdev  = 3
	ext4FTBlkdev  = 4
	ext4FTFifo    = 5
	ext4FTSock    = 6
	ext4FTSymlink = 7
	ext4FTDirCsum = 0xDE
)

// Extended attributes, from attributes.rst. struct ext4_xattr_header starts
// an attribute block, struct ext4_xattr_ibody_header starts the attributes
// stored in the inode after the extra fields, and struct ext4_xattr_entry
// describes one attribute. Both headers start
// with h_magic.
const (
	hMagic          = 0x0
	hRefcount       = 0x4
	hBlocks         = 0x8
	hHash           = 0xC
	hChecksum       = 0x10
	xattrHeaderSize = 32 // struct ext4_xattr_header
	ibodyHeaderSize = 4  // struct ext4_xattr_ibody_header

	eNameLen   = 0x0
	eNameIndex = 0x1
	eValueOffs = 0x2
	eValueSize = 0x8
	eHash      = 0xC
	eName      = 0x10 // the fixed part of an entry ends here

	ext4XattrMagic = 0xEA020000 // h_magic

	// Name indexes for e_name_index. ext4 stores one of these instead of
	// the name's prefix.
	ext4XattrIndexUser            = 1
	ext4XattrIndexPosixACLAccess  = 2
	ext4XattrIndexPosixACLDefault = 3
	ext4XattrIndexTrusted         = 4
	ext4XattrIndexSecurity        = 6
)

// Journal superblock, from journal_header_t and journal_superblock_t in
// journal.rst. Unlike the rest of the filesystem, jbd2 is big-endian.
const (
	jbd2HMagic     = 0x0
	jbd2HBlocktype = 0x4
	jbd2SBlocksize = 0xC
	jbd2SMaxlen    = 0x10
	jbd2SFirst     = 0x14
	jbd2SSequence  = 0x18
	jbd2SStart     = 0x1C
	jbd2SUUID      = 0x30
	jbd2SNrUsers   = 0x40

	jbd2MagicNumber  = 0xC03B3998 // h_magic
	jbd2SuperblockV2 = 4          // h_blocktype
)
