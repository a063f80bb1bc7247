package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
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
	if len(data) >= v3HeaderLen && be.Uint32(data[4:]) == 3 && be.Uint64(data[72:])&IncompatExternalData != 0 {
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
