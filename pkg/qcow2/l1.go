package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
)

// MaxL1Entries is QEMU's limit on an L1 table (QCOW_MAX_L1_SIZE, 32 MiB of
// 8-byte entries). ProbeL1 reads no larger table.
const MaxL1Entries = (32 << 20) / l1EntrySize

// l1ProbeChunk is how much of an L1 table ProbeL1 reads at a time, so a
// large table costs a fixed buffer, not an allocation of its size.
const l1ProbeChunk = 64 << 10

// L1Probe is what ProbeL1 found out about an image's guest data.
type L1Probe struct {
	// Empty is true only when the image provably maps no guest cluster:
	// its L1 table has no entries or only zero ones, or the file is too
	// short to hold any cluster but the header. Discarding such an image
	// loses nothing a guest wrote. False means it may hold data.
	Empty bool
	// Reason says why, for logs and errors.
	Reason string
}

// ProbeL1 decides whether the image in r, whose total length is size, may
// hold guest data, for an image ParseHeader refused as corrupt. It reads
// only what finding and reading the L1 table needs: the fixed header
// fields and l1_size*8 bytes at l1_table_offset, in chunks, never past the
// end of the file and never more than MaxL1Entries entries. It follows no
// L1 entry, backing name or extension.
//
// When the header is too damaged to find the L1 table, the image may hold
// data. So may an image with internal snapshots (their L1 tables map data
// of their own) and one whose data lives in an external data file. The
// error is an *IOError when a read fails; the bytes themselves never make
// ProbeL1 fail, only decide its answer.
//
// Empty means the image maps no cluster at all, whoever wrote it. An
// overlay that CreateOverlay wrote with OverlayOptions.Writes (one whose
// filesystem was grown) has L1 entries from the start, so ProbeL1 reports
// it as possibly holding data even before a guest has run: the L1 table
// cannot tell the writer's clusters from a guest's.
func ProbeL1(name string, r io.ReaderAt, size int64) (L1Probe, error) {
	p := &headerParser{path: name, r: r, fileSize: size}
	mayHold := func(format string, args ...any) (L1Probe, error) {
		return L1Probe{Reason: fmt.Sprintf(format, args...)}, nil
	}

	// Guest clusters are never at offset 0, and no cluster is smaller than
	// 512 bytes, so a file this short maps nothing whatever its header says.
	// The external-data case below is the one exception, and it needs a
	// header QEMU could read, which 512 bytes hold: so check it first.
	var fixed [v3HeaderLen]byte
	n := min(size, int64(len(fixed)))
	if n > 0 {
		if err := p.readAt(fixed[:n], 0); err != nil {
			return L1Probe{}, err
		}
	}
	be := binary.BigEndian
	magicOK := n >= 8 && be.Uint32(fixed[offMagic:]) == Magic
	version := uint32(0)
	if magicOK {
		version = be.Uint32(fixed[offVersion:])
	}
	if version == 3 && n >= v3HeaderLen && be.Uint64(fixed[offIncompatibleFeatures:])&IncompatExternalData != 0 {
		return mayHold("its guest data lives in an external data file (incompatible feature bit 2)")
	}
	if size <= 1<<minClusterBits {
		return L1Probe{Empty: true, Reason: fmt.Sprintf("the file is %d bytes, too short to hold any cluster beyond the header", size)}, nil
	}

	// From here the file is longer than 512 bytes, so all of fixed was read.
	var h Header
	switch {
	case !magicOK:
		return mayHold("the header is too damaged to find the L1 table: no qcow2 magic")
	case version == 2:
		h.unmarshal(fixed[:v2HeaderLen])
	case version == 3:
		h.unmarshal(fixed[:])
	default:
		return mayHold("the header is too damaged to find the L1 table: version %d", version)
	}
	switch {
	case h.NbSnapshots != 0:
		return mayHold("it has %d internal snapshots, whose own L1 tables may map data", h.NbSnapshots)
	case h.L1Size == 0:
		return L1Probe{Empty: true, Reason: "its L1 table has no entries (l1_size 0)"}, nil
	case h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits:
		return mayHold("the header is too damaged to find the L1 table: cluster_bits %d", h.ClusterBits)
	case h.L1Size > MaxL1Entries:
		return mayHold("the header is too damaged to find the L1 table: l1_size %d exceeds %d", h.L1Size, MaxL1Entries)
	case h.L1TableOffset == 0 || h.L1TableOffset%h.ClusterSize() != 0:
		return mayHold("the header is too damaged to find the L1 table: l1_table_offset %#x is zero or unaligned", h.L1TableOffset)
	case h.L1TableOffset > uint64(size) || uint64(h.L1Size)*l1EntrySize > uint64(size)-h.L1TableOffset:
		// l1_size is at most MaxL1Entries here, so the product cannot wrap.
		return mayHold("its L1 table (%d entries at %#x) runs past the end of the %d-byte file", h.L1Size, h.L1TableOffset, size)
	}

	buf := make([]byte, min(uint64(h.L1Size)*l1EntrySize, l1ProbeChunk))
	for i := uint64(0); i < uint64(h.L1Size); {
		b := buf[:min(uint64(len(buf)), (uint64(h.L1Size)-i)*l1EntrySize)]
		if err := p.readAt(b, int64(h.L1TableOffset+i*l1EntrySize)); err != nil {
			return L1Probe{}, err
		}
		for j := 0; j < len(b); j, i = j+l1EntrySize, i+1 {
			if e := be.Uint64(b[j:]); e != 0 {
				return mayHold("L1 entry %d is %#x, so an L2 table may map guest data", i, e)
			}
		}
	}
	return L1Probe{Empty: true, Reason: fmt.Sprintf("all %d entries of its L1 table are zero", h.L1Size)}, nil
}

// ProbeL1File is ProbeL1 on the image open as f, which must be a regular
// file (anything else is a *TamperedError and is not read).
func ProbeL1File(f *os.File) (L1Probe, error) {
	size, err := regularSize(f)
	if err != nil {
		return L1Probe{}, err
	}
	return ProbeL1(f.Name(), f, size)
}
