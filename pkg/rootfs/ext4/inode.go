package ext4

import (
	"encoding/binary"
	"math"
	"time"
)

const (
	// fastSymlinkMax is the longest symlink target stored inside i_block.
	// Longer targets get a data block.
	fastSymlinkMax = iBlockLen - 1
	maxSymlinkLen  = blockSize - 1
	// maxLinks is EXT4_LINK_MAX. A directory with more subdirectories gets
	// a link count of 1 (dir_nlink), and a regular file cannot have more
	// hard links.
	maxLinks = 65000
)

// timestamp is a Unix time in the range ext4 can store with extra fields:
// 34 bits of seconds starting at 1901-12-13, plus nanoseconds. It is kept
// in its on-disk form, 8 bytes: an inode's 32-bit seconds field and the
// matching _extra field, which holds two epoch bits that extend the signed
// 32-bit seconds, and the nanoseconds shifted left by 2.
type timestamp struct {
	lo, extra uint32
}

const (
	minTime = math.MinInt32
	maxTime = math.MaxInt32 + 3<<32
)

func toTimestamp(t time.Time) timestamp {
	sec, nsec := t.Unix(), uint32(t.Nanosecond())
	if sec < minTime {
		sec, nsec = minTime, 0
	}
	if sec > maxTime {
		sec, nsec = maxTime, 999999999
	}
	epoch := uint32((sec-int64(int32(sec)))>>32) & 3
	return timestamp{lo: uint32(int32(sec)), extra: nsec<<2 | epoch}
}

// encode returns the seconds field and the _extra field.
func (t timestamp) encode() (lo, extra uint32) { return t.lo, t.extra }

// seconds is the time in seconds since the Unix epoch.
func (t timestamp) seconds() int64 { return int64(int32(t.lo)) + int64(t.extra&3)<<32 }

// splitTime splits seconds into the low 32 bits and the 8-bit high part, as
// superblock times store them. Times before 1970 become 0.
func splitTime(sec int64) (uint32, uint8) {
	if sec < 0 {
		sec = 0
	}
	return uint32(sec), uint8(sec >> 32)
}

// inode is the in-memory form of a file. Hard links share one inode. It
// holds no pointers and only what most inodes need (64 bytes), because an
// image may have a million of them; the rest is in an inodeExtra.
type inode struct {
	size                uint64
	atime, mtime, ctime timestamp
	uid, gid            uint32
	// ext and nExt locate the inode's extents, in logical order: file data
	// in Writer.exts for regular files, the blocks Finish allocates in
	// Writer.metaExts for the others.
	ext, nExt uint32
	extra     uint32 // index in tree.extras, or 0 for none
	// Assigned by Finish.
	num uint32
	dir uint32 // directories: 1 + index in Writer.dirs
	// mode is the type and the permission bits, incl. setuid/setgid/sticky.
	mode uint16
	// links counts the directory entries naming a non-directory. Finish
	// sets it to the final i_links_count of every inode.
	links uint16
}

// inodeExtra holds the fields few inodes need.
type inodeExtra struct {
	target             string  // symlink target
	devMajor, devMinor uint32  // character and block devices
	xattrs             []xattr // sorted, as stored on disk

	// Assigned by Finish.
	treeBlocks  []uint64    // extent-tree blocks below the in-inode root
	xblock      *xattrBlock // external xattr block, nil if none
	ibodyXattrs []xattr     // the part of xattrs stored inside the inode
}

func (x *inodeExtra) empty() bool {
	return x.target == "" && x.devMajor == 0 && x.devMinor == 0 && len(x.xattrs) == 0
}

func (in *inode) isDir() bool     { return in.mode&sIFMT == sIFDIR }
func (in *inode) isReg() bool     { return in.mode&sIFMT == sIFREG }
func (in *inode) isSymlink() bool { return in.mode&sIFMT == sIFLNK }

// usesExtents reports whether i_block holds an extent tree. Otherwise it
// holds a fast symlink's target or a device number, or nothing.
func (in *inode) usesExtents(target string) bool {
	return in.isReg() || in.isDir() || in.isSymlink() && len(target) > fastSymlinkMax
}

// extent maps length logical blocks starting at logical to physical blocks
// starting at start.
type extent struct {
	logical uint32
	length  uint16
	start   uint64
}

// encodeInode fills dst (inodeSize bytes, zeroed, with i_block already
// filled in by the caller) with the on-disk inode. dataBlocks is the data
// blocks the inode maps (holes excluded) and x its extra fields, if any.
func (c checksummer) encodeInode(dst []byte, in *inode, x *inodeExtra, dataBlocks uint64, target string) {
	le := binary.LittleEndian
	atime, atimeX := in.atime.encode()
	ctime, ctimeX := in.ctime.encode()
	mtime, mtimeX := in.mtime.encode()
	le.PutUint16(dst[iMode:], in.mode)
	le.PutUint16(dst[iUID:], uint16(in.uid))
	le.PutUint16(dst[lIUIDHigh:], uint16(in.uid>>16))
	le.PutUint16(dst[iGID:], uint16(in.gid))
	le.PutUint16(dst[lIGIDHigh:], uint16(in.gid>>16))
	le.PutUint32(dst[iSizeLo:], uint32(in.size))
	le.PutUint32(dst[iSizeHigh:], uint32(in.size>>32))
	le.PutUint32(dst[iAtime:], atime)
	le.PutUint32(dst[iAtimeExtra:], atimeX)
	le.PutUint32(dst[iCtime:], ctime)
	le.PutUint32(dst[iCtimeExtra:], ctimeX)
	le.PutUint32(dst[iMtime:], mtime)
	le.PutUint32(dst[iMtimeExtra:], mtimeX)
	// The layer created the file when it last changed it, so the creation
	// time is the change time.
	le.PutUint32(dst[iCrtime:], ctime)
	le.PutUint32(dst[iCrtimeExtra:], ctimeX)
	le.PutUint16(dst[iLinksCount:], in.links)
	// i_blocks counts the 512-byte sectors of everything the inode owns,
	// extent-tree and xattr blocks included. With huge_file it has 48 bits.
	owned := dataBlocks
	var xblk uint64
	var ibody []xattr
	if x != nil {
		owned += uint64(len(x.treeBlocks))
		if x.xblock != nil {
			owned++
			xblk = x.xblock.blk
		}
		ibody = x.ibodyXattrs
	}
	sectors := owned * (blockSize / 512)
	le.PutUint32(dst[iBlocksLo:], uint32(sectors))
	le.PutUint16(dst[lIBlocksHigh:], uint16(sectors>>32))
	if in.usesExtents(target) {
		le.PutUint32(dst[iFlags:], ext4ExtentsFL)
	}
	le.PutUint32(dst[iFileACLLo:], uint32(xblk))
	le.PutUint16(dst[lIFileACLHigh:], uint16(xblk>>32))
	le.PutUint16(dst[iExtraIsize:], extraIsize)
	if len(ibody) > 0 {
		body := dst[goodOldInodeSize+extraIsize:]
		le.PutUint32(body[hMagic:], ext4XattrMagic)
		encodeXattrs(body[ibodyHeaderSize:], 0, ibody)
	}
	c.setInodeChecksum(dst, in.num)
}

// setInodeChecksum stores the crc32c of the whole inode, computed with both
// checksum halves zeroed. The high half exists only when i_extra_isize
// reaches past it. Reserved inodes are written with i_extra_isize = 0, as
// mke2fs does, so they only get the low half.
func (c checksummer) setInodeChecksum(dst []byte, num uint32) {
	le := binary.LittleEndian
	le.PutUint16(dst[lIChecksumLo:], 0)
	le.PutUint16(dst[iChecksumHi:], 0)
	crc := c.sum(c.inodeSeed(num), dst[:inodeSize])
	le.PutUint16(dst[lIChecksumLo:], uint16(crc))
	if goodOldInodeSize+int(le.Uint16(dst[iExtraIsize:])) >= iChecksumHi+2 {
		le.PutUint16(dst[iChecksumHi:], uint16(crc>>16))
	}
}

// putDevice encodes a device number into root (i_block) the way Linux
// does. When major and minor both fit in a byte, it uses the old 16-bit
// form in i_block[0]. Otherwise it uses the 32-bit "new" form in
// i_block[1].
func putDevice(root []byte, major, minor uint32) {
	const (
		oldDevWord = 0 // byte offset of i_block[0]
		newDevWord = 4 // byte offset of i_block[1]
	)
	if major < 256 && minor < 256 {
		binary.LittleEndian.PutUint32(root[oldDevWord:], major<<8|minor)
	} else {
		binary.LittleEndian.PutUint32(root[newDevWord:], minor&0xff|major<<8|(minor&^0xff)<<12)
	}
}

// Extent tree geometry.
const (
	// rootEntries is how many entries fit in the root node in i_block (4).
	rootEntries = (iBlockLen - extentHeaderSize) / extentEntrySize
	// nodeEntries is how many entries fit in a node block, after the header
	// and before the checksum tail (340).
	nodeEntries = (blockSize - extentHeaderSize - extentTailSize) / extentEntrySize
)

// treeShape returns how many blocks each level of the extent tree needs for
// n extents, leaves first. It is empty when the extents fit in the inode.
// Every node is filled completely. e2fsck considers that shape optimal;
// for any other shape it would offer to rebuild the tree.
func treeShape(n int) []int {
	var levels []int
	for n > rootEntries {
		n = (n + nodeEntries - 1) / nodeEntries
		levels = append(levels, n)
	}
	return levels
}

func treeBlockCount(n int) int {
	total := 0
	for _, k := range treeShape(n) {
		total += k
	}
	return total
}

// extentEntry is an entry of an extent tree node. In a leaf it is a struct
// ext4_extent, and in an index node a struct ext4_extent_idx.
type extentEntry struct {
	logical uint32 // ee_block or ei_block
	length  uint16 // ee_len, leaves only
	target  uint64 // physical start (leaf) or child block (index)
}

// putExtentNode writes a node header and its entries to dst. max is the
// node's capacity (eh_max), and depth is 0 for leaves.
func putExtentNode(dst []byte, es []extentEntry, max, depth int) {
	le := binary.LittleEndian
	le.PutUint16(dst[ehMagic:], ext4ExtMagic)
	le.PutUint16(dst[ehEntries:], uint16(len(es)))
	le.PutUint16(dst[ehMax:], uint16(max))
	le.PutUint16(dst[ehDepth:], uint16(depth))
	for i, e := range es {
		p := dst[extentHeaderSize+i*extentEntrySize:]
		if depth == 0 {
			le.PutUint32(p[eeBlock:], e.logical)
			le.PutUint16(p[eeLen:], e.length)
			le.PutUint16(p[eeStartHi:], uint16(e.target>>32))
			le.PutUint32(p[eeStartLo:], uint32(e.target))
		} else {
			le.PutUint32(p[eiBlock:], e.logical)
			le.PutUint32(p[eiLeafLo:], uint32(e.target))
			le.PutUint16(p[eiLeafHi:], uint16(e.target>>32))
		}
	}
}

// extentTree encodes the extent tree for exts and writes its root, the
// i_block content, to root (iBlockLen bytes, zeroed). The blocks in tree
// (treeBlockCount(len(exts)) of them) receive the lower levels, leaves
// first. Each block is passed to emit; with emit == nil only the root is
// computed. seed is the owning inode's checksum seed.
func (c checksummer) extentTree(root []byte, exts []extent, tree []uint64, seed uint32, emit func(blk uint64, b []byte) error) error {
	// Most inodes have a handful of extents, which fit in the root.
	var small [rootEntries]extentEntry
	entries := small[:0]
	if len(exts) > rootEntries {
		entries = make([]extentEntry, 0, len(exts))
	}
	for _, e := range exts {
		entries = append(entries, extentEntry{logical: e.logical, length: e.length, target: e.start})
	}
	depth := 0
	var b []byte
	for len(entries) > rootEntries {
		var parents []extentEntry
		for i := 0; i < len(entries); i += nodeEntries {
			chunk := entries[i:min(i+nodeEntries, len(entries))]
			blk := tree[0]
			tree = tree[1:]
			if emit != nil {
				if b == nil {
					b = make([]byte, blockSize)
				} else {
					clear(b)
				}
				putExtentNode(b, chunk, nodeEntries, depth)
				tail := extentHeaderSize + nodeEntries*extentEntrySize
				binary.LittleEndian.PutUint32(b[tail:], c.sum(seed, b[:tail])) // et_checksum
				if err := emit(blk, b); err != nil {
					return err
				}
			}
			// An index entry starts at its child's first logical block.
			// e2fsck checks that this matches exactly.
			parents = append(parents, extentEntry{logical: chunk[0].logical, target: blk})
		}
		entries = parents
		depth++
	}
	putExtentNode(root, entries, rootEntries, depth)
	return nil
}
