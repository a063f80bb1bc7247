package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// newOverlay writes an overlay with our writer and returns its path.
func newOverlay(t testing.TB, dir, name string, opts OverlayOptions) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if opts.BackingFormat == "" {
		opts.BackingFormat = FormatRaw
	}
	if opts.Size == 0 {
		opts.Size = 1 << 20
	}
	if err := CreateOverlay(context.Background(), p, opts); err != nil {
		t.Fatal(err)
	}
	return p
}

// patch overwrites bytes of a file in place.
func patch(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// TestReadHeaderSeedTable covers every row of the reference table, plus the
// other corruption kinds the issue names. Each mutation starts from a valid
// overlay written by CreateOverlay with backing name "base.raw".
func TestReadHeaderSeedTable(t *testing.T) {
	type mutate func(t *testing.T, path string)
	truncateTo := func(n int64) mutate {
		return func(t *testing.T, p string) {
			if err := os.Truncate(p, n); err != nil {
				t.Fatal(err)
			}
		}
	}
	at := func(off int64, b []byte) mutate {
		return func(t *testing.T, p string) { patch(t, p, off, b) }
	}
	replace := func(b []byte) mutate {
		return func(t *testing.T, p string) {
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The writer puts the name right after the header, one extension and the
	// end marker: 104 + 8 + 8 ("raw" padded) + 8.
	const nameOff = 128

	cases := []struct {
		name       string
		mutate     mutate
		wantReason string // substring of the CorruptError reason; "" = valid
	}{
		{name: "valid", mutate: func(*testing.T, string) {}},
		{name: "bad magic", mutate: at(0, []byte("QFI\x00")), wantReason: "bad magic"},
		{name: "10-byte file", mutate: replace(make([]byte, 10)), wantReason: "truncated header"},
		{name: "256 KiB of zeros", mutate: replace(make([]byte, 256<<10)), wantReason: "bad magic"},
		{name: "truncated v3 header", mutate: truncateTo(90), wantReason: "truncated header"},
		{name: "non-UTF-8 backing name", mutate: at(nameOff, []byte{0xff, 0xfe, 0xfd}), wantReason: "not valid UTF-8"},
		{name: "NUL in backing name", mutate: at(nameOff+1, []byte{0}), wantReason: "contains NUL"},
		{name: "truncated backing name", mutate: truncateTo(nameOff + 4), wantReason: "truncated"},
		{name: "backing name too long", mutate: at(16, be32(1024)), wantReason: "exceeds 1023"},
		{name: "unsupported version 1", mutate: at(4, be32(1)), wantReason: "unsupported version 1"},
		{name: "unsupported version 4", mutate: at(4, be32(4)), wantReason: "unsupported version 4"},
		{name: "cluster_bits 8", mutate: at(20, be32(8)), wantReason: "cluster_bits 8 out of range"},
		{name: "cluster_bits 22", mutate: at(20, be32(22)), wantReason: "cluster_bits 22 out of range"},
		{name: "L1 table past EOF", mutate: at(40, be64(64<<20)), wantReason: "L1 table past EOF"},
		{name: "L1 table too small", mutate: at(36, be32(0)), wantReason: "L1 table too small"},
		{name: "unknown incompatible bit", mutate: at(72, be64(1<<5)), wantReason: "unknown incompatible feature"},
		{name: "external data file bit", mutate: at(72, be64(IncompatExternalData)), wantReason: "external data file"},
		{name: "corrupt bit", mutate: at(72, be64(IncompatCorrupt)), wantReason: "marked the image corrupt"},
		{name: "dirty bit is accepted", mutate: at(72, be64(IncompatDirty))},
		{name: "header_length past cluster", mutate: at(100, be32(1<<20)), wantReason: "header_length"},
		{name: "refcount table past EOF", mutate: at(48, be64(1<<30)), wantReason: "refcount table"},
		{name: "extension runs past name", mutate: at(108, be32(4096)), wantReason: "header extension"},
		{
			// Upstream's seed helper: magic, version 3 and a backing name,
			// every other field zero. Still corrupt, for an earlier reason.
			name: "upstream minimal header with non-UTF-8 name",
			mutate: func(t *testing.T, p string) {
				b := make([]byte, 1024)
				copy(b, be32(Magic))
				copy(b[4:], be32(3))
				copy(b[8:], be64(512))
				copy(b[16:], be32(3))
				copy(b[512:], []byte{0xff, 0xfe, 0xfd})
				replace(b)(t, p)
			},
			wantReason: "cluster_bits 0",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: "base.raw"})
			tc.mutate(t, p)
			h, err := ReadHeader(p)
			if tc.wantReason == "" {
				if err != nil {
					t.Fatalf("ReadHeader: %v", err)
				}
				if h.BackingFile != "base.raw" || h.BackingFormat != FormatRaw {
					t.Fatalf("backing = %q/%q, want base.raw/raw", h.BackingFile, h.BackingFormat)
				}
				return
			}
			var ce *CorruptError
			if !errors.As(err, &ce) {
				t.Fatalf("ReadHeader error = %v (%T), want *CorruptError", err, err)
			}
			if IsIO(err) {
				t.Fatalf("corruption misreported as I/O: %v", err)
			}
			if !strings.Contains(ce.Reason, tc.wantReason) {
				t.Fatalf("reason %q does not mention %q", ce.Reason, tc.wantReason)
			}
			if ce.Path != p || !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name the path %s", err, p)
			}
		})
	}
}

func TestReadHeaderIOErrors(t *testing.T) {
	// A directory at the path used to be an I/O error here (EISDIR). It is
	// now refused with the other non-regular files as tampered (see
	// TestOpenRefusesNonRegular): something other than the plugin put it
	// there, and it is still never mistaken for corruption.
	t.Run("missing file", func(t *testing.T) {
		_, err := ReadHeader(filepath.Join(t.TempDir(), "nope"))
		if !IsIO(err) || !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("err = %v, want an I/O error wrapping ErrNotExist", err)
		}
	})
	t.Run("EACCES", func(t *testing.T) {
		if os.Geteuid() == 0 {
			testenv.ByDesign(t, testenv.RootBypassesPermissions)
		}
		p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: "b"})
		if err := os.Chmod(p, 0); err != nil {
			t.Fatal(err)
		}
		_, err := ReadHeader(p)
		if !IsIO(err) || !errors.Is(err, os.ErrPermission) {
			t.Fatalf("err = %v, want an I/O error wrapping EACCES", err)
		}
	})
	t.Run("read failure", func(t *testing.T) {
		_, err := ParseHeader("dev", failingReader{}, 1<<20)
		if !IsIO(err) || !errors.Is(err, syscall.EIO) {
			t.Fatalf("err = %v, want an I/O error wrapping EIO", err)
		}
	})
	t.Run("file shrank under the reader", func(t *testing.T) {
		// The size says 1 MiB but only 50 bytes can be read.
		_, err := ParseHeader("shrunk", bytes.NewReader(make([]byte, 50)), 1<<20)
		if !IsIO(err) || IsCorrupt(err) {
			t.Fatalf("err = %v, want an I/O error", err)
		}
	})
}

type failingReader struct{}

func (failingReader) ReadAt([]byte, int64) (int, error) { return 0, syscall.EIO }

// TestReadHeaderVersion2 reads a minimal hand-built version-2 image: QEMU
// still opens them, and so must we.
func TestReadHeaderVersion2(t *testing.T) {
	const cb = 9
	b := make([]byte, 4<<cb)
	copy(b, be32(Magic))
	copy(b[4:], be32(2))
	copy(b[8:], be64(200))
	copy(b[16:], be32(4))
	copy(b[20:], be32(cb))
	copy(b[24:], be64(1<<20))
	copy(b[36:], be32(uint32(l1Entries(1<<20, cb))))
	copy(b[40:], be64(2<<cb))
	copy(b[48:], be64(1<<cb))
	copy(b[56:], be32(1))
	copy(b[200:], "base")
	h, err := ParseHeader("v2", bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if h.Version != 2 || h.BackingFile != "base" || h.RefcountOrder != 4 || h.HeaderLength != 72 {
		t.Fatalf("got %+v", h)
	}
}

var _ io.ReaderAt = failingReader{}

// TestReadHeaderPrecedence pins which fault is reported when an image has
// several. parseHeader runs its checks in a fixed order, and the first one
// that fails decides the error.
func TestReadHeaderPrecedence(t *testing.T) {
	type patchAt struct {
		off int64
		b   []byte
	}
	const nameOff = 128 // as in TestReadHeaderSeedTable
	cases := []struct {
		name       string
		patches    []patchAt
		wantReason string
	}{
		{"cluster_bits before header_length", []patchAt{{20, be32(8)}, {100, be32(1 << 20)}}, "cluster_bits 8"},
		{"header_length before feature bits", []patchAt{{100, be32(1 << 20)}, {72, be64(1 << 5)}}, "header_length"},
		{"feature bits before virtual size", []patchAt{{72, be64(IncompatCorrupt)}, {24, be64(MaxVirtualSize + 1)}}, "marked the image corrupt"},
		{"virtual size before extensions", []patchAt{{24, be64(MaxVirtualSize + 1)}, {108, be32(4096)}}, "virtual size"},
		{"extensions before backing name", []patchAt{{108, be32(4096)}, {nameOff, []byte{0}}}, "header extension"},
		{"backing name before tables", []patchAt{{nameOff, []byte{0xff}}, {36, be32(0)}}, "not valid UTF-8"},
		{"L1 table before refcount table", []patchAt{{40, be64(64 << 20)}, {48, be64(1 << 30)}}, "L1 table past EOF"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: "base.raw"})
			for _, pa := range tc.patches {
				patch(t, p, pa.off, pa.b)
			}
			_, err := ReadHeader(p)
			var ce *CorruptError
			if !errors.As(err, &ce) || !strings.Contains(ce.Reason, tc.wantReason) {
				t.Fatalf("err = %v, want a CorruptError mentioning %q", err, tc.wantReason)
			}
		})
	}
}
