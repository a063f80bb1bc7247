package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// ReadHeader parses the header of the qcow2 image at path. It is for
// callers that own path: the last component is opened without following
// it (O_NOFOLLOW) and without blocking (O_NONBLOCK), and anything but a
// regular file is refused. Files inside a tree another party can write
// (a box) must be opened beneath a safeopen.Root and read with
// ReadHeaderFile instead, because the directories above path are followed.
//
// It returns a *CorruptError when the bytes are not an image this package
// accepts, and an *IOError when the file cannot be opened, stat'ed or read.
// A symbolic link, directory, FIFO, socket or device at path is a
// *TamperedError (field "file type"): the path names something this
// package did not write, and nothing about it says an overlay is corrupt.
//
// ReadHeader reads at most cluster 0, and it never allocates more than the
// file's size.
func ReadHeader(path string) (*Header, error) {
	f, err := OpenImage(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ReadHeaderFile(f)
}

// OpenImage opens the image at path for reading as ReadHeader does:
// without following its last component, without blocking, regular files
// only. Its errors are classified like ReadHeader's.
func OpenImage(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		if !errors.Is(err, unix.ENOENT) {
			// ELOOP is a symbolic link; ENXIO a socket; ENODEV, ENXIO or
			// EPERM a device. lstat does not open, so it cannot block.
			var st unix.Stat_t
			if lerr := unix.Lstat(path, &st); lerr == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
				return nil, TamperedFileType(path, "file type", st.Mode, "regular file", err)
			}
		}
		return nil, &IOError{Path: path, Op: "open", Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	if _, err := regularSize(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// ReadHeaderFile parses the header of the qcow2 image open as f, as
// ReadHeader does; errors name f.Name(). f is only read with ReadAt, so
// its offset is not moved. f must be a regular file: anything else is a
// *TamperedError, and nothing is read from it.
func ReadHeaderFile(f *os.File) (*Header, error) {
	size, err := regularSize(f)
	if err != nil {
		return nil, err
	}
	return parseHeader(f.Name(), f, size)
}

// regularSize fstats f and returns its size, refusing anything but a
// regular file.
func regularSize(f *os.File) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, &IOError{Path: f.Name(), Op: "stat", Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return 0, TamperedFileType(f.Name(), "file type", st.Mode, "regular file", nil)
	}
	return st.Size, nil
}

// ParseHeader parses a qcow2 header from r, whose total length is size.
// name is used only in error messages.
func ParseHeader(name string, r io.ReaderAt, size int64) (*Header, error) {
	return parseHeader(name, r, size)
}

// parseHeader reads and checks a header in a fixed order of steps. The
// bytes come from a file a hostile guest may have written, so every step
// bounds its reads by the file's size and by what the earlier steps have
// already checked. The order also decides which error an image with several
// faults gets, because the first check that fails wins.
func parseHeader(path string, r io.ReaderAt, fileSize int64) (*Header, error) {
	p := &headerParser{path: path, r: r, fileSize: fileSize}
	h, err := p.readFixedFields()
	if err != nil {
		return nil, err
	}
	steps := []func(*Header) error{
		p.checkFixedFields,
		p.checkFeatureBits,
		p.checkVirtualSize,
		p.readExtensions,
		p.readBackingName,
		p.checkTables,
	}
	for _, step := range steps {
		if err := step(h); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// headerParser holds what every step of parseHeader needs. That is where to
// read, how long the file is, and the name to report in errors.
type headerParser struct {
	path     string
	r        io.ReaderAt
	fileSize int64
}

func (p *headerParser) corrupt(format string, args ...any) error {
	return &CorruptError{Path: p.path, Reason: fmt.Sprintf(format, args...)}
}

// readAt fills b from offset off. Every caller has checked that the bytes
// lie inside the file, so a short read means the file shrank while we read
// it. That says nothing about corruption, so it is an I/O error.
func (p *headerParser) readAt(b []byte, off int64) error {
	n, err := p.r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return &IOError{Path: p.path, Op: "read", Err: err}
}

// readFixedFields reads and decodes the fixed part of the header, which is
// 72 bytes in version 2 and 104 in version 3. Before decoding, it checks
// only what decoding needs: the length of the file, the magic and the
// version.
func (p *headerParser) readFixedFields() (*Header, error) {
	if p.fileSize < v2HeaderLen {
		return nil, p.corrupt("truncated header (the file is %d bytes, and a header needs at least %d)", p.fileSize, v2HeaderLen)
	}
	var fixed [v3HeaderLen]byte
	n := min(p.fileSize, int64(len(fixed)))
	if err := p.readAt(fixed[:n], 0); err != nil {
		return nil, err
	}
	if m := binary.BigEndian.Uint32(fixed[offMagic:]); m != Magic {
		return nil, p.corrupt("bad magic %#08x, want %#08x", m, Magic)
	}
	h := &Header{}
	switch v := binary.BigEndian.Uint32(fixed[offVersion:]); v {
	case 2:
		h.unmarshal(fixed[:v2HeaderLen])
	case 3:
		if n < v3HeaderLen {
			return nil, p.corrupt("truncated header (the file is %d bytes, and a version 3 header needs %d)", p.fileSize, v3HeaderLen)
		}
		h.unmarshal(fixed[:])
	default:
		return nil, p.corrupt("unsupported version %d (want 2 or 3)", v)
	}
	return h, nil
}

// checkFixedFields checks cluster_bits and, in version 3, header_length and
// refcount_order. The later steps rely on the cluster size and the header
// length to bound their reads. Version 2 has neither header_length nor
// refcount_order, and unmarshal has already filled in the values the spec
// implies.
func (p *headerParser) checkFixedFields(h *Header) error {
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return p.corrupt("cluster_bits %d out of range %d..%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	if h.Version != 3 {
		return nil
	}
	cluster := h.ClusterSize()
	if h.HeaderLength < v3HeaderLen || h.HeaderLength%8 != 0 || uint64(h.HeaderLength) > cluster {
		return p.corrupt("header_length %d is invalid (it must be a multiple of 8 from %d up to the cluster size %d)", h.HeaderLength, v3HeaderLen, cluster)
	}
	if int64(h.HeaderLength) > p.fileSize {
		return p.corrupt("truncated header (header_length is %d, but the file is %d bytes)", h.HeaderLength, p.fileSize)
	}
	if h.RefcountOrder > maxRefcountOrder {
		return p.corrupt("refcount_order %d out of range 0..%d", h.RefcountOrder, maxRefcountOrder)
	}
	return nil
}

// checkFeatureBits refuses incompatible feature bits this package does not
// know. It also refuses two known bits that make an image unusable here,
// QEMU's corrupt mark and an external data file.
func (p *headerParser) checkFeatureBits(h *Header) error {
	if unknown := h.IncompatibleFeatures &^ incompatKnown; unknown != 0 {
		return p.corrupt("unknown incompatible feature bits %#x", unknown)
	}
	if h.IncompatibleFeatures&IncompatCorrupt != 0 {
		return p.corrupt("QEMU marked the image corrupt (incompatible feature bit 1)")
	}
	if h.IncompatibleFeatures&IncompatExternalData != 0 {
		return p.corrupt("external data file bit is set, so guest data would live in another file")
	}
	return nil
}

// checkVirtualSize refuses a size that QEMU would not open.
func (p *headerParser) checkVirtualSize(h *Header) error {
	if h.Size > MaxVirtualSize {
		return p.corrupt("virtual size %d exceeds the maximum %d", h.Size, MaxVirtualSize)
	}
	return nil
}

// readExtensions reads the header extensions and records the backing
// format. Like QEMU, it looks for them between the end of the header and
// the backing name, or the end of cluster 0 when there is no name. It never
// looks past the end of the file.
func (p *headerParser) readExtensions(h *Header) error {
	limit := h.ClusterSize()
	if h.BackingFileOffset != 0 && h.BackingFileOffset < limit {
		limit = h.BackingFileOffset
	}
	if uint64(p.fileSize) < limit {
		limit = uint64(p.fileSize)
	}
	return p.walkExtensions(h, uint64(h.HeaderLength), limit)
}

// walkExtensions walks the header extensions in [start, limit). It reads
// only the 8-byte extension headers and the data of the one extension it
// understands, so a hostile length cannot make it allocate.
func (p *headerParser) walkExtensions(h *Header, start, limit uint64) error {
	off := start
	for off+extHeaderLen <= limit {
		var eh [extHeaderLen]byte
		if err := p.readAt(eh[:], int64(off)); err != nil {
			return err
		}
		typ := binary.BigEndian.Uint32(eh[0:4])
		length := uint64(binary.BigEndian.Uint32(eh[4:8]))
		if typ == extEnd {
			return nil
		}
		data := off + extHeaderLen
		next := data + uint64(pad8(int(length)))
		if next > limit {
			return p.corrupt("header extension %#x at %#x (length %d) runs past %#x", typ, off, length, limit)
		}
		if typ == extBackingFormat {
			if length == 0 || length > maxBackingFormatLen {
				return p.corrupt("backing format extension has invalid length %d (want 1 to %d)", length, maxBackingFormatLen)
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
	// QEMU also accepts extensions that fill the space exactly, with no
	// room left for an end marker.
	return nil
}

// readBackingName reads the backing file name, if the image has one. The
// name must fit in cluster 0, as QEMU requires, and in the file.
func (p *headerParser) readBackingName(h *Header) error {
	if h.BackingFileOffset == 0 {
		return nil
	}
	if h.BackingFileSize > MaxBackingNameLen {
		return p.corrupt("backing name length %d exceeds %d", h.BackingFileSize, MaxBackingNameLen)
	}
	end := h.BackingFileOffset + uint64(h.BackingFileSize)
	if end < h.BackingFileOffset || end > h.ClusterSize() {
		return p.corrupt("backing name of %d bytes at %#x does not fit in cluster 0", h.BackingFileSize, h.BackingFileOffset)
	}
	if end > uint64(p.fileSize) {
		return p.corrupt("truncated backing name (%d bytes at %#x, but the file is %d bytes)", h.BackingFileSize, h.BackingFileOffset, p.fileSize)
	}
	name := make([]byte, h.BackingFileSize)
	if err := p.readAt(name, int64(h.BackingFileOffset)); err != nil {
		return err
	}
	if i := bytes.IndexByte(name, 0); i >= 0 {
		return p.corrupt("backing name contains NUL at byte %d", i)
	}
	if !utf8.Valid(name) {
		return p.corrupt("backing name %q is not valid UTF-8", name)
	}
	h.BackingFile = string(name)
	return nil
}

// checkTables checks where the L1 and refcount tables are. QEMU refuses an
// image whose L1 table cannot map the virtual size, and a table that runs
// past the end of the file means the file was cut short. The tables
// themselves are not read.
func (p *headerParser) checkTables(h *Header) error {
	cluster := h.ClusterSize()
	if need := l1Entries(h.Size, h.ClusterBits); uint64(h.L1Size) < need {
		return p.corrupt("L1 table too small (it has %d entries, and virtual size %d needs %d)", h.L1Size, h.Size, need)
	}
	if h.L1TableOffset%cluster != 0 || h.L1TableOffset == 0 {
		return p.corrupt("L1 table offset %#x is zero or not a multiple of the cluster size", h.L1TableOffset)
	}
	if end := h.L1TableOffset + uint64(h.L1Size)*l1EntrySize; end < h.L1TableOffset || end > uint64(p.fileSize) {
		return p.corrupt("L1 table past EOF (%d entries at %#x, but the file is %d bytes)", h.L1Size, h.L1TableOffset, p.fileSize)
	}
	if h.RefcountTableOffset%cluster != 0 || h.RefcountTableOffset == 0 || h.RefcountTableOffset >= uint64(p.fileSize) {
		return p.corrupt("refcount table offset %#x is zero, not a multiple of the cluster size, or past EOF (the file is %d bytes)", h.RefcountTableOffset, p.fileSize)
	}
	return nil
}
