// Package qcow2 writes and reads the small part of QEMU's qcow2 format that
// boxlite-csi needs. It creates copy-on-write overlays over a backing file,
// empty or holding a few writes (the blocks that grow the guest's
// filesystem), and it reads the header facts that decide whether an
// existing overlay may be reused.
//
// Nothing here runs qemu-img. The on-disk facts follow QEMU's
// docs/interop/qcow2.txt, and all integers are big-endian.
package qcow2

import "encoding/binary"

// Magic is "QFI\xfb", the first four bytes of every qcow2 image.
const Magic uint32 = 0x514649fb

const (
	// ClusterBits is what the writer uses: 64 KiB clusters, QEMU's default.
	ClusterBits = 16
	// ClusterSize is 1 << ClusterBits.
	ClusterSize = 1 << ClusterBits

	// MaxBackingNameLen is QEMU's limit. QEMU refuses to open an image whose
	// backing name is longer.
	MaxBackingNameLen = 1023

	// MaxVirtualSize is the largest size QEMU opens with 64 KiB clusters.
	// QEMU allows an L1 table of at most 32 MiB, which is 4 Mi entries of 8
	// bytes, and each entry maps 512 MiB.
	MaxVirtualSize uint64 = (32 << 20) / 8 * (ClusterSize * ClusterSize / 8)

	// MaxChainDepth bounds how many backing files a chain may have below its
	// top image, like upstream's MAX_BACKING_CHAIN_DEPTH.
	MaxChainDepth = 8

	// v2HeaderLen and v3HeaderLen are the sizes of the fixed header. A
	// version 3 header may declare a longer header_length.
	v2HeaderLen = 72
	v3HeaderLen = 104

	// minClusterBits is the spec's minimum (512-byte clusters) and
	// maxClusterBits QEMU's implementation limit (2 MiB clusters).
	minClusterBits = 9
	maxClusterBits = 21

	// maxRefcountOrder is the widest refcount the spec allows: 64 bits.
	maxRefcountOrder = 6

	// l1EntrySize is the size of one L1 table entry in bytes.
	l1EntrySize = 8
)

// Byte offsets of the fixed header fields. Each constant is named after the
// field in QEMU's docs/interop/qcow2.txt, whose name follows it. A version 2
// header ends where incompatible_features would start.
const (
	offMagic                 = 0   // magic
	offVersion               = 4   // version
	offBackingFileOffset     = 8   // backing_file_offset
	offBackingFileSize       = 16  // backing_file_size
	offClusterBits           = 20  // cluster_bits
	offSize                  = 24  // size
	offCryptMethod           = 32  // crypt_method
	offL1Size                = 36  // l1_size
	offL1TableOffset         = 40  // l1_table_offset
	offRefcountTableOffset   = 48  // refcount_table_offset
	offRefcountTableClusters = 56  // refcount_table_clusters
	offNbSnapshots           = 60  // nb_snapshots
	offSnapshotsOffset       = 64  // snapshots_offset
	offIncompatibleFeatures  = 72  // incompatible_features (version 3 only, as are the rest)
	offCompatibleFeatures    = 80  // compatible_features
	offAutoclearFeatures     = 88  // autoclear_features
	offRefcountOrder         = 96  // refcount_order
	offHeaderLength          = 100 // header_length
)

// Header extensions follow the fixed header. Each starts with a 4-byte type
// and a 4-byte length, and its data is padded to a multiple of 8 bytes.
const (
	extHeaderLen = 8

	extEnd           uint32 = 0x00000000 // end of the header extension area
	extBackingFormat uint32 = 0xe2792aca // backing file format name

	// maxBackingFormatLen bounds the backing format name. Real names
	// ("raw", "qcow2") are far shorter.
	maxBackingFormatLen = 16
)

// Incompatible feature bits, in the incompatible_features field. A reader
// that does not know a bit that is set must refuse the image.
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

// Header holds the parsed qcow2 header fields, plus the two facts the
// driver needs from the rest of cluster 0: the backing name and its format.
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
	// BackingFormat comes from the backing format header extension. It is
	// "" when the image does not name one.
	BackingFormat string
}

// ClusterSize returns the image's cluster size in bytes.
func (h *Header) ClusterSize() uint64 { return 1 << h.ClusterBits }

// l1Entries is how many L1 entries an image of the given size needs. Each
// entry points at one L2 table, which maps clusterSize/8 clusters.
func l1Entries(size uint64, clusterBits uint32) uint64 {
	bytesPerL1 := uint64(1) << (2*clusterBits - 3)
	return (size + bytesPerL1 - 1) / bytesPerL1
}

// marshal encodes the fixed version 3 header fields into b[0:104].
func (h *Header) marshal(b []byte) {
	be := binary.BigEndian
	be.PutUint32(b[offMagic:], Magic)
	be.PutUint32(b[offVersion:], h.Version)
	be.PutUint64(b[offBackingFileOffset:], h.BackingFileOffset)
	be.PutUint32(b[offBackingFileSize:], h.BackingFileSize)
	be.PutUint32(b[offClusterBits:], h.ClusterBits)
	be.PutUint64(b[offSize:], h.Size)
	be.PutUint32(b[offCryptMethod:], h.CryptMethod)
	be.PutUint32(b[offL1Size:], h.L1Size)
	be.PutUint64(b[offL1TableOffset:], h.L1TableOffset)
	be.PutUint64(b[offRefcountTableOffset:], h.RefcountTableOffset)
	be.PutUint32(b[offRefcountTableClusters:], h.RefcountTableClusters)
	be.PutUint32(b[offNbSnapshots:], h.NbSnapshots)
	be.PutUint64(b[offSnapshotsOffset:], h.SnapshotsOffset)
	be.PutUint64(b[offIncompatibleFeatures:], h.IncompatibleFeatures)
	be.PutUint64(b[offCompatibleFeatures:], h.CompatibleFeatures)
	be.PutUint64(b[offAutoclearFeatures:], h.AutoclearFeatures)
	be.PutUint32(b[offRefcountOrder:], h.RefcountOrder)
	be.PutUint32(b[offHeaderLength:], h.HeaderLength)
}

// unmarshal decodes the fixed fields present in b: 72 bytes for version 2,
// 104 for version 3. A version 2 image has no refcount_order or
// header_length field, so unmarshal fills in the values the spec implies
// (16-bit refcounts and a 72-byte header).
func (h *Header) unmarshal(b []byte) {
	be := binary.BigEndian
	h.Version = be.Uint32(b[offVersion:])
	h.BackingFileOffset = be.Uint64(b[offBackingFileOffset:])
	h.BackingFileSize = be.Uint32(b[offBackingFileSize:])
	h.ClusterBits = be.Uint32(b[offClusterBits:])
	h.Size = be.Uint64(b[offSize:])
	h.CryptMethod = be.Uint32(b[offCryptMethod:])
	h.L1Size = be.Uint32(b[offL1Size:])
	h.L1TableOffset = be.Uint64(b[offL1TableOffset:])
	h.RefcountTableOffset = be.Uint64(b[offRefcountTableOffset:])
	h.RefcountTableClusters = be.Uint32(b[offRefcountTableClusters:])
	h.NbSnapshots = be.Uint32(b[offNbSnapshots:])
	h.SnapshotsOffset = be.Uint64(b[offSnapshotsOffset:])
	h.RefcountOrder = 4
	h.HeaderLength = v2HeaderLen
	if len(b) >= v3HeaderLen {
		h.IncompatibleFeatures = be.Uint64(b[offIncompatibleFeatures:])
		h.CompatibleFeatures = be.Uint64(b[offCompatibleFeatures:])
		h.AutoclearFeatures = be.Uint64(b[offAutoclearFeatures:])
		h.RefcountOrder = be.Uint32(b[offRefcountOrder:])
		h.HeaderLength = be.Uint32(b[offHeaderLength:])
	}
}

// pad8 rounds n up to a multiple of 8, the alignment of extension data.
func pad8(n int) int { return (n + 7) &^ 7 }
