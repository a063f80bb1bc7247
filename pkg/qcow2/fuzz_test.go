package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// boundedReader fails the test if the parser asks for bytes outside the
// file. Every buffer the parser allocates is one it reads into, so this
// bounds its allocations by the file's size.
type boundedReader struct {
	t    *testing.T
	data []byte
}

func (r *boundedReader) ReadAt(b []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(r.data)) || int64(len(b)) > int64(len(r.data))-off {
		r.t.Fatalf("read of %d bytes at %d outside a %d-byte file", len(b), off, len(r.data))
	}
	return bytes.NewReader(r.data).ReadAt(b, off)
}

func FuzzReadHeader(f *testing.F) {
	// Seeds live in testdata/fuzz/FuzzReadHeader: compact (512-byte
	// cluster) images, valid and corrupt. Full-size overlays are 256 KiB,
	// which the fuzzer spends its time minimizing instead of exploring.
	f.Add([]byte{})
	f.Add(make([]byte, 10))
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))

	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader("fuzz", &boundedReader{t: t, data: data}, int64(len(data)))
		if err != nil {
			// The bytes are all there, so every refusal is corruption.
			var ce *CorruptError
			if !errors.As(err, &ce) || h != nil {
				t.Fatalf("err = %v (%T), header %v: want *CorruptError and no header", err, err, h)
			}
			return
		}
		if len(h.BackingFile) > MaxBackingNameLen {
			t.Fatalf("accepted a %d-byte backing name", len(h.BackingFile))
		}
		if h.BackingFileOffset != 0 && len(h.BackingFile) != int(h.BackingFileSize) {
			t.Fatalf("name %q does not match its size %d", h.BackingFile, h.BackingFileSize)
		}
		if h.L1TableOffset+uint64(h.L1Size)*8 > uint64(len(data)) {
			t.Fatal("accepted an L1 table past EOF")
		}
		if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
			t.Fatalf("accepted cluster_bits %d", h.ClusterBits)
		}
		if h.IncompatibleFeatures&^(IncompatDirty|IncompatCompression|IncompatExtendedL2) != 0 {
			t.Fatalf("accepted incompatible features %#x", h.IncompatibleFeatures)
		}
	})
}

// FuzzCreateOverlay checks that whatever the writer accepts, the reader
// reads back exactly, and whatever it refuses leaves nothing on disk.
func FuzzCreateOverlay(f *testing.F) {
	f.Add("../base/rootfs.ext4", uint64(1<<20), false)
	f.Add("/abs", uint64(512<<20+1), true)
	f.Add("", uint64(0), false)
	f.Add("a\x00b", uint64(1), false)
	f.Fuzz(func(t *testing.T, name string, size uint64, qcow bool) {
		format := FormatRaw
		if qcow {
			format = FormatQcow2
		}
		dir := t.TempDir()
		p := filepath.Join(dir, "o.qcow2")
		err := CreateOverlay(context.Background(), p, OverlayOptions{BackingFile: name, BackingFormat: format, Size: size, NoSync: true})
		if err != nil {
			if !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("refused create left %d entries", len(ents))
			}
			return
		}
		h, err := Verify(p, Expect{BackingFile: name, BackingFormat: format})
		if err != nil {
			t.Fatalf("wrote an overlay that does not read back: %v", err)
		}
		if h.Size < size || h.Size-size >= 512 {
			t.Fatalf("size %d read back as %d", size, h.Size)
		}
	})
}

// TestSeedCorpusClassified keeps the checked-in seeds honest: the valid
// ones parse and the others are refused as corrupt.
func TestSeedCorpusClassified(t *testing.T) {
	for name, s := range readCorpus(t, filepath.Join("testdata", "fuzz", "FuzzReadHeader")) {
		_, err := ParseHeader(name, bytes.NewReader(s), int64(len(s)))
		if valid := strings.HasPrefix(name, "valid") || name == "relative_up"; valid != (err == nil) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

// FuzzProbeL1 checks that ProbeL1 reads only inside the file, never fails
// on bytes that are all there, and says Empty only when the raw bytes,
// decoded here independently, prove the image maps nothing.
func FuzzProbeL1(f *testing.F) {
	// More seeds live in testdata/fuzz/FuzzProbeL1: compact (512-byte
	// cluster) images named empty_* or data_* after ProbeL1's answer.
	f.Add([]byte{})
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := ProbeL1("fuzz", &boundedReader{t: t, data: data}, int64(len(data)))
		if err != nil {
			t.Fatalf("err = %v: every byte was readable", err)
		}
		if got.Reason == "" {
			t.Fatal("no reason given")
		}
		if got.Empty && !provablyEmpty(data) {
			t.Fatalf("Empty (%s), but the bytes do not prove it", got.Reason)
		}
	})
}

// provablyEmpty decodes the image the slow, obvious way: a file of at most
// 512 bytes holds no guest cluster; otherwise a qcow2 v2 or v3 header
// without snapshots or an external data file whose L1 table lies in the
// file must have no nonzero entry.
func provablyEmpty(data []byte) bool {
	be := binary.BigEndian
	// Only a qcow2 header (magic and all) can name an external data file:
	// bytes QEMU does not read as qcow2 map nothing.
	if len(data) >= v3HeaderLen && be.Uint32(data) == Magic && be.Uint32(data[4:]) == 3 && be.Uint64(data[72:])&IncompatExternalData != 0 {
		return false
	}
	if len(data) <= 512 {
		return true
	}
	if be.Uint32(data) != Magic || (be.Uint32(data[4:]) != 2 && be.Uint32(data[4:]) != 3) || be.Uint32(data[60:]) != 0 {
		return false
	}
	n, off := uint64(be.Uint32(data[36:])), be.Uint64(data[40:])
	if n == 0 {
		return true
	}
	if n > MaxL1Entries || off > uint64(len(data)) || n*8 > uint64(len(data))-off {
		return false
	}
	for i := range n {
		if be.Uint64(data[off+8*i:]) != 0 {
			return false
		}
	}
	return true
}

// readCorpus returns the []byte values of the seed files in dir by name.
func readCorpus(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		t.Fatalf("seed corpus %s missing: %v", dir, err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		lit, ok := bytes.CutPrefix(raw, []byte("go test fuzz v1\n[]byte("))
		if !ok {
			t.Fatalf("%s: not a Go fuzz corpus file", e.Name())
		}
		s, err := strconv.Unquote(string(bytes.TrimSuffix(bytes.TrimSpace(lit), []byte(")"))))
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		out[e.Name()] = []byte(s)
	}
	return out
}

// TestProbeL1SeedCorpus keeps the L1 seeds honest: empty_* are Empty and
// data_* may hold data.
func TestProbeL1SeedCorpus(t *testing.T) {
	for name, b := range readCorpus(t, filepath.Join("testdata", "fuzz", "FuzzProbeL1")) {
		got, err := ProbeL1(name, bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want := strings.HasPrefix(name, "empty_"); got.Empty != want {
			t.Errorf("%s: %+v, want Empty=%v", name, got, want)
		}
	}
}

// FuzzCreateOverlayWrites creates overlays holding random sets of writes:
// at random offsets (many near cluster and L2 boundaries, some past the
// end), of random lengths and contents (zeros among them), overlapping or
// not, over backings of random length or none. Whatever the writer
// accepts must have a sound layout (checkOverlay) and read back, through
// its own tables, as the backing with the writes applied (checkGuest);
// whatever it refuses must be ErrInvalidOption and leave nothing on disk.
func FuzzCreateOverlayWrites(f *testing.F) {
	rec := func(off uint32, shift, flags byte, n uint16, fill byte) []byte {
		b := binary.LittleEndian.AppendUint32(nil, off)
		b = append(b, shift, flags)
		b = binary.LittleEndian.AppendUint16(b, n)
		return append(b, fill)
	}
	cat := func(recs ...[]byte) []byte { return bytes.Join(recs, nil) }
	f.Add(uint64(1<<30), uint32(1<<20), cat(rec(0, 0, 0, 4096, 1), rec(1, 29, 0, 4096, 2)))
	f.Add(uint64(20<<30), uint32(3<<20+5), cat(rec(3*ClusterSize-2048, 0, 0, 4096, 3), rec(0, 0, 0, 1, 0)))
	f.Add(uint64(100<<30), uint32(0), cat(rec(25, 27, 0, 8192, 9), rec(25, 27, 0, 100, 0)))
	f.Add(uint64(1<<20), uint32(1<<31), cat(rec(0, 0, 0, 10, 1)))
	f.Add(uint64(1<<20), uint32(1<<20), cat(rec(1<<20, 0, 0, 1, 1)))
	f.Fuzz(func(t *testing.T, size uint64, backingLen uint32, spec []byte) {
		// Sizes up to 64 TiB keep the L1 table, which checkOverlay reads
		// whole, at 1 MiB at most; the largest size has its own test.
		size %= 64<<40 + 1
		// A backing of up to 4 MiB, or none when the top bit is set.
		var backing []byte
		var r io.ReaderAt
		if backingLen&(1<<31) == 0 {
			backing = randomBytes(uint64(backingLen), int(backingLen%(4<<20)))
			r = bytes.NewReader(backing)
		}
		// Each 9-byte record is one write: a 32-bit offset shifted left by
		// up to 63 bits (wrapped into the disk unless flag 1 is set), a
		// length of up to 4*65535 bytes (cut to fit the disk if flag 2 is
		// set) and a fill byte (0 writes zeros).
		var writes []Write
		for len(spec) >= 9 && len(writes) < 64 {
			off := uint64(binary.LittleEndian.Uint32(spec)) << (spec[4] % 64)
			flags := spec[5]
			n := int(binary.LittleEndian.Uint16(spec[6:])) * (1 + int(flags>>4)%4)
			fill := spec[8]
			spec = spec[9:]
			if flags&1 == 0 && size > 0 {
				off %= size
			}
			if flags&2 != 0 && off <= size {
				n = int(min(uint64(n), size-off))
			}
			d := make([]byte, n)
			if fill != 0 {
				for i := range d {
					d[i] = fill ^ byte(i*7+len(writes))
				}
			}
			writes = append(writes, Write{Offset: off, Data: d})
		}
		dir := t.TempDir()
		p := filepath.Join(dir, "o.qcow2")
		opts := OverlayOptions{BackingFile: "base.raw", BackingFormat: FormatRaw, Size: size, NoSync: true,
			Writes: writes, Backing: r, BackingSize: int64(len(backing))}
		if err := CreateOverlay(context.Background(), p, opts); err != nil {
			if !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("refused create left %d entries", len(ents))
			}
			return
		}
		if _, err := Verify(p, Expect{BackingFile: "base.raw", BackingFormat: FormatRaw}); err != nil {
			t.Fatalf("wrote an overlay that does not read back: %v", err)
		}
		checkGuest(t, p, checkOverlay(t, p), backing, writes)
	})
}
