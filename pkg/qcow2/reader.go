package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"syscall"
	"unicode/utf8"
)

// ReadHeader parses the header of the qcow2 image at path.
//
// It returns a *CorruptError when the bytes are not an image this package
// accepts, and an *IOError when the file cannot be opened, stat'ed or read
// (a directory at path is an I/O error: nothing about it says the overlay
// the caller wanted is corrupt). It reads at most cluster 0 plus the L1
// bounds, and never allocates more than the file's size.
func ReadHeader(path string) (*Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, &IOError{Path: path, Op: "open", Err: err}
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, &IOError{Path: path, Op: "stat", Err: err}
	}
	if fi.IsDir() {
		return nil, &IOError{Path: path, Op: "read", Err: syscall.EISDIR}
	}
	return parseHeader(path, f, fi.Size())
}

// ParseHeader parses a qcow2 header from r, whose total length is size.
// name is used only in error messages.
func ParseHeader(name string, r io.ReaderAt, size int64) (*Header, error) {
	return parseHeader(name, r, size)
}

// headerParser carries what every check needs to report its finding.
type headerParser struct {
	path string
	r    io.ReaderAt
}

func (p *headerParser) corrupt(format string, args ...any) error {
	return &CorruptError{Path: p.path, Reason: fmt.Sprintf(format, args...)}
}

func (p *headerParser) readAt(b []byte, off int64) error {
	n, err := p.r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF {
		// Sizes are checked against the file length first, so a short read
		// means the file shrank under us: not evidence of corruption.
		err = io.ErrUnexpectedEOF
	}
	return &IOError{Path: p.path, Op: "read", Err: err}
}

func parseHeader(path string, r io.ReaderAt, fileSize int64) (*Header, error) {
	p := &headerParser{path: path, r: r}
	corrupt, readAt := p.corrupt, p.readAt

	if fileSize < v2HeaderLen {
		return nil, corrupt("truncated header: file is %d bytes, a header needs at least %d", fileSize, v2HeaderLen)
	}
	var fixed [v3HeaderLen]byte
	n := int64(len(fixed))
	if fileSize < n {
		n = fileSize
	}
	if err := readAt(fixed[:n], 0); err != nil {
		return nil, err
	}
	if m := binary.BigEndian.Uint32(fixed[:4]); m != Magic {
		return nil, corrupt("bad magic %#08x, want %#08x", m, Magic)
	}
	h := &Header{}
	switch v := binary.BigEndian.Uint32(fixed[4:]); v {
	case 2:
		h.unmarshal(fixed[:v2HeaderLen])
	case 3:
		if n < v3HeaderLen {
			return nil, corrupt("truncated header: file is %d bytes, a version 3 header needs %d", fileSize, v3HeaderLen)
		}
		h.unmarshal(fixed[:])
	default:
		return nil, corrupt("unsupported version %d (want 2 or 3)", v)
	}

	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, corrupt("cluster_bits %d out of range %d..%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	cluster := h.ClusterSize()
	if h.Version == 3 {
		if h.HeaderLength < v3HeaderLen || h.HeaderLength%8 != 0 || uint64(h.HeaderLength) > cluster {
			return nil, corrupt("header_length %d invalid (must be a multiple of 8 between %d and the cluster size %d)", h.HeaderLength, v3HeaderLen, cluster)
		}
		if int64(h.HeaderLength) > fileSize {
			return nil, corrupt("truncated header: header_length %d exceeds file size %d", h.HeaderLength, fileSize)
		}
		if h.RefcountOrder > 6 {
			return nil, corrupt("refcount_order %d out of range 0..6", h.RefcountOrder)
		}
	}
	if unknown := h.IncompatibleFeatures &^ incompatKnown; unknown != 0 {
		return nil, corrupt("unknown incompatible feature bits %#x", unknown)
	}
	if h.IncompatibleFeatures&IncompatCorrupt != 0 {
		return nil, corrupt("QEMU marked the image corrupt (incompatible feature bit 1)")
	}
	if h.IncompatibleFeatures&IncompatExternalData != 0 {
		return nil, corrupt("external data file bit set: guest data would live in another file")
	}
	if h.Size > MaxVirtualSize {
		return nil, corrupt("virtual size %d exceeds the maximum %d", h.Size, MaxVirtualSize)
	}

	// Extensions live between the header and the backing name (or the end
	// of cluster 0), as QEMU reads them.
	extLimit := cluster
	if h.BackingFileOffset != 0 && h.BackingFileOffset < extLimit {
		extLimit = h.BackingFileOffset
	}
	if uint64(fileSize) < extLimit {
		extLimit = uint64(fileSize)
	}
	if err := p.readExtensions(h, uint64(h.HeaderLength), extLimit); err != nil {
		return nil, err
	}

	if h.BackingFileOffset != 0 {
		if h.BackingFileSize > MaxBackingNameLen {
			return nil, corrupt("backing name length %d exceeds %d", h.BackingFileSize, MaxBackingNameLen)
		}
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if end < h.BackingFileOffset || end > cluster {
			return nil, corrupt("backing name at %#x+%d does not fit in cluster 0", h.BackingFileOffset, h.BackingFileSize)
		}
		if end > uint64(fileSize) {
			return nil, corrupt("truncated backing name: %d bytes at %#x, file is %d bytes", h.BackingFileSize, h.BackingFileOffset, fileSize)
		}
		name := make([]byte, h.BackingFileSize)
		if err := readAt(name, int64(h.BackingFileOffset)); err != nil {
			return nil, err
		}
		if i := bytes.IndexByte(name, 0); i >= 0 {
			return nil, corrupt("backing name contains NUL at byte %d", i)
		}
		if !utf8.Valid(name) {
			return nil, corrupt("backing name is not valid UTF-8: %q", name)
		}
		h.BackingFile = string(name)
	}

	// L1 table: QEMU refuses an image whose L1 cannot map the virtual size,
	// and a table that runs past EOF means the file was cut short.
	if need := l1Entries(h.Size, h.ClusterBits); uint64(h.L1Size) < need {
		return nil, corrupt("L1 table too small: %d entries, virtual size %d needs %d", h.L1Size, h.Size, need)
	}
	if h.L1TableOffset%cluster != 0 || h.L1TableOffset == 0 {
		return nil, corrupt("L1 table offset %#x is not a non-zero multiple of the cluster size", h.L1TableOffset)
	}
	if end := h.L1TableOffset + uint64(h.L1Size)*8; end < h.L1TableOffset || end > uint64(fileSize) {
		return nil, corrupt("L1 table past EOF: offset %#x + %d entries, file is %d bytes", h.L1TableOffset, h.L1Size, fileSize)
	}
	if h.RefcountTableOffset%cluster != 0 || h.RefcountTableOffset == 0 || h.RefcountTableOffset >= uint64(fileSize) {
		return nil, corrupt("refcount table offset %#x invalid or past EOF (file is %d bytes)", h.RefcountTableOffset, fileSize)
	}
	return h, nil
}

// readExtensions walks the header extensions in [start, limit) and records
// the backing format. It reads only the 8-byte extension headers and the
// data of extensions it understands, so a hostile length cannot make it
// allocate.
func (p *headerParser) readExtensions(h *Header, start, limit uint64) error {
	off := start
	for off+8 <= limit {
		var eh [8]byte
		if err := p.readAt(eh[:], int64(off)); err != nil {
			return err
		}
		typ := binary.BigEndian.Uint32(eh[0:])
		length := uint64(binary.BigEndian.Uint32(eh[4:]))
		if typ == extEnd {
			return nil
		}
		data := off + 8
		next := data + uint64(pad8(int(length)))
		if next > limit {
			return p.corrupt("header extension %#x at %#x (length %d) runs past %#x", typ, off, length, limit)
		}
		if typ == extBackingFormat {
			if length == 0 || length > 16 {
				return p.corrupt("backing format extension length %d invalid", length)
			}
			b := make([]byte, length)
			if err := p.readAt(b, int64(data)); err != nil {
				return err
			}
			if !utf8.Valid(b) || bytes.IndexByte(b, 0) >= 0 {
				return p.corrupt("backing format %q is not a valid name", b)
			}
			h.BackingFormat = string(b)
		}
		off = next
	}
	// Running out of room without an end marker is tolerated, as QEMU does
	// for images whose extensions exactly fill the space.
	return nil
}
