package ext4

import "encoding/binary"

const (
	jbd2Magic        = 0xC03B3998
	jbd2SuperblockV2 = 4
	// jbd2MinBlocks is the smallest journal the kernel accepts.
	jbd2MinBlocks = 1024
)

// journalBlocks picks the journal size mke2fs would pick for a filesystem of
// fsBlocks 4 KiB blocks: 16 MiB up to 1 GiB, 64 MiB up to 16 GiB, growing to
// 1 GiB for very large filesystems. Only its first block is ever written;
// the rest stays a hole in the image.
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

// journalSuperblock returns the first block of an empty jbd2 journal (all
// fields big-endian). s_start = 0 tells the kernel there is nothing to
// replay, so the remaining journal blocks may hold anything, zeros included.
// Journal checksum features are left off: the kernel enables the ones
// metadata_csum wants when it mounts the filesystem read-write.
func journalSuperblock(blocks uint64, uuid [16]byte) []byte {
	b := make([]byte, blockSize)
	be := binary.BigEndian
	be.PutUint32(b[0x00:], jbd2Magic)
	be.PutUint32(b[0x04:], jbd2SuperblockV2)
	be.PutUint32(b[0x0C:], blockSize)
	be.PutUint32(b[0x10:], uint32(blocks)) // s_maxlen
	be.PutUint32(b[0x14:], 1)              // s_first: log starts after this block
	be.PutUint32(b[0x18:], 1)              // s_sequence of the first transaction
	copy(b[0x30:], uuid[:])
	be.PutUint32(b[0x40:], 1) // s_nr_users: this filesystem
	return b
}
