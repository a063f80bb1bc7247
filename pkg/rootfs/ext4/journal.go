package ext4

import "encoding/binary"

// jbd2MinBlocks is JBD2_MIN_JOURNAL_BLOCKS, the smallest journal the kernel
// accepts.
const jbd2MinBlocks = 1024

// journalBlocks returns the journal size, in blocks, that mke2fs picks for a
// filesystem of fsBlocks 4 KiB blocks. The journal grows with the
// filesystem: 16 MiB up to 1 GiB, 64 MiB up to 16 GiB, and at most 1 GiB.
// Only its first block is ever written, and the rest stays a hole in the
// image.
func journalBlocks(fsBlocks uint64) uint64 {
	switch {
	case fsBlocks < 32768:
		return jbd2MinBlocks
	case fsBlocks < 256*1024:
		return 4096
	case fsBlocks < 512*1024:
		return 8192
	case fsBlocks < 4096*1024:
		return 16384
	case fsBlocks < 8192*1024:
		return 32768
	case fsBlocks < 16384*1024:
		return 65536
	case fsBlocks < 32768*1024:
		return 131072
	}
	return 262144
}

// journalSuperblock returns the first block of an empty jbd2 journal. All
// its fields are big-endian. s_start = 0 tells the kernel that there is
// nothing to replay, so the remaining journal blocks may hold anything,
// zeros included. The journal checksum features are left off. The kernel
// enables the ones metadata_csum wants when it mounts the filesystem
// read-write.
func journalSuperblock(blocks uint64, uuid [16]byte) []byte {
	b := make([]byte, blockSize)
	be := binary.BigEndian
	be.PutUint32(b[jbd2HMagic:], jbd2MagicNumber)
	be.PutUint32(b[jbd2HBlocktype:], jbd2SuperblockV2)
	be.PutUint32(b[jbd2SBlocksize:], blockSize)
	be.PutUint32(b[jbd2SMaxlen:], uint32(blocks))
	be.PutUint32(b[jbd2SFirst:], 1)    // the log starts after this block
	be.PutUint32(b[jbd2SSequence:], 1) // the first transaction's number
	be.PutUint32(b[jbd2SStart:], 0)    // empty log
	copy(b[jbd2SUUID:], uuid[:])
	be.PutUint32(b[jbd2SNrUsers:], 1) // only this filesystem uses it
	return b
}
