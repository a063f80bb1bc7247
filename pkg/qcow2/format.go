// Package qcow2 writes and reads the small subset of QEMU's qcow2 format that
// boxlite-csi needs: an empty copy-on-write overlay over a backing file, and
// the header facts needed to decide whether an existing overlay may be reused.
//
// Nothing here runs qemu-img. The on-disk facts follow QEMU's
// docs/interop/qcow2.txt; all integers are big-endian.
package qcow2

import "encoding/binary"

// Magic is "QFI\xfb", the first four bytes of every qcow2 image.
const Magic uint32 = 0x514649fb

const (
	// ClusterBits is what the writer uses: 64 KiB clusters, QEMU's default.
	ClusterBits = 16
	// ClusterSize is 1 << ClusterBits.
	ClusterSize = 1 << ClusterBits

	// MaxBackingNameLen is QEMU's limit; longer names are refused on open.
	MaxBackingNameLen = 1023

	// MaxVirtualSize is the largest size QEMU opens with 64 KiB clusters:
	// its L1 table may be at most 32 MiB (4 Mi entries of 8 bytes), and each
	// entry maps 512 MiB.
	MaxVirtualSize uint64 = (32 << 20) / 8 * (ClusterSize * ClusterSize / 8)

	// MaxChainDepth bounds how many backing files a chain may have below its
	// top image, like upstream's MAX_BACKING_CHAIN_DEPTH.
	MaxChainDepth = 8

	// v2HeaderLen and v3HeaderLen are the fixed header sizes; version 3 may
	// declare a longer header_length.
	v2HeaderLen = 72
	v3HeaderLen = 104

	minClusterBits = 9
	maxClusterBits = 21

	extEnd           uint32 = 0x00000000
	extBackingFormat uint32 = 0xe2792aca
)

// Incompatible feature bits (header offset 72). A reader that does not know
// a set bit must refuse the image.
const (
	IncompatDirty        uint64 = 1 << 0
	IncompatCorrupt      uint64 = 1 << 1
	IncompatExternalData uint64 = 1 << 2
	IncompatCompression  uint64 = 1 << 3
	IncompatExtendedL2   uint64 = 1 << 4

	incompatKnown = IncompatDirty | IncompatCorrupt | IncompatExternalData |
		IncompatCompression | IncompatExtendedL2
)

// Backing formats the writer accepts. QEMU probes the format when the
// extension is absent; naming it avoids probing a raw file whose first bytes
// happen to look like another format.
const (
	FormatRaw   = "raw"
	FormatQcow2 = "qcow2"
)

// Header is the parsed qcow2 header plus the two header-derived facts the
// driver cares about: the backing name and its format.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32

	// BackingFile is the name exactly as recorded; "" means no backing file.
	// A relative name is relative to the directory holding the image.
	BackingFile string
	// BackingFormat comes from the backing-format header extension; "" when
	// the image does not say.
	BackingFormat string
}

// ClusterSize returns the image's cluster size in bytes.
func (h *Header) ClusterSize() uint64 { return 1 << h.ClusterBits }

// l1Entries is how many L1 entries an image of the given size needs: each
// entry points at one L2 table, which maps clusterSize/8 clusters.
func l1Entries(size uint64, clusterBits uint32) uint64 {
	bytesPerL1 := uint64(1) << (2*clusterBits - 3)
	return (size + bytesPerL1 - 1) / bytesPerL1
}

// marshal encodes the fixed version-3 header fields into b[0:104].
func (h *Header) marshal(b []byte) {
	be := binary.BigEndian
	be.PutUint32(b[0:], Magic)
	be.PutUint32(b[4:], h.Version)
	be.PutUint64(b[8:], h.BackingFileOffset)
	be.PutUint32(b[16:], h.BackingFileSize)
	be.PutUint32(b[20:], h.ClusterBits)
	be.PutUint64(b[24:], h.Size)
	be.PutUint32(b[32:], h.CryptMethod)
	be.PutUint32(b[36:], h.L1Size)
	be.PutUint64(b[40:], h.L1TableOffset)
	be.PutUint64(b[48:], h.RefcountTableOffset)
	be.PutUint32(b[56:], h.RefcountTableClusters)
	be.PutUint32(b[60:], h.NbSnapshots)
	be.PutUint64(b[64:], h.SnapshotsOffset)
	be.PutUint64(b[72:], h.IncompatibleFeatures)
	be.PutUint64(b[80:], h.CompatibleFeatures)
	be.PutUint64(b[88:], h.AutoclearFeatures)
	be.PutUint32(b[96:], h.RefcountOrder)
	be.PutUint32(b[100:], h.HeaderLength)
}

// unmarshal decodes the fixed fields present in b (72 bytes for version 2,
// 104 for version 3). Version-2 images imply 16-bit refcounts.
func (h *Header) unmarshal(b []byte) {
	be := binary.BigEndian
	h.Version = be.Uint32(b[4:])
	h.BackingFileOffset = be.Uint64(b[8:])
	h.BackingFileSize = be.Uint32(b[16:])
	h.ClusterBits = be.Uint32(b[20:])
	h.Size = be.Uint64(b[24:])
	h.CryptMethod = be.Uint32(b[32:])
	h.L1Size = be.Uint32(b[36:])
	h.L1TableOffset = be.Uint64(b[40:])
	h.RefcountTableOffset = be.Uint64(b[48:])
	h.RefcountTableClusters = be.Uint32(b[56:])
	h.NbSnapshots = be.Uint32(b[60:])
	h.SnapshotsOffset = be.Uint64(b[64:])
	h.RefcountOrder = 4
	h.HeaderLength = v2HeaderLen
	if len(b) >= v3HeaderLen {
		h.IncompatibleFeatures = be.Uint64(b[72:])
		h.CompatibleFeatures = be.Uint64(b[80:])
		h.AutoclearFeatures = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
	}
}

func pad8(n int) int { return (n + 7) &^ 7 }
