package ext4

import "encoding/binary"

const (
	// dirUsable is the space for entries in a directory block, in front of
	// the checksum tail.
	dirUsable = blockSize - dirTailSize
	// lostFoundBlocks pre-sizes lost+found like mke2fs does, so that e2fsck
	// can reconnect orphans without allocating.
	lostFoundBlocks = 4
)

// direntSize is the size of an entry with a name of nameLen bytes, rounded
// up to 4 bytes.
func direntSize(nameLen int) int { return (deName + nameLen + 3) &^ 3 }

// fileType is the file_type code of a directory entry for an inode of the
// given mode (the filetype feature).
func fileType(mode uint16) uint8 {
	switch mode & sIFMT {
	case sIFREG:
		return ext4FTRegFile
	case sIFDIR:
		return ext4FTDir
	case sIFCHR:
		return ext4FTChrdev
	case sIFBLK:
		return ext4FTBlkdev
	case sIFIFO:
		return ext4FTFifo
	case sIFSOCK:
		return ext4FTSock
	case sIFLNK:
		return ext4FTSymlink
	}
	return ext4FTUnknown
}

// dirBlocks encodes the linear directory in and returns its number of
// blocks. The entries are ".", "..", then its children in name order. An
// entry never straddles two blocks, and the last entry of each block is
// stretched up to the checksum tail. The directory has at least minBlocks
// blocks, and the extra ones hold a single unused entry. emit receives
// each block with its logical index; the block is reused afterwards. With
// emit == nil, the blocks are only counted.
func (w *Writer) dirBlocks(in *inode, minBlocks int, emit func(i int, b []byte) error) (int, error) {
	t := w.tree
	d := &dirEncoder{csum: w.csum, seed: w.csum.inodeSeed(in.num), emit: emit, b: w.dirBuf}
	if err := d.add(in.num, dotName, ext4FTDir); err != nil {
		return 0, err
	}
	if err := d.add(w.dirs[in.dir-1].parentNum, dotDotName, ext4FTDir); err != nil {
		return 0, err
	}
	for _, id := range w.dirEntries(in) {
		n := t.node(id)
		c := t.inode(n.inode)
		if err := d.add(c.num, t.name(n), fileType(c.mode)); err != nil {
			return 0, err
		}
	}
	if err := d.endBlock(); err != nil {
		return 0, err
	}
	for d.count < minBlocks {
		// An unused entry (inode 0) that spans the whole block.
		d.newBlock()
		if err := d.endBlock(); err != nil {
			return 0, err
		}
	}
	w.dirBuf = d.b
	return d.count, nil
}

var (
	dotName    = []byte(".")
	dotDotName = []byte("..")
)

// dirEncoder fills directory blocks with entries, one block at a time.
type dirEncoder struct {
	csum    checksummer
	seed    uint32                      // checksum seed of the directory inode
	emit    func(i int, b []byte) error // nil when only counting blocks
	b       []byte                      // the block being filled, if emit is set
	count   int                         // blocks completed so far
	pos     int                         // where the next entry goes in b
	lastPos int                         // where the last entry in b starts
}

// add appends an entry, starting a new block when it does not fit in the
// current one.
func (d *dirEncoder) add(ino uint32, name []byte, ft uint8) error {
	size := direntSize(len(name))
	if d.pos+size > dirUsable {
		if err := d.endBlock(); err != nil {
			return err
		}
	}
	if d.pos == 0 {
		d.newBlock()
	}
	if d.emit != nil {
		e := d.b[d.pos:]
		le := binary.LittleEndian
		le.PutUint32(e[deInode:], ino)
		le.PutUint16(e[deRecLen:], uint16(size))
		e[deNameLen] = uint8(len(name))
		e[deFileType] = ft
		copy(e[deName:], name)
	}
	d.lastPos = d.pos
	d.pos += size
	return nil
}

// newBlock starts an empty block. Until add writes an entry at offset 0,
// the block holds one unused entry (inode 0) there.
func (d *dirEncoder) newBlock() {
	if d.emit != nil {
		if d.b == nil {
			d.b = make([]byte, blockSize)
		} else {
			clear(d.b)
		}
	}
	d.lastPos = 0
}

// endBlock completes the current block and passes it to emit. The last
// entry's rec_len is stretched to the checksum tail, and the tail gets the
// block's checksum.
func (d *dirEncoder) endBlock() error {
	if d.emit != nil {
		le := binary.LittleEndian
		le.PutUint16(d.b[d.lastPos+deRecLen:], uint16(dirUsable-d.lastPos))
		t := d.b[dirUsable:]
		le.PutUint16(t[detRecLen:], dirTailSize)
		t[detReservedFt] = ext4FTDirCsum
		le.PutUint32(t[detChecksum:], d.csum.sum(d.seed, d.b[:dirUsable]))
		if err := d.emit(d.count, d.b); err != nil {
			return err
		}
	}
	d.count++
	d.pos = 0
	return nil
}
