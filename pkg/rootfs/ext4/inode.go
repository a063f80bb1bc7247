package ext4

import (
	"encoding/binary"
	"math"
	"time"
)

// File type bits of i_mode.
const (
	sIFMT   = 0xF000
	sIFSOCK = 0xC000
	sIFLNK  = 0xA000
	sIFREG  = 0x8000
	sIFBLK  = 0x6000
	sIFDIR  = 0x4000
	sIFCHR  = 0x2000
	sIFIFO  = 0x1000
)

const (
	inodeFlagExtents = 0x80000
	// fastSymlinkMax is the longest symlink target stored inside i_block
	// (60 bytes); longer ones get a data block.
	fastSymlinkMax = 59
	maxSymlinkLen  = blockSize - 1
	// maxLinks is EXT4_LINK_MAX. Directories above it get a link count of 1
	// (dir_nlink); regular files cannot have more hard links.
	maxLinks = 65000
)

// timestamp is a Unix time in the range ext4 can store with extra fields:
// 34 bits of seconds starting at 1901-12-13, plus nanoseconds.
type timestamp struct {
	sec  int64
	nsec uint32
}

const (
	minTime = math.MinInt32
	maxTime = math.MaxInt32 + 3<<32
)

func toTimestamp(t time.Time) timestamp {
	sec := t.Unix()
	if sec < minTime {
		return timestamp{sec: minTime}
	}
	if sec > maxTime {
		return timestamp{sec: maxTime, nsec: 999999999}
	}
	return timestamp{sec: sec, nsec: uint32(t.Nanosecond())}
}

// encode returns the 32-bit seconds field and the "extra" field: two epoch
// bits extending the signed 32-bit seconds, then nanoseconds << 2.
func (t timestamp) encode() (lo, extra uint32) {
	lo = uint32(int32(t.sec))
	epoch := uint32((t.sec-int64(int32(t.sec)))>>32) & 3
	return lo, t.nsec<<2 | epoch
}

// splitTime is the superblock flavour: low 32 bits plus an 8-bit high part.
func splitTime(sec int64) (uint32, uint8) {
	if sec < 0 {
		sec = 0
	}
	return uint32(sec), uint8(sec >> 32)
}

// inode is the in-memory form of a file. Hard links share one *inode.
type inode struct {
	mode                uint16 // type | permission bits, incl. setuid/setgid/sticky
	uid, gid            uint32
	atime, mtime, ctime timestamp
	size                uint64
	links               uint32 // directory entries naming it (non-directories)
	devMajor, devMinor  uint32
	target              string   // symlink target
	extents             []extent // regular file data, in logical order
	xattrs              []xattr  // sorted, as stored on disk

	// Assigned by Finish.
	num         uint32
	parentNum   uint32      // directories: inode number of ".."
	nlink       uint32      // final i_links_count
	dataBlocks  uint64      // data blocks the inode maps (holes excluded)
	treeBlocks  []uint64    // extent-tree blocks below the in-inode root
	xblock      *xattrBlock // external xattr block, nil if none
	ibodyXattrs []xattr     // the part of xattrs stored inside the inode
	entries     []dirent    // directories: children, sorted by name
}

func (in *inode) isDir() bool     { return in.mode&sIFMT == sIFDIR }
func (in *inode) isReg() bool     { return in.mode&sIFMT == sIFREG }
func (in *inode) isSymlink() bool { return in.mode&sIFMT == sIFLNK }

// usesExtents reports whether i_block holds an extent tree (as opposed to a
// fast symlink target or a device number).
func (in *inode) usesExtents() bool {
	return in.isReg() || in.isDir() || in.isSymlink() && len(in.target) > fastSymlinkMax
}

// extent maps length logical blocks starting at logical to physical blocks
// starting at start.
type extent struct {
	logical uint32
	length  uint16
	start   uint64
}

// encodeInode fills dst (inodeSize bytes, zeroed) with the on-disk inode.
// root is the 60-byte i_block content prepared by the caller.
func (c checksummer) encodeInode(dst []byte, in *inode, root []byte) {
	le := binary.LittleEndian
	le.PutUint16(dst[0x00:], in.mode)
	le.PutUint16(dst[0x02:], uint16(in.uid))
	le.PutUint32(dst[0x04:], uint32(in.size))
	atime, atimeX := in.atime.encode()
	ctime, ctimeX := in.ctime.encode()
	mtime, mtimeX := in.mtime.encode()
	le.PutUint32(dst[0x08:], atime)
	le.PutUint32(dst[0x0C:], ctime)
	le.PutUint32(dst[0x10:], mtime)
	le.PutUint16(dst[0x18:], uint16(in.gid))
	le.PutUint16(dst[0x1A:], uint16(in.nlink))
	// i_blocks counts 512-byte sectors of everything the inode owns,
	// including extent-tree and xattr blocks (48 bits with huge_file).
	owned := in.dataBlocks + uint64(len(in.treeBlocks))
	var xblk uint64
	if in.xblock != nil {
		owned++
		xblk = in.xblock.blk
	}
	sectors := owned * (blockSize / 512)
	le.PutUint32(dst[0x1C:], uint32(sectors))
	le.PutUint16(dst[0x74:], uint16(sectors>>32))
	if in.usesExtents() {
		le.PutUint32(dst[0x20:], inodeFlagExtents)
	}
	copy(dst[0x28:0x64], root)
	le.PutUint32(dst[0x68:], uint32(xblk))
	le.PutUint16(dst[0x76:], uint16(xblk>>32))
	le.PutUint32(dst[0x6C:], uint32(in.size>>32))
	le.PutUint16(dst[0x78:], uint16(in.uid>>16))
	le.PutUint16(dst[0x7A:], uint16(in.gid>>16))
	le.PutUint16(dst[0x80:], extraIsize)
	le.PutUint32(dst[0x84:], ctimeX)
	le.PutUint32(dst[0x88:], mtimeX)
	le.PutUint32(dst[0x8C:], atimeX)
	le.PutUint32(dst[0x90:], ctime) // crtime: creation is when the layer made it
	le.PutUint32(dst[0x94:], ctimeX)
	if len(in.ibodyXattrs) > 0 {
		le.PutUint32(dst[goodOldInodeSize+extraIsize:], xattrMagic)
		encodeXattrs(dst[goodOldInodeSize+extraIsize+4:], 0, in.ibodyXattrs)
	}
	c.setInodeChecksum(dst, in.num)
}

// setInodeChecksum stores the crc32c of the whole inode, computed with both
// checksum halves zeroed. The high half only exists when i_extra_isize
// covers it; reserved inodes are written with i_extra_isize = 0, like mke2fs.
func (c checksummer) setInodeChecksum(dst []byte, num uint32) {
	le := binary.LittleEndian
	le.PutUint16(dst[0x7C:], 0)
	le.PutUint16(dst[0x82:], 0)
	crc := c.sum(c.inodeSeed(num), dst[:inodeSize])
	le.PutUint16(dst[0x7C:], uint16(crc))
	if le.Uint16(dst[0x80:]) >= 4 {
		le.PutUint16(dst[0x82:], uint16(crc>>16))
	}
}

// deviceBlock encodes a device number into i_block the way Linux does: the
// old 16-bit form in word 0 when major and minor fit in a byte, otherwise
// the 32-bit "new" form in word 1.
func deviceBlock(major, minor uint32) []byte {
	b := make([]byte, 60)
	if major < 256 && minor < 256 {
		binary.LittleEndian.PutUint32(b[0:], major<<8|minor)
	} else {
		binary.LittleEndian.PutUint32(b[4:], minor&0xff|major<<8|(minor&^0xff)<<12)
	}
	return b
}

// Extent tree geometry.
const (
	extentMagic      = 0xF30A
	extentHeaderSize = 12
	extentEntrySize  = 12
	rootEntries      = (60 - extentHeaderSize) / extentEntrySize // 4
	// nodeEntries leaves room for the 4-byte checksum tail.
	nodeEntries = (blockSize - extentHeaderSize - 4) / extentEntrySize // 340
)

// treeShape returns how many blocks each level of the extent tree needs,
// leaves first, for n extents. It is empty when the extents fit in the inode.
// Every node is filled completely, which is the shape e2fsck considers
// optimal (it would otherwise offer to rebuild the tree).
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

// extentTree encodes the tree for exts into the 60-byte in-inode root. The
// blocks in tree (len == treeBlockCount) receive the lower levels, leaves
// first; each is passed to emit unless emit is nil, which computes the root
// only. seed is the owning inode's checksum seed.
func (c checksummer) extentTree(exts []extent, tree []uint64, seed uint32, emit func(blk uint64, b []byte) error) ([]byte, error) {
	le := binary.LittleEndian
	type entry struct {
		logical uint32
		length  uint16 // leaves only
		target  uint64 // physical start (leaf) or child block (index)
	}
	entries := make([]entry, len(exts))
	for i, e := range exts {
		entries[i] = entry{logical: e.logical, length: e.length, target: e.start}
	}
	putEntries := func(dst []byte, es []entry, leaf bool, max, depth int) {
		le.PutUint16(dst[0:], extentMagic)
		le.PutUint16(dst[2:], uint16(len(es)))
		le.PutUint16(dst[4:], uint16(max))
		le.PutUint16(dst[6:], uint16(depth))
		for i, e := range es {
			p := dst[extentHeaderSize+i*extentEntrySize:]
			le.PutUint32(p[0:], e.logical)
			if leaf {
				le.PutUint16(p[4:], e.length)
				le.PutUint16(p[6:], uint16(e.target>>32))
				le.PutUint32(p[8:], uint32(e.target))
			} else {
				le.PutUint32(p[4:], uint32(e.target))
				le.PutUint16(p[8:], uint16(e.target>>32))
			}
		}
	}
	depth := 0
	for len(entries) > rootEntries {
		var parents []entry
		for i := 0; i < len(entries); i += nodeEntries {
			chunk := entries[i:min(i+nodeEntries, len(entries))]
			blk := tree[0]
			tree = tree[1:]
			if emit != nil {
				b := make([]byte, blockSize)
				putEntries(b, chunk, depth == 0, nodeEntries, depth)
				tail := extentHeaderSize + nodeEntries*extentEntrySize
				le.PutUint32(b[tail:], c.sum(seed, b[:tail]))
				if err := emit(blk, b); err != nil {
					return nil, err
				}
			}
			// An index entry starts where its child's first entry starts;
			// e2fsck checks this exactly.
			parents = append(parents, entry{logical: chunk[0].logical, target: blk})
		}
		entries = parents
		depth++
	}
	root := make([]byte, 60)
	putEntries(root, entries, depth == 0, rootEntries, depth)
	return root, nil
}
