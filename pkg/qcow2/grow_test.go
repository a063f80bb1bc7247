package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	gib = uint64(1) << 30
	tib = uint64(1) << 40
)

// growWant is what every overlay in these tests is: one over base.raw,
// next to it.
var growWant = Expect{BackingFile: "base.raw", BackingFormat: FormatRaw}

// growBase writes dir/base.raw: a sparse raw file of 1 GiB + 64 KiB that
// reads as zeros except for its last 64 KiB, which are 0x5c. A 1 GiB
// overlay over it hides that tail, so growing the overlay must reveal it
// and, past the end of the base, zeros.
func growBase(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "base.raw"))
	must(t, err)
	defer f.Close()
	_, err = f.WriteAt(bytes.Repeat([]byte{0x5c}, 64<<10), int64(gib))
	must(t, err)
}

// growFile opens p read-write and grows it.
func growFile(t *testing.T, p string, want Expect, size uint64) (GrowResult, error) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	return GrowFile(f, want, size)
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	must(t, err)
	return b
}

// onlyGrowFieldsChanged fails unless after is before with at most the
// size and l1_size fields rewritten: same length, and every byte outside
// 24..39 equal. crypt_method, between them, must not change either.
func onlyGrowFieldsChanged(t *testing.T, before, after []byte) {
	t.Helper()
	if len(after) != len(before) {
		t.Fatalf("the file went from %d to %d bytes", len(before), len(after))
	}
	for i := range before {
		if before[i] != after[i] && (i < offSize || i >= offSize+8) && (i < offL1Size || i >= offL1Size+4) {
			t.Fatalf("byte %d (%#x) changed from %#02x to %#02x", i, i, before[i], after[i])
		}
	}
}

// qemuCheckClean fails unless qemu-img check finds neither errors nor
// leaks. It exits 2 for corruption and 3 for leaks, which run reports.
func qemuCheckClean(t *testing.T, qemuImg, p string) {
	t.Helper()
	out := run(t, qemuImg, "check", "-f", "qcow2", p)
	if !strings.Contains(out, "No errors were found") || strings.Contains(out, "leak") {
		t.Fatalf("qemu-img check %s:\n%s", p, out)
	}
}

func qemuVirtualSize(t *testing.T, qemuImg, p string) uint64 {
	t.Helper()
	var info qemuInfo
	must(t, json.Unmarshal([]byte(run(t, qemuImg, "info", "-f", "qcow2", "--output=json", p)), &info))
	return info.VirtualSize
}

// qemuIO runs the qemu-io commands on p in one process. qemu-io exits
// nonzero if any of them failed, a read -P whose bytes do not all match
// included, and run fails the test then.
func qemuIO(t *testing.T, tool, p string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, tool, append(args, p)...)
}

// pattern is one qemu-io write, read back with read -P.
type pattern struct {
	off, n uint64
	fill   byte
}

func (w pattern) write() string { return fmt.Sprintf("write -P %#x %d %d", w.fill, w.off, w.n) }
func (w pattern) read() string  { return fmt.Sprintf("read -P %#x %d %d", w.fill, w.off, w.n) }

// checkGrown is what every successful growth must leave: the header says
// newSize with just enough L1 entries, our reader and QEMU agree, QEMU
// finds no error or leak, the guest's earlier writes read back, the new
// range reads as the base and then zeros, and QEMU can write at the new
// end.
func checkGrown(t *testing.T, p string, oldSize, newSize uint64, written []pattern) {
	t.Helper()
	qemuImg, qio := needQemu(t, "qemu-img"), needQemu(t, "qemu-io")
	f, err := os.Open(p)
	must(t, err)
	h, err := VerifyFile(f, growWant)
	f.Close()
	must(t, err)
	if h.Size != newSize {
		t.Fatalf("header size %d, want %d", h.Size, newSize)
	}
	if need := (newSize + l1EntryBytes(h) - 1) / l1EntryBytes(h); uint64(h.L1Size) < need {
		t.Fatalf("l1_size %d, and %d bytes need %d", h.L1Size, newSize, need)
	}
	qemuCheckClean(t, qemuImg, p)
	if got := qemuVirtualSize(t, qemuImg, p); got != newSize {
		t.Fatalf("qemu-img info: virtual size %d, want %d", got, newSize)
	}
	var cmds []string
	for _, w := range written {
		cmds = append(cmds, w.read())
	}
	// growBase's tail is at 1 GiB; below it the base is zeros.
	base := pattern{gib, 64 << 10, 0x5c}
	switch {
	case oldSize <= base.off && base.off+base.n <= newSize:
		cmds = append(cmds, base.read(), pattern{base.off + base.n, 64 << 10, 0}.read())
	case newSize <= base.off:
		cmds = append(cmds, pattern{oldSize, min(64<<10, newSize-oldSize), 0}.read())
	}
	end := pattern{newSize - 64<<10, 64 << 10, 0}
	cmds = append(cmds, end.read())
	end.fill = 0xcd
	cmds = append(cmds, end.write(), end.read())
	qemuIO(t, qio, p, cmds...)
	qemuCheckClean(t, qemuImg, p)
}

// TestGrowFile grows 1 GiB overlays that CreateOverlay wrote and a guest
// (qemu-io) wrote to at both ends, and has QEMU judge the result.
func TestGrowFile(t *testing.T) {
	qio := needQemu(t, "qemu-io")
	cases := []struct {
		name      string
		ask, want uint64
		l1Size    uint32
	}{
		{"3GiB", 3 * gib, 3 * gib, 6},
		{"3GiB+1 rounds up to a sector", 3*gib + 1, 3*gib + 512, 7},
		{"20GiB", 20 * gib, 20 * gib, 40},
		{"100GiB", 100 * gib, 100 * gib, 200},
		{"4TiB fills the one L1 cluster", 4 * tib, 4 * tib, 8192},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			growBase(t, dir)
			p := newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: "base.raw", Size: gib})
			written := []pattern{{0, 64 << 10, 0xab}, {gib - 64<<10, 64 << 10, 0xac}}
			qemuIO(t, qio, p, written[0].write(), written[1].write())
			before := readFile(t, p)

			res, err := growFile(t, p, growWant, tc.ask)
			if err != nil {
				t.Fatal(err)
			}
			if res != (GrowResult{OldSize: gib, NewSize: tc.want, Changed: true}) {
				t.Fatalf("result %+v", res)
			}
			after := readFile(t, p)
			onlyGrowFieldsChanged(t, before, after)
			be := binary.BigEndian
			if got, l1 := be.Uint64(after[offSize:]), be.Uint32(after[offL1Size:]); got != tc.want || l1 != tc.l1Size {
				t.Fatalf("header says size %d and l1_size %d, want %d and %d", got, l1, tc.want, tc.l1Size)
			}
			checkGrown(t, p, gib, tc.want, written)

			// Asking again, or for a size that rounds to the same, writes
			// nothing.
			for _, ask := range []uint64{tc.ask, tc.want, tc.want - 511} {
				before := readFile(t, p)
				res, err := growFile(t, p, growWant, ask)
				if err != nil || res != (GrowResult{OldSize: tc.want, NewSize: tc.want}) {
					t.Fatalf("repeat with %d: %+v, %v; want unchanged", ask, res, err)
				}
				if !bytes.Equal(readFile(t, p), before) {
					t.Fatalf("repeat with %d changed the file", ask)
				}
			}
		})
	}
}

// TestGrowFileQemuWritten grows images that QEMU itself has written all
// over, one of them a qemu-img image with 512-byte clusters that made
// QEMU allocate dozens of L2 tables and refcount blocks and move its
// refcount table: only the two header fields may change.
func TestGrowFileQemuWritten(t *testing.T) {
	qemuImg, qio := needQemu(t, "qemu-img"), needQemu(t, "qemu-io")
	create := func(opts string) func(t *testing.T, p string, size uint64) {
		return func(t *testing.T, p string, size uint64) {
			run(t, qemuImg, "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", p, fmt.Sprint(size))
		}
	}
	spread := []pattern{
		{0, 4096, 0x11},
		{8192, 512, 0x12}, // inside the cluster just allocated
		{300 << 20, 192 << 10, 0x13},
		{512<<20 - 4096, 8192, 0x14}, // across two L2 tables
		{700<<20 + 12345, 100000, 0x15},
		{gib - 4096, 4096, 0x16},
	}
	cases := []struct {
		name             string
		make             func(t *testing.T, p string, size uint64)
		oldSize, newSize uint64
		writes           []pattern
		refcountBlocks   int // at least this many after the writes
	}{
		{"CreateOverlay", func(t *testing.T, p string, size uint64) {
			newOverlay(t, filepath.Dir(p), filepath.Base(p), OverlayOptions{BackingFile: "base.raw", Size: size})
		}, gib, 3 * gib, spread, 1},
		// 64 MiB + 96 KiB needs 2051 entries of 32 KiB, which leave room
		// for 61 more in the L1 table's last 512-byte cluster.
		{"qemu-img 512-byte clusters", create("cluster_size=512"), 64<<20 + 96<<10, 66 << 20, []pattern{
			{0, 4 << 20, 0x21},
			{40 << 20, 4 << 20, 0x22},
			{64<<20 + 64<<10, 32 << 10, 0x23},
		}, 65}, // more than the 64 entries of a 512-byte refcount table
		// Each L1 entry maps half as much with extended L2 entries.
		{"qemu-img extended L2", create("extended_l2=on"), gib, 3 * gib, spread, 1},
		{"qemu-img version 2", create("compat=0.10"), gib, 3 * gib, spread, 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			growBase(t, dir)
			p := filepath.Join(dir, "o.qcow2")
			tc.make(t, p, tc.oldSize)
			var cmds []string
			for _, w := range tc.writes {
				cmds = append(cmds, w.write())
			}
			qemuIO(t, qio, p, cmds...)
			qemuCheckClean(t, qemuImg, p)
			before := readFile(t, p)
			h, err := ParseHeader(p, bytes.NewReader(before), int64(len(before)))
			must(t, err)
			if n := refcountBlocks(t, before, h); n < tc.refcountBlocks {
				t.Fatalf("QEMU allocated %d refcount blocks, want at least %d", n, tc.refcountBlocks)
			}

			res, err := growFile(t, p, growWant, tc.newSize)
			if err != nil || res != (GrowResult{OldSize: tc.oldSize, NewSize: tc.newSize, Changed: true}) {
				t.Fatalf("%+v, %v", res, err)
			}
			onlyGrowFieldsChanged(t, before, readFile(t, p))
			checkGrown(t, p, tc.oldSize, tc.newSize, tc.writes)
		})
	}
}

// refcountBlocks counts the refcount blocks in use, from the refcount
// table of the trusted image b.
func refcountBlocks(t *testing.T, b []byte, h *Header) int {
	t.Helper()
	n := 0
	end := h.RefcountTableOffset + uint64(h.RefcountTableClusters)*h.ClusterSize()
	for off := h.RefcountTableOffset; off < end && off+8 <= uint64(len(b)); off += 8 {
		if binary.BigEndian.Uint64(b[off:]) != 0 {
			n++
		}
	}
	return n
}

// TestGrowFileRefused: every refusal leaves the file byte for byte as it
// was, and says why in a way a caller can tell apart.
func TestGrowFileRefused(t *testing.T) {
	const l1Off = 3 * ClusterSize // where an empty overlay's L1 table is
	type mutate func(t *testing.T, p string)
	truncate := func(n int64) mutate { return func(t *testing.T, p string) { must(t, os.Truncate(p, n)) } }
	sentinel := func(target error, msg string) func(error) bool {
		return func(err error) bool { return errors.Is(err, target) && strings.Contains(err.Error(), msg) }
	}
	tampered := func(field string) func(error) bool {
		return func(err error) bool {
			var te *TamperedError
			return errors.As(err, &te) && te.Field == field && !IsCorrupt(err) && !IsIO(err)
		}
	}
	corrupt := func(err error) bool { return IsCorrupt(err) && !IsTampered(err) }
	plain := func(msg string) func(error) bool {
		return func(err error) bool {
			return err != nil && strings.Contains(err.Error(), msg) && !IsCorrupt(err) && !IsTampered(err) && !IsIO(err) &&
				!errors.Is(err, ErrShrink) && !errors.Is(err, ErrGrowNeedsL1Move)
		}
	}
	cases := []struct {
		name    string
		opts    OverlayOptions // over newOverlay's defaults, but 1 GiB
		mutate  mutate
		flag    int // how to open it, if not O_RDWR (os.O_RDONLY is 0)
		want    *Expect
		size    uint64
		ok      func(error) bool
		oldSize uint64 // in the result; 0 when the header is not read
	}{
		{name: "shrink", size: gib / 2, ok: sentinel(ErrShrink, "the image is 1073741824 bytes, and shrinking a qcow2 image is refused"), oldSize: gib},
		{name: "shrink by one sector", size: gib - 512, ok: sentinel(ErrShrink, "1073741824"), oldSize: gib},
		{name: "shrink to zero", size: 0, ok: sentinel(ErrShrink, "1073741824"), oldSize: gib},
		{name: "one sector past the L1 cluster", size: 4*tib + 512, oldSize: gib,
			ok: sentinel(ErrGrowNeedsL1Move, "8193 L1 entries, and only 8192 fit at 0x30000 (the L1 table's last cluster ends at 0x40000); the largest size that fits in place is 4398046511104 bytes")},
		{name: "64TiB", size: 64 * tib, ok: sentinel(ErrGrowNeedsL1Move, "moving the L1 table is not supported online"), oldSize: gib},
		{name: "past the maximum", size: MaxVirtualSize + 1, ok: sentinel(ErrInvalidOption, "exceeds the maximum")},
		{name: "MaxUint64, which would wrap when rounded", size: math.MaxUint64, ok: sentinel(ErrInvalidOption, "exceeds the maximum")},
		{name: "caller expects another backing", want: &Expect{BackingFile: "other.raw", BackingFormat: FormatRaw}, size: 3 * gib, ok: tampered("backing file")},
		{name: "backing name rewritten", opts: OverlayOptions{BackingFile: "/etc/shadow"}, size: 3 * gib, ok: tampered("backing file")},
		{name: "backing format rewritten", opts: OverlayOptions{BackingFormat: FormatQcow2}, size: 3 * gib, ok: tampered("backing format")},
		{name: "encryption enabled", mutate: func(t *testing.T, p string) { patch(t, p, offCryptMethod, be32(1)) }, size: 3 * gib, ok: tampered("crypt method")},
		{name: "l1_table_offset on the refcount table", mutate: func(t *testing.T, p string) { patch(t, p, offL1TableOffset, be64(ClusterSize)) },
			size: 3 * gib, ok: tampered("L1 table offset"), oldSize: gib},
		{name: "l1_table_offset on a data cluster", opts: OverlayOptions{Writes: []Write{{Offset: 0, Data: bytes.Repeat([]byte{0xee}, 4096)}}, Backing: bytes.NewReader(nil)},
			mutate: func(t *testing.T, p string) {
				// CreateOverlay put the L2 table after the L1 table, and
				// the data cluster after that.
				patch(t, p, offL1TableOffset, be64(l1Off+2*ClusterSize))
			}, size: 3 * gib, ok: tampered("unused space after the L1 table"), oldSize: gib},
		{name: "l1_table_offset past the end", mutate: func(t *testing.T, p string) { patch(t, p, offL1TableOffset, be64(64*ClusterSize)) }, size: 3 * gib, ok: corrupt},
		{name: "nonzero byte in the L1 extension", mutate: func(t *testing.T, p string) { patch(t, p, l1Off+5*8+7, []byte{1}) },
			size: 3 * gib, ok: tampered("unused space after the L1 table"), oldSize: gib},
		{name: "nonzero byte in the last needed entry", mutate: func(t *testing.T, p string) { patch(t, p, l1Off+8191*8, []byte{0x80}) },
			size: 4 * tib, ok: tampered("unused space after the L1 table"), oldSize: gib},
		{name: "truncated inside the L1 cluster", mutate: truncate(l1Off + 16), size: 3 * gib, oldSize: gib,
			ok: sentinel(ErrGrowNeedsL1Move, "the file ends at 0x30010, inside the L1 table's last cluster); the largest size that fits in place is 1073741824 bytes")},
		{name: "truncated inside the L1 table", mutate: truncate(l1Off + 8), size: 3 * gib, ok: corrupt},
		{name: "truncated header", mutate: truncate(60), size: 3 * gib, ok: corrupt},
		{name: "marked corrupt by QEMU", mutate: func(t *testing.T, p string) { setIncompat(t, p, IncompatCorrupt) }, size: 3 * gib, ok: corrupt},
		{name: "internal snapshot", mutate: func(t *testing.T, p string) { patch(t, p, offNbSnapshots, be32(1)) }, size: 3 * gib, ok: plain("1 internal snapshots"), oldSize: gib},
		{name: "autoclear bit", mutate: func(t *testing.T, p string) { patch(t, p, offAutoclearFeatures, be64(1)) }, size: 3 * gib, ok: plain("autoclear feature bits 0x1"), oldSize: gib},
		{name: "read-only descriptor", flag: os.O_RDONLY | syscall.O_CLOEXEC, size: 3 * gib, ok: plain("is not open for reading and writing"), oldSize: gib},
		{name: "O_APPEND descriptor", flag: os.O_RDWR | os.O_APPEND, size: 3 * gib, ok: plain("O_APPEND"), oldSize: gib},
		{name: "write-only descriptor", flag: os.O_WRONLY, size: 3 * gib, ok: func(err error) bool { return IsIO(err) && errors.Is(err, syscall.EBADF) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := tc.opts
			if opts.BackingFile == "" {
				opts.BackingFile = growWant.BackingFile
			}
			opts.Size = gib
			p := newOverlay(t, dir, "o.qcow2", opts)
			if tc.mutate != nil {
				tc.mutate(t, p)
			}
			before := readFile(t, p)
			want := growWant
			if tc.want != nil {
				want = *tc.want
			}
			flag := os.O_RDWR
			if tc.flag != 0 {
				flag = tc.flag
			}
			f, err := os.OpenFile(p, flag, 0)
			must(t, err)
			defer f.Close()
			res, err := GrowFile(f, want, tc.size)
			if !tc.ok(err) {
				t.Fatalf("err = %v (%T)", err, err)
			}
			if !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name %s", err, p)
			}
			if res != (GrowResult{OldSize: tc.oldSize, NewSize: tc.oldSize}) {
				t.Fatalf("result %+v on a refusal", res)
			}
			if !bytes.Equal(readFile(t, p), before) {
				t.Fatal("a refused growth changed the file")
			}
		})
	}
}

// TestGrowFileNonRegular: a FIFO or directory where the overlay should be
// is refused as tampered without being read, as VerifyFile refuses it.
func TestGrowFileNonRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	must(t, syscall.Mkfifo(fifo, 0o644))
	f, err := os.OpenFile(fifo, os.O_RDWR|syscall.O_NONBLOCK, 0)
	must(t, err)
	defer f.Close()
	if _, err := GrowFile(f, growWant, 3*gib); !IsTampered(err) || !strings.Contains(err.Error(), "named pipe") {
		t.Fatalf("err = %v, want tampered (named pipe)", err)
	}
}

// compactImage is a small valid v3 image over base.raw with 512-byte
// clusters, for fuzzing: the header, refcount table, refcount block and a
// zero L1 table of l1Size entries, one cluster each (more for a longer
// table). One L1 entry maps 32 KiB.
func compactImage(size uint64, l1Size uint32) []byte {
	const c = 1 << minClusterBits
	l1Clusters := max(1, (uint64(l1Size)*8+c-1)/c)
	b := make([]byte, (3+l1Clusters)*c)
	h := Header{Version: 3, BackingFileOffset: v3HeaderLen + 16 + 8, BackingFileSize: 8, ClusterBits: minClusterBits,
		Size: size, L1Size: l1Size, L1TableOffset: 3 * c, RefcountTableOffset: c, RefcountTableClusters: 1,
		RefcountOrder: 4, HeaderLength: v3HeaderLen}
	h.marshal(b)
	be := binary.BigEndian
	be.PutUint32(b[v3HeaderLen:], extBackingFormat)
	be.PutUint32(b[v3HeaderLen+4:], 3)
	copy(b[v3HeaderLen+8:], FormatRaw)
	copy(b[h.BackingFileOffset:], "base.raw")
	be.PutUint64(b[c:], 2*c)
	for i := range 3 + l1Clusters {
		be.PutUint16(b[2*c+2*i:], 1)
	}
	return b
}

// FuzzGrowHeader feeds GrowFile arbitrary image bytes and sizes. It must
// never panic. When it fails, the file is as it was. When it succeeds, at
// most size and l1_size changed, the image reads back with the size asked
// for, and the L1 entries it gained were zeros inside the file and inside
// the old table's last cluster, decoded here independently of GrowFile.
func FuzzGrowHeader(f *testing.F) {
	const c = 1 << minClusterBits
	with := func(b []byte, fn func(b []byte)) []byte { fn(b); return b }
	be := binary.BigEndian
	img := func() []byte { return compactImage(64<<10, 2) } // 2 of 64 entries used
	f.Add(img(), uint64(1<<20))
	f.Add(img(), uint64(2<<20)) // exactly the L1 cluster
	f.Add(img(), uint64(2<<20+512))
	f.Add(img(), uint64(64<<10+1))
	f.Add(img(), uint64(64<<10))
	f.Add(img(), uint64(32<<10))
	f.Add(img(), MaxVirtualSize+1)
	f.Add(compactImage(2<<20, 64), uint64(2<<20+512)) // a full L1 cluster
	f.Add(compactImage(2<<20, 65), uint64(4<<20))     // a second L1 cluster
	f.Add(with(img(), func(b []byte) { be.PutUint64(b[offIncompatibleFeatures:], IncompatExtendedL2) }), uint64(1<<20))
	f.Add(with(img(), func(b []byte) { be.PutUint32(b[offVersion:], 2) }), uint64(1<<20))
	f.Add(with(img(), func(b []byte) { b[3*c+40] = 1 }), uint64(1<<20))
	f.Add(with(img(), func(b []byte) { be.PutUint32(b[offNbSnapshots:], 1) }), uint64(1<<20))
	f.Add(with(img(), func(b []byte) { be.PutUint64(b[offAutoclearFeatures:], 1) }), uint64(1<<20))
	f.Add(with(img(), func(b []byte) { be.PutUint64(b[offL1TableOffset:], c) }), uint64(1<<20))
	f.Add(img()[:3*c+16], uint64(1<<20))
	f.Add([]byte{}, uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, newSize uint64) {
		fd, err := unix.MemfdCreate("fuzz.qcow2", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		file := os.NewFile(uintptr(fd), "fuzz.qcow2")
		defer file.Close()
		if _, err := file.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		// Expect what the image names, so the fuzzer gets past the backing
		// check; VerifyFile's own tests cover refusing it.
		want := growWant
		if h, err := ParseHeader("fuzz", bytes.NewReader(data), int64(len(data))); err == nil {
			want = Expect{BackingFile: h.BackingFile, BackingFormat: h.BackingFormat}
		}
		res, gerr := GrowFile(file, want, newSize)
		after, err := os.ReadFile(fmt.Sprintf("/proc/self/fd/%d", file.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		if gerr != nil {
			if IsIO(gerr) {
				t.Fatalf("I/O error with every byte there: %v", gerr)
			}
			if res.Changed || !bytes.Equal(after, data) {
				t.Fatalf("refused (%v) but changed the file", gerr)
			}
			return
		}
		onlyGrowFieldsChanged(t, data, after)
		if !bytes.Equal(after[offCryptMethod:offCryptMethod+4], data[offCryptMethod:offCryptMethod+4]) {
			t.Fatal("crypt_method changed")
		}
		size := (newSize + 511) &^ 511
		old := be.Uint64(data[offSize:])
		if res.OldSize != old || res.NewSize != size || size < old || res.Changed != (size != old) {
			t.Fatalf("result %+v for %d over %d", res, newSize, old)
		}
		if !res.Changed && !bytes.Equal(after, data) {
			t.Fatal("unchanged, but the file changed")
		}
		h, err := ParseHeader("fuzz", bytes.NewReader(after), int64(len(after)))
		if err != nil {
			t.Fatalf("the grown image does not parse: %v", err)
		}
		if _, err := VerifyFile(file, want); err != nil || h.Size != size {
			t.Fatalf("grown image: size %d, %v; want size %d", h.Size, err, size)
		}
		if !res.Changed {
			return
		}
		cluster := uint64(1) << be.Uint32(data[offClusterBits:])
		perEntry := cluster * cluster / 8
		if be.Uint32(data[4:]) == 3 && be.Uint64(data[offIncompatibleFeatures:])&IncompatExtendedL2 != 0 {
			perEntry /= 2
		}
		oldL1, newL1 := uint64(be.Uint32(data[offL1Size:])), uint64(be.Uint32(after[offL1Size:]))
		if newL1 > MaxL1Entries || newL1*perEntry < size || (newL1 > oldL1 && (newL1-1)*perEntry >= size) {
			t.Fatalf("l1_size %d for size %d (%d bytes an entry)", newL1, size, perEntry)
		}
		if newL1 > oldL1 {
			l1Off := be.Uint64(data[offL1TableOffset:])
			start, end := l1Off+oldL1*8, l1Off+newL1*8
			if end > uint64(len(data)) || end > (start+cluster-1)/cluster*cluster {
				t.Fatalf("L1 grew to %#x, past the file (%d bytes) or its last cluster", end, len(data))
			}
			if !bytes.Equal(data[start:end], make([]byte, end-start)) {
				t.Fatalf("L1 grew over nonzero bytes at %#x..%#x", start, end)
			}
		}
	})
}

// TestGrowFileCreateOverlaySizes grows empty overlays of every kind
// CreateOverlay writes to the largest size its L1 table has room for, as
// the refusal names it, without QEMU: the arithmetic of l1Clusters and of
// the largest size must agree.
func TestGrowFileCreateOverlaySizes(t *testing.T) {
	for _, size := range []uint64{512, 1 << 20, gib, 4 * tib, 4*tib + 1, 10 * tib, 64 * tib} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			p := newOverlay(t, t.TempDir(), "o.qcow2", OverlayOptions{BackingFile: "base.raw", Size: size})
			clusters := max(1, (l1Entries(size, ClusterBits)*8+ClusterSize-1)/ClusterSize)
			largest := clusters * ClusterSize / 8 * (ClusterSize * ClusterSize / 8)
			_, err := growFile(t, p, growWant, largest+1)
			if !errors.Is(err, ErrGrowNeedsL1Move) || !strings.Contains(err.Error(), fmt.Sprintf("the largest size that fits in place is %d bytes", largest)) {
				t.Fatalf("err = %v, want ErrGrowNeedsL1Move naming %d", err, largest)
			}
			before := readFile(t, p)
			res, err := growFile(t, p, growWant, largest)
			// A table that fills its clusters (64 TiB) has no room at all.
			if err != nil || res.Changed != (largest != (size+511)&^511) || res.NewSize != largest {
				t.Fatalf("%+v, %v", res, err)
			}
			onlyGrowFieldsChanged(t, before, readFile(t, p))
			if h, err := Verify(p, growWant); err != nil || h.Size != largest || uint64(h.L1Size) != clusters*ClusterSize/8 {
				t.Fatalf("%+v, %v", h, err)
			}
		})
	}
}
