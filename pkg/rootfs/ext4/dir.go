package ext4

import "encoding/binary"

// dirent is one name in a directory.
type dirent struct {
	name  string
	inode *inode
}

const (
	direntHead = 8 // inode, rec_len, name_len, file_type
	// dirTailSize is the fake entry at the end of every directory block that
	// carries the block's checksum under metadata_csum.
	dirTailSize     = 12
	dirTailFileType = 0xDE
	dirUsable       = blockSize - dirTailSize
	// lostFoundBlocks pre-sizes lost+found like mke2fs does, so that e2fsck
	// can reconnect orphans without allocating.
	lostFoundBlocks = 4
)

func direntSize(nameLen int) int { return (direntHead + nameLen + 3) &^ 3 }

// fileType is the directory-entry type code (the filetype feature).
func fileType(mode uint16) uint8 {
	switch mode & sIFMT {
	case sIFREG:
		return 1
	case sIFDIR:
		return 2
	case sIFCHR:
		return 3
	case sIFBLK:
		return 4
	case sIFIFO:
		return 5
	case sIFSOCK:
		return 6
	case sIFLNK:
		return 7
	}
	return 0
}

// dirBlocks encodes a linear directory: ".", "..", then the entries in
// order, never splitting an entry across blocks, each block's last entry
// stretched to the checksum tail. The result has at least minBlocks blocks;
// extra blocks hold a single empty entry. With emit == nil only the block
// count is computed. self and parent are inode numbers; emit receives the
// logical block index and its bytes.
func (c checksummer) dirBlocks(self, parent uint32, entries []dirent, minBlocks int, emit func(i int, b []byte) error) (int, error) {
	le := binary.LittleEndian
	seed := c.inodeSeed(self)
	var (
		b       []byte
		count   int
		pos     int
		lastPos int
	)
	finish := func() error {
		if emit != nil {
			le.PutUint16(b[lastPos+4:], uint16(dirUsable-lastPos))
			t := b[dirUsable:]
			le.PutUint16(t[4:], dirTailSize)
			t[7] = dirTailFileType
			le.PutUint32(t[8:], c.sum(seed, b[:dirUsable]))
			if err := emit(count, b); err != nil {
				return err
			}
		}
		count++
		pos = 0
		return nil
	}
	add := func(ino uint32, name string, ft uint8) error {
		size := direntSize(len(name))
		if pos+size > dirUsable {
			if err := finish(); err != nil {
				return err
			}
		}
		if pos == 0 && emit != nil {
			b = make([]byte, blockSize)
		}
		if emit != nil {
			e := b[pos:]
			le.PutUint32(e[0:], ino)
			le.PutUint16(e[4:], uint16(size))
			e[6] = uint8(len(name))
			e[7] = ft
			copy(e[direntHead:], name)
		}
		lastPos = pos
		pos += size
		return nil
	}
	if err := add(self, ".", fileType(sIFDIR)); err != nil {
		return 0, err
	}
	if err := add(parent, "..", fileType(sIFDIR)); err != nil {
		return 0, err
	}
	for _, e := range entries {
		if err := add(e.inode.num, e.name, fileType(e.inode.mode)); err != nil {
			return 0, err
		}
	}
	if err := finish(); err != nil {
		return 0, err
	}
	for count < minBlocks {
		// An unused entry (inode 0) spanning the whole block.
		if emit != nil {
			b = make([]byte, blockSize)
		}
		lastPos = 0
		if err := finish(); err != nil {
			return 0, err
		}
	}
	return count, nil
}
