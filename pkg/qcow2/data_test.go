package qcow2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestCreateOverlayEmptyUnchanged pins the bytes of empty overlays to
// those the writer made before it learned to write data clusters, so the
// zero value of the new options keeps meaning exactly what it meant.
func TestCreateOverlayEmptyUnchanged(t *testing.T) {
	cases := []struct {
		opts OverlayOptions
		len  int64
		sum  string
	}{
		{OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw, Size: 1 << 20}, 262144, "ad0a270559e2954d6c36c2a62ee51d84044bcf63ac3c7597be03fc4f60203ec9"},
		{OverlayOptions{BackingFile: "base.raw", BackingFormat: FormatRaw, Size: 512<<20 + 1}, 262144, "dbec8a3e9c130e270d676b2d14ece3fc9c253749175ad831e0b5fb700cec237a"},
		{OverlayOptions{BackingFile: "/var/lib/boxlite-csi/x.qcow2", BackingFormat: FormatQcow2, Size: 10 << 30}, 262144, "b5538341d8050022847632e7ccf2fb68e7fecb80fc1131b62a2c11a51acabc24"},
		{OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw, Size: 20 << 30}, 262144, "a1dcb3f4f20a145cb6f7e58a2452e6c3f1971e18843f7c56a2d6d4481aa23de2"},
		{OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw, Size: 64 << 40}, 1245184, "5cb5c5cbcf000b524dec7085929d35f9c24db910ce7f5ddc9a68464e74a3129e"},
		{OverlayOptions{BackingFile: "b", BackingFormat: FormatRaw, Size: MaxVirtualSize}, 33751040, "29dcd31d32e83e7acb2429525f637493d56d0d47c720a7280de25131d58d924c"},
		{OverlayOptions{BackingFile: strings.Repeat("n", 1023), BackingFormat: FormatRaw, Size: 4096}, 262144, "c074b56741f3d2406c9777026117e33497d63e05676769a9d91410f6809a1959"},
		// A Backing without Writes is ignored, as documented.
		{OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw, Size: 1 << 20, Backing: bytes.NewReader([]byte{1}), BackingSize: 1}, 262144, "ad0a270559e2954d6c36c2a62ee51d84044bcf63ac3c7597be03fc4f60203ec9"},
		// So are zero-length writes: they touch no cluster.
		{OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw, Size: 1 << 20, Writes: []Write{{Offset: 4096}}, Backing: bytes.NewReader(nil)}, 262144, "ad0a270559e2954d6c36c2a62ee51d84044bcf63ac3c7597be03fc4f60203ec9"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%d/%d", tc.opts.Size, len(tc.opts.BackingFile)), func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "o.qcow2")
			if err := CreateOverlay(context.Background(), p, tc.opts); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if sum := sha256.Sum256(b); int64(len(b)) != tc.len || hex.EncodeToString(sum[:]) != tc.sum {
				t.Fatalf("empty overlay is %d bytes with sha256 %x, want %d bytes with %s", len(b), sum, tc.len, tc.sum)
			}
			if alloc := allocated(t, p); alloc > 12<<10 {
				t.Fatalf("empty overlay allocates %d bytes, want the three blocks it always did", alloc)
			}
		})
	}
}

// allocated returns the bytes the file at p occupies on disk (st_blocks).
func allocated(t testing.TB, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// randomBytes returns n bytes from a seeded generator, so a failure can be
// reproduced, and random enough that a read falling through to the wrong
// place never compares equal.
func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i < n; i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(b[i:], w[:])
	}
	return b
}

// block is a 4 KiB write at offset off with random (never all zero) data.
func block(off uint64) Write {
	d := randomBytes(off+1, sparseBlock)
	d[0] |= 1
	return Write{Offset: off, Data: d}
}

// expectedGuest returns what the guest must read at [off, off+n) of a
// disk of virtual size size over backing with writes applied in order:
// the slow, obvious model the overlay is checked against.
func expectedGuest(backing []byte, size uint64, writes []Write, off uint64, n int) []byte {
	out := make([]byte, n)
	if off < uint64(len(backing)) {
		copy(out, backing[off:])
	}
	for i := range out {
		if off+uint64(i) >= size {
			out[i] = 0
		}
	}
	end := off + uint64(n)
	for _, w := range writes {
		lo, hi := max(w.Offset, off), min(w.Offset+uint64(len(w.Data)), end)
		if lo < hi {
			copy(out[lo-off:hi-off], w.Data[lo-w.Offset:])
		}
	}
	return out
}

// overlayMap is what checkOverlay learned by walking an overlay.
type overlayMap struct {
	h *Header
	// host maps each allocated guest cluster to its offset in the file.
	host map[uint64]uint64
}

// checkOverlay re-derives without QEMU the invariants qemu-img check
// enforces on the writer's layout, for any number of refcount blocks, L2
// tables and data clusters: every structure is cluster-aligned, inside
// the file and in a cluster of its own; every cluster of the file is in
// use with refcount exactly 1, and every refcount past the file is 0; and
// every L1 and L2 entry has the COPIED flag and no reserved bit. The
// header must read back with ReadHeaderFile.
func checkOverlay(t testing.TB, path string) *overlayMap {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := ReadHeaderFile(f)
	if err != nil {
		t.Fatalf("the package's reader refuses the overlay: %v", err)
	}
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	size := uint64(fi.Size())
	if size%ClusterSize != 0 || h.ClusterBits != ClusterBits || h.RefcountOrder != 4 {
		t.Fatalf("file of %d bytes, cluster_bits %d, refcount_order %d", size, h.ClusterBits, h.RefcountOrder)
	}
	clusters := size / ClusterSize
	read := func(off, n uint64) []byte {
		t.Helper()
		if off%ClusterSize != 0 || off == 0 || off+n > size || off+n < off {
			t.Fatalf("structure of %d bytes at %#x is unaligned or outside the %d-byte file", n, off, size)
		}
		b := make([]byte, n)
		if _, err := f.ReadAt(b, int64(off)); err != nil {
			t.Fatal(err)
		}
		return b
	}
	used := map[uint64]string{0: "header"}
	claim := func(off, n uint64, what string) {
		t.Helper()
		for c := off / ClusterSize; c < (off+n+ClusterSize-1)/ClusterSize; c++ {
			if prev, ok := used[c]; ok {
				t.Fatalf("cluster %d holds both %s and %s", c, prev, what)
			}
			used[c] = what
		}
	}
	const offsetMask = 0x00ff_ffff_ffff_fe00
	entry := func(e uint64, what string) uint64 {
		t.Helper()
		if e&^(offsetMask|copiedFlag) != 0 || e&copiedFlag == 0 {
			t.Fatalf("%s entry %#x has reserved bits set or lacks the COPIED flag", what, e)
		}
		return e & offsetMask
	}
	be := binary.BigEndian

	rt := read(h.RefcountTableOffset, uint64(h.RefcountTableClusters)*ClusterSize)
	claim(h.RefcountTableOffset, uint64(len(rt)), "refcount table")
	var blocks []uint64
	for i := 0; i < len(rt); i += 8 {
		if e := be.Uint64(rt[i:]); e != 0 {
			if e%ClusterSize != 0 {
				t.Fatalf("refcount table entry %d is %#x", i/8, e)
			}
			claim(e, ClusterSize, "refcount block")
			blocks = append(blocks, e)
		} else {
			blocks = append(blocks, 0)
		}
	}
	l1Len := uint64(h.L1Size) * l1EntrySize
	l1 := read(h.L1TableOffset, l1Len)
	claim(h.L1TableOffset, l1Len, "L1 table")
	m := &overlayMap{h: h, host: map[uint64]uint64{}}
	for i := 0; i < len(l1); i += 8 {
		e := be.Uint64(l1[i:])
		if e == 0 {
			continue
		}
		l2Off := entry(e, fmt.Sprintf("L1[%d]", i/8))
		l2 := read(l2Off, ClusterSize)
		claim(l2Off, ClusterSize, "L2 table")
		for j := 0; j < len(l2); j += 8 {
			e := be.Uint64(l2[j:])
			if e == 0 {
				continue
			}
			guest := uint64(i/8)*l2Entries + uint64(j/8)
			d := entry(e, fmt.Sprintf("L2 entry of guest cluster %d", guest))
			if guest*ClusterSize >= h.Size {
				t.Fatalf("guest cluster %d past the virtual size %d is mapped", guest, h.Size)
			}
			if d+ClusterSize > size {
				t.Fatalf("guest cluster %d is mapped at %#x, past the end of the %d-byte file", guest, d, size)
			}
			claim(d, ClusterSize, fmt.Sprintf("data of guest cluster %d", guest))
			m.host[guest] = d
		}
	}
	// Refcounts: 1 for every cluster in use, 0 for every other, in the
	// file or past it. A cluster in the file that nothing uses is a leak.
	covered := uint64(0)
	for i, b := range blocks {
		if b == 0 {
			continue
		}
		rb := read(b, ClusterSize)
		for k := uint64(0); k < refcountsPerBlock; k++ {
			c := uint64(i)*refcountsPerBlock + k
			_, inUse := used[c]
			if rc := be.Uint16(rb[2*k:]); inUse && rc != 1 || !inUse && rc != 0 {
				t.Fatalf("cluster %d: refcount %d, in use %v", c, rc, inUse)
			}
			if inUse {
				covered++
			}
		}
	}
	if uint64(len(used)) != clusters || covered != clusters {
		t.Fatalf("the file has %d clusters, %d are in use and %d have a refcount", clusters, len(used), covered)
	}
	return m
}

// checkGuest reads back, through the overlay's own L1 and L2 tables,
// every guest cluster the writes touch and compares it with the model; and
// it checks that nothing else is mapped, so every other read falls through
// to the backing.
func checkGuest(t testing.TB, path string, m *overlayMap, backing []byte, writes []Write) {
	t.Helper()
	touched := map[uint64]bool{}
	for _, w := range writes {
		for c := w.Offset / ClusterSize; len(w.Data) > 0 && c <= (w.Offset+uint64(len(w.Data))-1)/ClusterSize; c++ {
			touched[c] = true
		}
	}
	if len(m.host) != len(touched) {
		t.Fatalf("%d guest clusters are mapped, and the writes touch %d", len(m.host), len(touched))
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, ClusterSize)
	for c := range touched {
		host, ok := m.host[c]
		if !ok {
			t.Fatalf("guest cluster %d was written but is not mapped", c)
		}
		if _, err := f.ReadAt(got, int64(host)); err != nil {
			t.Fatal(err)
		}
		want := expectedGuest(backing, m.h.Size, writes, c*ClusterSize, ClusterSize)
		if !bytes.Equal(got, want) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			t.Fatalf("guest byte %d reads %#x from the overlay, want %#x", c*ClusterSize+uint64(i), got[i], want[i])
		}
	}
}

// makeBacking writes backing to p as a raw file.
func makeBacking(t testing.TB, p string, backing []byte) {
	t.Helper()
	if err := os.WriteFile(p, backing, 0o644); err != nil {
		t.Fatal(err)
	}
}

// makeExpected writes the raw image a guest should see: the backing cut
// or extended to size, with the writes applied in order.
func makeExpected(t testing.TB, p string, backing []byte, size uint64, writes []Write) {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(backing[:min(uint64(len(backing)), size)]); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	for _, w := range writes {
		if _, err := f.WriteAt(w.Data, int64(w.Offset)); err != nil {
			t.Fatal(err)
		}
	}
}

// writeSets are the shapes of write lists every size is tested with.
// Each returns the writes for a disk of virtual size size over a backing
// of backingLen bytes.
var writeSets = []struct {
	name   string
	writes func(size, backingLen uint64) []Write
}{
	{"start", func(_, _ uint64) []Write { return []Write{block(0), block(4096)} }},
	{"end", func(size, _ uint64) []Write { return []Write{block(size - 4096)} }},
	{"across a cluster boundary", func(_, _ uint64) []Write {
		w := block(0)
		w.Offset = 3*ClusterSize - 2048
		return []Write{w}
	}},
	{"across the end of the backing", func(_, bl uint64) []Write {
		return []Write{{Offset: bl - 1000, Data: randomBytes(7, 3000)}}
	}},
	{"in different L2 ranges", func(size, _ uint64) []Write {
		// An L2 table maps 512 MiB: these fall under separate L1 entries.
		return []Write{block(8192), block(600 << 20), block(size/2 + 12288), block(size - 512<<20 - 8192)}
	}},
	{"unaligned and odd lengths", func(size, _ uint64) []Write {
		return []Write{
			{Offset: 1, Data: randomBytes(1, 1)},
			{Offset: 70000, Data: randomBytes(2, 100000)},
			{Offset: size - 3, Data: randomBytes(3, 3)},
		}
	}},
	{"overlapping: the later wins", func(_, _ uint64) []Write {
		return []Write{
			{Offset: 0, Data: randomBytes(4, 3*sparseBlock)},
			{Offset: 2048, Data: randomBytes(5, 4096)},
			{Offset: 4096, Data: make([]byte, 4096)},
		}
	}},
	{"zeros inside the backing still replace it", func(_, _ uint64) []Write {
		return []Write{{Offset: 8192, Data: make([]byte, 4096)}, {Offset: 5 * ClusterSize, Data: make([]byte, ClusterSize)}}
	}},
	{"a write of several whole clusters", func(_, _ uint64) []Write {
		return []Write{{Offset: 10 * ClusterSize, Data: randomBytes(6, 3*ClusterSize)}}
	}},
}

// TestCreateOverlayWritesQemu: overlays holding writes are clean for
// qemu-img check and read, through QEMU, exactly as the backing with the
// writes applied.
func TestCreateOverlayWritesQemu(t *testing.T) {
	qemuImg := needQemu(t, "qemu-img")
	const backingLen = 3<<20 + 12345 // smaller than every size, and not cluster-aligned
	backing := randomBytes(42, backingLen)
	for _, size := range []uint64{1 << 30, 20 << 30, 100 << 30} {
		for _, ws := range writeSets {
			t.Run(fmt.Sprintf("%dGiB/%s", size>>30, ws.name), func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				makeBacking(t, filepath.Join(dir, "base.raw"), backing)
				writes := ws.writes(size, backingLen)
				overlay := filepath.Join(dir, "o.qcow2")
				if err := CreateOverlay(context.Background(), overlay, OverlayOptions{
					BackingFile: "base.raw", BackingFormat: FormatRaw, Size: size, NoSync: true,
					Writes: writes, Backing: bytes.NewReader(backing), BackingSize: backingLen,
				}); err != nil {
					t.Fatal(err)
				}
				assertDirHolds(t, dir, "base.raw", "o.qcow2")
				checkGuest(t, overlay, checkOverlay(t, overlay), backing, writes)
				if out := run(t, qemuImg, "check", "-f", "qcow2", overlay); !strings.Contains(out, "No errors were found") {
					t.Fatalf("qemu-img check: %s", out)
				}
				expected := filepath.Join(dir, "expected.raw")
				makeExpected(t, expected, backing, size, writes)
				if out := run(t, qemuImg, "compare", "-f", "qcow2", "-F", "raw", overlay, expected); !strings.Contains(out, "Images are identical") {
					t.Fatalf("qemu-img compare: %s", out)
				}
			})
		}
	}
}

// TestCreateOverlayWritesManyClusters spans more clusters than one
// refcount block covers (32768, a 2 GiB file), so the refcounts run on
// into a second block. The writes are of zeros, which allocate clusters
// without costing disk space.
func TestCreateOverlayWritesManyClusters(t *testing.T) {
	qemuImg := needQemu(t, "qemu-img")
	dir := t.TempDir()
	backing := randomBytes(9, ClusterSize+100)
	makeBacking(t, filepath.Join(dir, "base.raw"), backing)
	const n = refcountsPerBlock + 100
	var writes []Write
	one := []byte{0}
	for c := range uint64(n) {
		writes = append(writes, Write{Offset: c*ClusterSize + c%ClusterSize, Data: one})
	}
	writes = append(writes, block(4096))
	size := uint64(n+10) * ClusterSize
	overlay := filepath.Join(dir, "o.qcow2")
	if err := CreateOverlay(context.Background(), overlay, OverlayOptions{
		BackingFile: "base.raw", BackingFormat: FormatRaw, Size: size, NoSync: true,
		Writes: writes, Backing: bytes.NewReader(backing), BackingSize: int64(len(backing)),
	}); err != nil {
		t.Fatal(err)
	}
	h, err := ReadHeader(overlay)
	if err != nil {
		t.Fatal(err)
	}
	if rb := binary.BigEndian.Uint64(readAt(t, overlay, int64(h.RefcountTableOffset)+8, 8)); rb == 0 {
		t.Fatal("a file of more than 32768 clusters has no second refcount block")
	}
	m := checkOverlay(t, overlay)
	if len(m.host) != n {
		t.Fatalf("%d clusters mapped, want %d", len(m.host), n)
	}
	if alloc := allocated(t, overlay); alloc > 1<<20 {
		t.Fatalf("clusters of zeros allocate %d bytes on disk", alloc)
	}
	if out := run(t, qemuImg, "check", "-f", "qcow2", overlay); !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check: %s", out)
	}
	// Comparing all 2 GiB takes seconds; the contents of such clusters are
	// compared in full by TestCreateOverlayWritesQemu. Here QEMU reads back
	// a cluster from each refcount block's range, and one past the writes.
	qemuIO := needQemu(t, "qemu-io")
	run(t, qemuIO, "-f", "qcow2", "-c", fmt.Sprintf("read -P 0 %d %d", (n-1)*ClusterSize, ClusterSize), overlay)
	run(t, qemuIO, "-f", "qcow2", "-c", fmt.Sprintf("read -P 0 %d %d", (n+5)*ClusterSize, ClusterSize), overlay)
	out := run(t, qemuIO, "-f", "qcow2", "-c", "read -v 0 16", "-c", fmt.Sprintf("read -v %d 16", ClusterSize), overlay)
	for _, want := range []string{hexBytes(expectedGuest(backing, size, writes, 0, 16)), hexBytes(expectedGuest(backing, size, writes, ClusterSize, 16))} {
		if !strings.Contains(out, want) {
			t.Fatalf("qemu-io read lacks %s:\n%s", want, out)
		}
	}
}

func readAt(t testing.TB, p string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRefcountClusters(t *testing.T) {
	cases := []struct{ other, rt, rb uint64 }{
		{4, 1, 1},                     // an empty overlay
		{refcountsPerBlock - 2, 1, 1}, // exactly full
		{refcountsPerBlock - 1, 1, 2}, // one more needs a block, which needs a refcount
		{refcountTableEntries*refcountsPerBlock - refcountTableEntries - 1, 1, refcountTableEntries},
		{refcountTableEntries*refcountsPerBlock - refcountTableEntries, 2, refcountTableEntries + 1},
	}
	for _, tc := range cases {
		rt, rb := refcountClusters(tc.other)
		if rt != tc.rt || rb != tc.rb {
			t.Errorf("refcountClusters(%d) = %d, %d; want %d, %d", tc.other, rt, rb, tc.rt, tc.rb)
		}
		if n := tc.other + rt + rb; rb*refcountsPerBlock < n || rt*refcountTableEntries < rb {
			t.Errorf("refcountClusters(%d) = %d, %d does not cover %d clusters", tc.other, rt, rb, n)
		}
	}
}

// extGrowWrites models the blocks that growing a small base's ext4 to size
// writes: in group 0 the superblock's block, two descriptor blocks and a
// block bitmap, and in every group with a superblock backup (sparse_super:
// groups 1 and the powers of 3, 5 and 7) the backup's block followed by
// descPerGroup descriptor blocks. Groups are 128 MiB.
func extGrowWrites(size uint64, descPerGroup int) []Write {
	const group = 128 << 20
	writes := []Write{block(0), block(4096), block(8192), block(40960)}
	groups := size / group
	seen := map[uint64]bool{}
	for _, p := range []uint64{3, 5, 7} {
		for g := uint64(1); g < groups; g *= p {
			if !seen[g] {
				seen[g] = true
				for i := range uint64(descPerGroup + 1) {
					writes = append(writes, block(g*group+i*sparseBlock))
				}
			}
		}
	}
	return writes
}

// TestCreateOverlayWritesAllocation bounds how much disk a grown overlay
// occupies, the budget the root filesystem growth feature checks: 256 KiB
// at 20 GiB with about 30 blocks written, 2 MiB at 100 GiB with about 200.
// The base is random, so the backing's part of each cluster written inside
// it costs its full 64 KiB; past the base only the written blocks do.
func TestCreateOverlayWritesAllocation(t *testing.T) {
	const baseLen = 64 << 20
	backing := randomBytes(1, baseLen)
	cases := []struct {
		size         uint64
		descPerGroup int
		minWrites    int
		maxAlloc     int64
	}{
		{20 << 30, 2, 30, 256 << 10},
		{100 << 30, 13, 200, 2 << 20},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%dGiB", tc.size>>30), func(t *testing.T) {
			writes := extGrowWrites(tc.size, tc.descPerGroup)
			if len(writes) < tc.minWrites {
				t.Fatalf("the model writes %d blocks, want at least %d", len(writes), tc.minWrites)
			}
			dir := t.TempDir()
			overlay := filepath.Join(dir, "o.qcow2")
			if err := CreateOverlay(context.Background(), overlay, OverlayOptions{
				BackingFile: "base.raw", BackingFormat: FormatRaw, Size: tc.size,
				Writes: writes, Backing: bytes.NewReader(backing), BackingSize: baseLen,
			}); err != nil {
				t.Fatal(err)
			}
			m := checkOverlay(t, overlay)
			checkGuest(t, overlay, m, backing, writes)
			alloc := allocated(t, overlay)
			t.Logf("%d GiB, %d blocks written into %d clusters: st_blocks %d (%d KiB)", tc.size>>30, len(writes), len(m.host), alloc/512, alloc>>10)
			if alloc > tc.maxAlloc {
				t.Fatalf("overlay allocates %d KiB, want at most %d KiB", alloc>>10, tc.maxAlloc>>10)
			}
		})
	}
}

// TestCreateOverlayWritesReadBack: the rest of the package accepts an
// overlay holding writes: the header reader, Verify, the chain walk; and
// ProbeL1 says it may hold data, as it holds the writes.
func TestCreateOverlayWritesReadBack(t *testing.T) {
	dir := t.TempDir()
	backing := randomBytes(3, 1<<20)
	makeBacking(t, filepath.Join(dir, "base.raw"), backing)
	want := Expect{BackingFile: "base.raw", BackingFormat: FormatRaw}
	p := newOverlay(t, dir, "o.qcow2", OverlayOptions{
		BackingFile: want.BackingFile, Size: 20 << 30,
		Writes: []Write{block(4096), block(19 << 30)}, Backing: bytes.NewReader(backing), BackingSize: 1 << 20,
	})
	if _, err := Verify(p, want); err != nil {
		t.Fatal(err)
	}
	chain, err := Chain(context.Background(), p)
	if err != nil || len(chain) != 2 || chain[1].Format != FormatRaw {
		t.Fatalf("Chain = %+v, %v", chain, err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	probe, err := ProbeL1File(f)
	if err != nil || probe.Empty || !strings.Contains(probe.Reason, "L1 entry 0") {
		t.Fatalf("ProbeL1 = %+v, %v; want not Empty, because of L1 entry 0", probe, err)
	}
}

// cancellingReader cancels a context on its first read, so the writer
// meets the cancellation in the middle of writing.
type cancellingReader struct {
	r      io.ReaderAt
	cancel func()
}

func (r cancellingReader) ReadAt(b []byte, off int64) (int, error) {
	r.cancel()
	return r.r.ReadAt(b, off)
}

// TestCreateOverlayWritesRefused: bad writes are refused before anything
// is created, and a backing that cannot be read, or a cancellation in the
// middle of writing, leaves nothing behind either.
func TestCreateOverlayWritesRefused(t *testing.T) {
	backing := randomBytes(5, 1<<20)
	base := OverlayOptions{BackingFile: "base.raw", BackingFormat: FormatRaw, Size: 1 << 30,
		Backing: bytes.NewReader(backing), BackingSize: 1 << 20}
	with := func(edit func(o *OverlayOptions)) OverlayOptions {
		o := base
		edit(&o)
		return o
	}
	invalid := []struct {
		name string
		opts OverlayOptions
		want string
	}{
		{"write past the end", with(func(o *OverlayOptions) { o.Writes = []Write{block(1<<30 - 4095)} }), "write 0 (4096 bytes at offset 1073737729) ends past the virtual size 1073741824"},
		{"write at an offset past the end", with(func(o *OverlayOptions) { o.Writes = []Write{block(0), {Offset: 1<<30 + 1}} }), "write 1 (0 bytes at offset 1073741825)"},
		{"write whose end wraps around", with(func(o *OverlayOptions) { o.Writes = []Write{{Offset: ^uint64(0) - 10, Data: make([]byte, 20)}} }), "ends past"},
		{"write in the 512-byte rounding of Size", with(func(o *OverlayOptions) {
			o.Size = 1<<20 + 1
			o.Writes = []Write{{Offset: 1 << 20, Data: []byte{1, 2}}}
		}), "ends past the virtual size 1048577"},
		{"writes without a backing", with(func(o *OverlayOptions) { o.Writes = []Write{block(0)}; o.Backing = nil }), "no Backing"},
		{"negative backing size", with(func(o *OverlayOptions) { o.BackingSize = -1 }), "negative"},
	}
	for _, tc := range invalid {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "o.qcow2")
			err := CreateOverlay(context.Background(), p, tc.opts)
			if !errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
				t.Fatalf("err = %v, want ErrInvalidOption mentioning %q and the path", err, tc.want)
			}
			assertDirHolds(t, dir)
		})
	}

	failed := []struct {
		name  string
		opts  func(cancel func()) OverlayOptions
		want  error
		wants string
	}{
		{"backing read fails", func(func()) OverlayOptions {
			return with(func(o *OverlayOptions) { o.Writes = []Write{block(0)}; o.Backing = failingReader{} })
		}, syscall.EIO, "read 61440 backing bytes at 4096"},
		{"backing shorter than BackingSize", func(func()) OverlayOptions {
			return with(func(o *OverlayOptions) { o.BackingSize = 2 << 20; o.Writes = []Write{block(1<<20 + 8192)} })
		}, io.ErrUnexpectedEOF, "shorter than its stated size"},
		{"cancelled while writing", func(cancel func()) OverlayOptions {
			return with(func(o *OverlayOptions) {
				o.Writes = []Write{block(0), block(1 << 29)}
				o.Backing = cancellingReader{bytes.NewReader(backing), cancel}
			})
		}, context.Canceled, "write the new file"},
	}
	for _, tc := range failed {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "o.qcow2")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			err := CreateOverlay(ctx, p, tc.opts(cancel))
			if !errors.Is(err, tc.want) || errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), tc.wants) || !strings.Contains(err.Error(), p) {
				t.Fatalf("err = %v, want one wrapping %v, mentioning %q and the path", err, tc.want, tc.wants)
			}
			assertDirHolds(t, dir)
		})
	}
}

// TestCreateOverlayWritesReadOnlyTouched: the backing is read only for the
// clusters the writes touch, and not at all for the parts the writes
// cover or that lie past BackingSize.
func TestCreateOverlayWritesReadOnlyTouched(t *testing.T) {
	backing := randomBytes(8, 4<<20)
	cases := []struct {
		name   string
		writes []Write
		want   []string // the reads, as "offset+length"
	}{
		{"a block in the middle of a cluster", []Write{block(ClusterSize + 8192)}, []string{"65536+65536"}},
		{"the whole cluster", []Write{{Offset: 2 * ClusterSize, Data: randomBytes(1, ClusterSize)}}, nil},
		{"the cluster in pieces, out of order", []Write{
			{Offset: 2*ClusterSize + 4096, Data: randomBytes(1, ClusterSize-4096)},
			{Offset: 2 * ClusterSize, Data: randomBytes(2, 4096)},
		}, nil},
		{"past BackingSize", []Write{block(5 << 20)}, nil},
		{"straddling BackingSize", []Write{block(4<<20 - 4096)}, []string{"4128768+61440"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := &recordingReader{r: bytes.NewReader(backing)}
			p := filepath.Join(t.TempDir(), "o.qcow2")
			if err := CreateOverlay(context.Background(), p, OverlayOptions{
				BackingFile: "base.raw", BackingFormat: FormatRaw, Size: 1 << 30, NoSync: true,
				Writes: tc.writes, Backing: r, BackingSize: int64(len(backing)),
			}); err != nil {
				t.Fatal(err)
			}
			if strings.Join(r.reads, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("reads %v, want %v", r.reads, tc.want)
			}
			checkGuest(t, p, checkOverlay(t, p), backing, tc.writes)
		})
	}
}

type recordingReader struct {
	r     io.ReaderAt
	reads []string
}

func (r *recordingReader) ReadAt(b []byte, off int64) (int, error) {
	r.reads = append(r.reads, fmt.Sprintf("%d+%d", off, len(b)))
	return r.r.ReadAt(b, off)
}

// TestCreateOverlayWritesMaxSize: writes at both ends of the largest disk
// QEMU opens, whose L1 table fills 512 clusters.
func TestCreateOverlayWritesMaxSize(t *testing.T) {
	backing := randomBytes(11, 1<<20)
	writes := []Write{block(0), block(MaxVirtualSize - 4096), block(MaxVirtualSize / 3 &^ 4095)}
	p := filepath.Join(t.TempDir(), "o.qcow2")
	if err := CreateOverlay(context.Background(), p, OverlayOptions{
		BackingFile: "base.raw", BackingFormat: FormatRaw, Size: MaxVirtualSize, NoSync: true,
		Writes: writes, Backing: bytes.NewReader(backing), BackingSize: int64(len(backing)),
	}); err != nil {
		t.Fatal(err)
	}
	checkGuest(t, p, checkOverlay(t, p), backing, writes)
	if alloc := allocated(t, p); alloc > 256<<10 {
		t.Fatalf("overlay allocates %d KiB", alloc>>10)
	}
}
