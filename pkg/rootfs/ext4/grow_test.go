package ext4

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

const gib = 1 << 30

// growLayer is the small synthetic image the growth tests grow: files,
// directories, symlinks short and long, a hard link, xattrs and a file of
// a few MiB.
func growLayer() []tentry {
	return []tentry{
		dirE("./", 0o755),
		dirE("etc", 0o755),
		fileE("etc/hostname", 0o644, []byte("box\n")),
		fileE("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n")).with(withXattrs("user.k", "v")),
		dirE("usr/bin", 0o755),
		fileE("usr/bin/tool", 0o755, []byte("#!/bin/sh\necho tool\n")),
		linkE("usr/bin/tool2", "usr/bin/tool"),
		symlinkE("bin", "usr/bin"),
		symlinkE("long", strings.Repeat("a-long-target/", 8)+"end"),
		genFileE("data/blob", 3<<20, randomContent(11, 3<<20)),
		dirE("home/user", 0o700).with(owner(1000, 1000)),
		fileE("home/user/notes", 0o600, []byte("notes")).with(owner(1000, 1000)),
	}
}

// growWants is what a mounted image of growLayer holds.
func growWants(opts Options) map[string]want {
	implicit := want{typ: syscall.S_IFDIR, perm: 0o755, mtime: opts.Time}
	w := map[string]want{"lost+found": {typ: syscall.S_IFDIR, perm: 0o700, mtime: opts.Time}}
	for _, e := range growLayer() {
		w[path.Clean(e.hdr.Name)] = wantOf(e)
	}
	for _, d := range []string{"usr", "data", "home"} {
		w[d] = implicit
	}
	tool := w["usr/bin/tool"]
	tool.nlink = 2
	w["usr/bin/tool"], w["usr/bin/tool2"] = tool, tool
	return w
}

// growBase is one base the growth tests start from.
type growBase struct {
	name string
	opts Options
}

func growBases() []growBase {
	tm := time.Unix(1720000000, 0)
	return []growBase{
		// The smallest base: one partial group.
		{"tiny", Options{Time: tm, UUID: [16]byte{7}}},
		// The plugin's defaults (pkg/rootfs) for a small image: two whole
		// groups, with a backup in group 1.
		{"default", Options{Time: tm, Headroom: 64 << 20, HeadroomRatio: 0.1, MinSize: 256 << 20}},
		// Three groups, the last partial, with a backup in group 1.
		{"partial", Options{Time: tm, Headroom: 16 << 20, MinSize: 300 << 20}},
	}
}

// copySparse copies the file src to a new file in dir, leaving its holes
// and its all-zero blocks as holes, as the base looks through a fresh
// overlay.
func copySparse(t testing.TB, src, dir string) string {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "disk.raw")
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	const seekData, seekHole = 3, 4 // SEEK_DATA, SEEK_HOLE
	buf := make([]byte, blockSize)
	for off := int64(0); off < fi.Size(); {
		data, err := in.Seek(off, seekData)
		if err != nil {
			break // ENXIO: only a hole is left
		}
		hole, err := in.Seek(data, seekHole)
		if err != nil {
			t.Fatal(err)
		}
		for ; data < hole; data += blockSize {
			n, err := in.ReadAt(buf, data)
			if n < len(buf) && err != io.EOF {
				t.Fatal(err)
			}
			if !isZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], data); err != nil {
					t.Fatal(err)
				}
			}
		}
		off = hole
	}
	if err := out.Truncate(fi.Size()); err != nil {
		t.Fatal(err)
	}
	return dst
}

// planFor plans growth of the base image file img to newSize.
func planFor(t testing.TB, img string, newSize uint64) GrowPlan {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	p, err := PlanGrow(f, fi.Size(), newSize)
	if err != nil {
		t.Fatalf("PlanGrow(%d): %v", newSize, err)
	}
	return p
}

// grownDisk copies the base img to a sparse file, applies the plan for
// newSize and gives the file newSize bytes: what the guest sees through a
// box's overlay.
func grownDisk(t testing.TB, img string, newSize uint64) (string, GrowPlan) {
	t.Helper()
	p := planFor(t, img, newSize)
	disk := copySparse(t, img, t.TempDir())
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := p.Apply(f); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(newSize)); err != nil {
		t.Fatal(err)
	}
	return disk, p
}

// checkPlanShape checks what the GrowPlan documents of its writes, for a
// base of baseSize bytes.
func checkPlanShape(t testing.TB, p GrowPlan, baseSize uint64) {
	t.Helper()
	var prev uint64
	for i, w := range p.Writes {
		switch {
		case w.Offset%GrowBlockSize != 0 || len(w.Data) != GrowBlockSize:
			t.Errorf("write %d: %d bytes at %d, want one aligned block", i, len(w.Data), w.Offset)
		case i > 0 && w.Offset <= prev:
			t.Errorf("write %d at %d follows one at %d: not sorted or a duplicate", i, w.Offset, prev)
		case w.Offset+GrowBlockSize > p.Size:
			t.Errorf("write %d at %d is past the grown size %d", i, w.Offset, p.Size)
		case w.Offset >= baseSize && isZero(w.Data):
			t.Errorf("write %d at %d, past the base, is all zeros", i, w.Offset)
		}
		prev = w.Offset
	}
	if p.Size != p.Blocks*blockSize || p.FreeBlocks > p.Blocks || p.FreeInodes > p.Inodes {
		t.Errorf("inconsistent counts: %+v", p.counts())
	}
}

func (p GrowPlan) counts() string {
	return fmt.Sprintf("size %d, blocks %d (%d free), inodes %d (%d free), %d writes",
		p.Size, p.Blocks, p.FreeBlocks, p.Inodes, p.FreeInodes, len(p.Writes))
}

// clusters counts the distinct 64 KiB overlay clusters the writes touch.
func (p GrowPlan) clusters() int {
	seen := map[uint64]bool{}
	for _, w := range p.Writes {
		seen[w.Offset>>16] = true
	}
	return len(seen)
}

// dumpe2fsGroups is what the full dumpe2fs listing says of each group: where
// its superblock and descriptor copies are, and its block bitmap.
type dumpGroup struct {
	flags       string
	super       int64 // -1: none
	primary     bool
	descFirst   int64 // -1: none
	descLast    int64
	blockBitmap int64
}

var (
	reGroup  = regexp.MustCompile(`^Group (\d+): \(Blocks (\d+)-(\d+)\)(?: csum 0x[0-9a-f]+)?(?: \[(.*)\])?`)
	reSuper  = regexp.MustCompile(`^\s+(Primary|Backup) superblock at (\d+)`)
	reDescs  = regexp.MustCompile(`[Gg]roup descriptors? at (\d+)(?:-(\d+))?`)
	reBitmap = regexp.MustCompile(`^\s+Block bitmap at (\d+)`)
)

func dumpe2fsGroups(t testing.TB, img string) []dumpGroup {
	t.Helper()
	out, err := exec.Command(needTool(t, "dumpe2fs"), img).Output()
	if err != nil {
		t.Fatalf("dumpe2fs: %v", err)
	}
	var gs []dumpGroup
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if m := reGroup.FindStringSubmatch(line); m != nil {
			if n, _ := strconv.Atoi(m[1]); n != len(gs) {
				t.Fatalf("dumpe2fs lists group %d after %d groups", n, len(gs))
			}
			gs = append(gs, dumpGroup{flags: m[4], super: -1, descFirst: -1, descLast: -1, blockBitmap: -1})
			continue
		}
		if len(gs) == 0 {
			continue
		}
		g := &gs[len(gs)-1]
		if m := reSuper.FindStringSubmatch(line); m != nil {
			g.primary = m[1] == "Primary"
			g.super, _ = strconv.ParseInt(m[2], 10, 64)
		}
		if m := reDescs.FindStringSubmatch(line); m != nil {
			g.descFirst, _ = strconv.ParseInt(m[1], 10, 64)
			g.descLast = g.descFirst
			if m[2] != "" {
				g.descLast, _ = strconv.ParseInt(m[2], 10, 64)
			}
		}
		if m := reBitmap.FindStringSubmatch(line); m != nil {
			g.blockBitmap, _ = strconv.ParseInt(m[1], 10, 64)
		}
	}
	return gs
}

func readBlockAt(t testing.TB, f *os.File, blk int64) []byte {
	t.Helper()
	b := make([]byte, blockSize)
	if _, err := f.ReadAt(b, blk*blockSize); err != nil {
		t.Fatalf("reading block %d: %v", blk, err)
	}
	return b
}

// checkCopies checks every superblock and descriptor copy that e2fsprogs
// lists against the primary ones, which e2fsck checks: the backups are
// what e2fsck -b and the kernel fall back on. It also checks that the plan
// wrote nothing but such copies and the block bitmaps of the last base
// group and the last group.
func checkCopies(t *testing.T, disk string, p GrowPlan, baseGroups int) {
	gs := dumpe2fsGroups(t, disk)
	if want := ceilDiv(p.Blocks, blocksPerGroup); uint64(len(gs)) != want {
		t.Fatalf("dumpe2fs lists %d groups, want %d", len(gs), want)
	}
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The last base group's bitmap changes, and the last group's is
	// written when it is new.
	expected := map[uint64]bool{
		uint64(gs[baseGroups-1].blockBitmap) * blockSize: true,
		uint64(gs[len(gs)-1].blockBitmap) * blockSize:    true,
	}
	primarySB := readBlockAt(t, f, 0)[superblockOffset : superblockOffset+superblockSize]
	primaryDesc := map[int64][]byte{} // descriptor block index to its primary copy
	for grp, g := range gs {
		if g.super >= 0 {
			expected[uint64(g.super)*blockSize] = true
			if g.super != int64(grp)*blocksPerGroup {
				t.Errorf("group %d: superblock at %d", grp, g.super)
			}
			if !g.primary {
				sb := readBlockAt(t, f, g.super)[:superblockSize]
				if got := binary.LittleEndian.Uint16(sb[sBlockGroupNr:]); got != uint16(grp) {
					t.Errorf("group %d: backup superblock says group %d", grp, got)
				}
				want := bytes.Clone(primarySB)
				copy(want[sBlockGroupNr:], sb[sBlockGroupNr:sBlockGroupNr+2])
				copy(want[sChecksum:], sb[sChecksum:])
				if !bytes.Equal(sb, want) {
					t.Errorf("group %d: backup superblock differs from the primary beyond its group number", grp)
				}
				var uuid [16]byte
				copy(uuid[:], sb[sUUID:])
				if c := newChecksummer(uuid); binary.LittleEndian.Uint32(sb[sChecksum:]) != c.sum(^uint32(0), sb[:sChecksum]) {
					t.Errorf("group %d: backup superblock checksum wrong", grp)
				}
			}
		}
		if g.descFirst < 0 {
			continue
		}
		for blk := g.descFirst; blk <= g.descLast; blk++ {
			expected[uint64(blk)*blockSize] = true
			// Classic copies hold table blocks 0.. in order; a meta_bg
			// copy holds its own meta-group's block.
			idx := blk - g.descFirst
			if grp >= int(ceilDiv(uint64(baseGroups), descsPerBlock))*descsPerBlock {
				idx = int64(grp / descsPerBlock)
			}
			data := readBlockAt(t, f, blk)
			if prim, ok := primaryDesc[idx]; !ok {
				primaryDesc[idx] = data
			} else if !bytes.Equal(prim, data) {
				t.Errorf("group %d: descriptor block %d (table block %d) differs from its first copy", grp, blk, idx)
			}
		}
	}
	for _, w := range p.Writes {
		if !expected[w.Offset] {
			t.Errorf("the plan writes block %d, which dumpe2fs lists as neither superblock nor descriptor copy nor a last group's bitmap", w.Offset/blockSize)
		}
	}
}

func TestGrow(t *testing.T) {
	type size struct {
		name string
		size func(base uint64) uint64
	}
	fixed := func(n uint64) func(uint64) uint64 { return func(uint64) uint64 { return n } }
	sizes := []size{
		// Inside the base's last group, or one short new group.
		{"base+64MiB", func(b uint64) uint64 { return b + 64<<20 }},
		{"1GiB", fixed(1 * gib)},
		// A last group of 1 MiB is too small for its metadata: dropped.
		{"1GiB+1MiB", fixed(1*gib + 1<<20)},
		{"3GiB+100B", fixed(3*gib + 100)},
		{"20GiB", fixed(20 * gib)},
		{"100GiB", fixed(100 * gib)},
	}
	if !testing.Short() {
		sizes = append(sizes, size{"1TiB", fixed(1 << 40)})
	}
	bases := growBases()
	tm := time.Unix(1720000000, 0)
	bases = append(bases,
		// 64 groups: the classic table is full, so every new group is in
		// the meta_bg range and no classic block changes.
		growBase{"64groups", Options{Time: tm, MinSize: 8 * gib}},
		// 72 groups: two classic blocks.
		growBase{"72groups", Options{Time: tm, MinSize: 9 * gib}},
	)
	for _, base := range bases {
		t.Run(base.name, func(t *testing.T) {
			img, st := mustBuild(t, base.opts, growLayer())
			baseGroups := int(ceilDiv(uint64(st.ImageBytes)/blockSize, blocksPerGroup))
			for _, sz := range sizes {
				size := sz.size(uint64(st.ImageBytes))
				if size < uint64(st.ImageBytes) {
					continue
				}
				t.Run(sz.name, func(t *testing.T) {
					disk, p := grownDisk(t, img, size)
					checkPlanShape(t, p, uint64(st.ImageBytes))
					t.Logf("%s base (%d MiB, %d groups) to %d bytes: %d blocks written (%d KiB) in %d 64 KiB clusters; %s",
						base.name, st.ImageBytes>>20, baseGroups, size, len(p.Writes), len(p.Writes)*4, p.clusters(), p.counts())
					fsck(t, disk)
					h := dumpe2fsHeader(t, disk)
					for _, c := range []struct {
						key  string
						want uint64
					}{
						{"Block count", p.Blocks}, {"Free blocks", p.FreeBlocks},
						{"Inode count", p.Inodes}, {"Free inodes", p.FreeInodes},
					} {
						if got, err := strconv.ParseUint(h[c.key], 10, 64); err != nil || got != c.want {
							t.Errorf("dumpe2fs %s: %q, want %d", c.key, h[c.key], c.want)
						}
					}
					if h["Reserved block count"] != "0" || h["Reserved GDT blocks"] != "" {
						t.Errorf("reserved blocks %q, reserved GDT blocks %q; want 0 and none", h["Reserved block count"], h["Reserved GDT blocks"])
					}
					if p.Blocks*blockSize < size/100*95 || p.Size > size {
						t.Errorf("grown to %d blocks for %d bytes: want at least 95%% and no more", p.Blocks, size)
					}
					if h["Filesystem state"] != "clean" {
						t.Errorf("state %q", h["Filesystem state"])
					}
					metaBG := ceilDiv(p.Blocks, blocksPerGroup) > ceilDiv(uint64(baseGroups), descsPerBlock)*descsPerBlock
					if got := strings.Contains(h["Filesystem features"], "meta_bg"); got != metaBG {
						t.Errorf("features %q: meta_bg %v, want %v", h["Filesystem features"], got, metaBG)
					}
					checkCopies(t, disk, p, baseGroups)
					t.Run("files", func(t *testing.T) {
						dir, _ := mountImage(t, disk, "ro")
						compareTree(t, dir, growWants(base.opts))
					})
				})
			}
		})
	}
}

// overlayCost is what applying p costs a qcow2 overlay of 64 KiB clusters
// over the base file img: the clusters it allocates, and the non-zero
// 4 KiB blocks they hold. A cluster that overlaps the base is copied from
// it first, so its other blocks count too; all-zero blocks stay holes.
func overlayCost(t testing.TB, img string, p GrowPlan) (clusters, nonZero int) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	const clusterBlocks = 1 << 16 / blockSize
	written := map[uint64][]byte{}
	touched := map[uint64]bool{}
	for _, w := range p.Writes {
		written[w.Offset/blockSize] = w.Data
		touched[w.Offset/blockSize/clusterBlocks] = true
	}
	for c := range touched {
		for blk := c * clusterBlocks; blk < (c+1)*clusterBlocks; blk++ {
			data, ok := written[blk]
			if !ok && int64(blk)*blockSize < fi.Size() {
				data = readBlockAt(t, f, int64(blk))
			}
			if data != nil && !isZero(data) {
				nonZero++
			}
		}
	}
	return len(touched), nonZero
}

func TestGrowWriteBudget(t *testing.T) {
	// Non-zero 4 KiB blocks an overlay stores for one box, copied base
	// blocks included; the budgets are the ones growth was designed to:
	// 200 KiB for 20 GiB and 1.7 MiB for 100 GiB.
	budgets := []struct {
		size   uint64
		blocks int
	}{
		{1 * gib, 50}, {3 * gib, 50}, {20 * gib, 50}, {100 * gib, 435}, {1 << 40, 500},
	}
	for _, base := range growBases() {
		img, st := mustBuild(t, base.opts, growLayer())
		for _, b := range budgets {
			p := planFor(t, img, b.size)
			checkPlanShape(t, p, uint64(st.ImageBytes))
			clusters, nonZero := overlayCost(t, img, p)
			t.Logf("%-7s base (%3d MiB) to %4d GiB: %3d blocks written in %3d clusters; the overlay holds %3d non-zero blocks (%4d KiB)",
				base.name, st.ImageBytes>>20, b.size/gib, len(p.Writes), clusters, nonZero, nonZero*blockSize>>10)
			if nonZero > b.blocks {
				t.Errorf("%s base to %d GiB: %d non-zero blocks in the overlay, budget %d", base.name, b.size/gib, nonZero, b.blocks)
			}
		}
	}
}

func TestGrowRefuses(t *testing.T) {
	img, st := mustBuild(t, growBases()[0].opts, growLayer())
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	size := uint64(st.ImageBytes)
	plan := func(d []byte, newSize uint64) error {
		_, err := PlanGrow(bytes.NewReader(d), int64(len(d)), newSize)
		return err
	}
	if err := plan(data, size-1); err == nil || errors.Is(err, ErrNotGrowable) {
		t.Errorf("shrinking: %v, want an error that is not ErrNotGrowable", err)
	}
	if err := plan(data, maxSize+blockSize); err == nil {
		t.Error("growing past 16 TiB accepted")
	}
	if p, err := PlanGrow(bytes.NewReader(data), int64(len(data)), size); err != nil || len(p.Writes) != 0 || p.Size != size {
		t.Errorf("growing to the same size: %v, %s; want an empty plan", err, p.counts())
	}
	if p, err := PlanGrow(bytes.NewReader(data), int64(len(data)), size+blockSize-1); err != nil || len(p.Writes) != 0 {
		t.Errorf("growing by less than a block: %v, %s; want an empty plan", err, p.counts())
	}
	// Each mutation turns the base into one PlanGrow must refuse. The
	// superblock's checksum is recomputed where a mutation means to test
	// the field, not the checksum.
	sbOff := superblockOffset
	mutations := []struct {
		name   string
		mutate func(d []byte) []byte
		reseal bool
	}{
		{"bad magic", func(d []byte) []byte { d[sbOff+sMagic] ^= 1; return d }, true},
		{"bad superblock checksum", func(d []byte) []byte { d[sbOff+sVolumeName] ^= 1; return d }, false},
		{"meta_bg already set", func(d []byte) []byte { d[sbOff+sFeatureIncompat] |= ext4FeatureIncompatMetaBG; return d }, true},
		{"resize_inode", func(d []byte) []byte { d[sbOff+sFeatureCompat] |= 0x10; return d }, true},
		{"not clean", func(d []byte) []byte { d[sbOff+sState] = 0; return d }, true},
		{"errors recorded", func(d []byte) []byte { d[sbOff+sState] |= 2; return d }, true},
		{"1 KiB blocks", func(d []byte) []byte { d[sbOff+sLogBlockSize] = 0; return d }, true},
		{"reserved GDT blocks", func(d []byte) []byte { d[sbOff+sReservedGdtBlocks] = 1; return d }, true},
		{"inode count", func(d []byte) []byte { d[sbOff+sInodesCount] ^= 16; return d }, true},
		{"free block count", func(d []byte) []byte { d[sbOff+sFreeBlocksCountLo] ^= 1; return d }, true},
		{"truncated file", func(d []byte) []byte { return d[:len(d)-blockSize] }, false},
		{"longer file", func(d []byte) []byte { return append(d, make([]byte, blockSize)...) }, false},
		{"bad descriptor checksum", func(d []byte) []byte { d[blockSize+bgFreeInodesCountLo] ^= 1; return d }, false},
		{"block bitmap changed", func(d []byte) []byte {
			bb := binary.LittleEndian.Uint32(d[blockSize+bgBlockBitmapLo:])
			d[int(bb)*blockSize+blockSize-1] ^= 0x80 // a padding bit
			return d
		}, false},
		{"empty", func(d []byte) []byte { return nil }, false},
		{"zeros", func(d []byte) []byte { return make([]byte, len(d)) }, false},
	}
	for _, m := range mutations {
		d := m.mutate(bytes.Clone(data))
		if m.reseal {
			resealSuperblock(d)
		}
		err := plan(d, 20*gib)
		if !errors.Is(err, ErrNotGrowable) {
			t.Errorf("%s: %v, want ErrNotGrowable", m.name, err)
			continue
		}
		t.Logf("%s: %v", m.name, err)
	}
	// A block bitmap placed where growth rewrites group 1's backups.
	pimg, _ := mustBuild(t, growBases()[2].opts, growLayer())
	pdata, err := os.ReadFile(pimg)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(pdata[blockSize+2*descSize+bgBlockBitmapLo:], blocksPerGroup+1)
	resealBase(pdata)
	if err := plan(pdata, 20*gib); !errors.Is(err, ErrNotGrowable) || !strings.Contains(err.Error(), "overlaps") {
		t.Errorf("bitmap over group 1's descriptor copy: %v, want ErrNotGrowable naming the overlap", err)
	}
	// A grown image is no base.
	disk, _ := grownDisk(t, img, 20*gib)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := PlanGrow(f, 20*gib, 40*gib); !errors.Is(err, ErrNotGrowable) {
		t.Errorf("growing a grown image: %v, want ErrNotGrowable", err)
	}
}

// resealSuperblock recomputes the primary superblock's checksum in d.
func resealSuperblock(d []byte) {
	if len(d) < superblockOffset+superblockSize {
		return
	}
	sb := d[superblockOffset : superblockOffset+superblockSize]
	var uuid [16]byte
	copy(uuid[:], sb[sUUID:])
	c := newChecksummer(uuid)
	binary.LittleEndian.PutUint32(sb[sChecksum:], c.sum(^uint32(0), sb[:sChecksum]))
}

// statfs returns the filesystem statistics of the mount at dir.
func statfs(t testing.TB, dir string) syscall.Statfs_t {
	t.Helper()
	var s syscall.Statfs_t
	if err := syscall.Statfs(dir, &s); err != nil {
		t.Fatal(err)
	}
	return s
}

// fillFree fallocates all but slack bytes of the space statfs says is
// available, so that the kernel initializes and writes the block bitmap of
// every group: e2fsck then compares the kernel's idea of each lazily
// initialized group with its own.
func fillFree(t testing.TB, dir string, slack int64) {
	t.Helper()
	s := statfs(t, dir)
	n := int64(s.Bavail)*s.Bsize - slack
	f, err := os.Create(filepath.Join(dir, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, n); err != nil {
		t.Fatalf("fallocate %d bytes of %d available: %v", n, int64(s.Bavail)*s.Bsize, err)
	}
}

func TestGrowKernel(t *testing.T) {
	testenv.RequireRoot(t, "it loop-mounts grown images read-write")
	// Three groups, the last partial: the kernel sees an extended base
	// group as well as new ones.
	base := growBases()[2]
	img, st := mustBuild(t, base.opts, growLayer())
	wants := growWants(base.opts)

	t.Run("3GiB read-write", func(t *testing.T) {
		disk, p := grownDisk(t, img, 3*gib)
		dir, unmount := mountImage(t, disk, "rw")
		s := statfs(t, dir)
		if uint64(s.Bsize) != blockSize || s.Bfree != p.FreeBlocks || s.Files != p.Inodes || s.Ffree != p.FreeInodes {
			t.Errorf("statfs: bsize %d, bfree %d, files %d, ffree %d; want %d, %d, %d, %d",
				s.Bsize, s.Bfree, s.Files, s.Ffree, blockSize, p.FreeBlocks, p.Inodes, p.FreeInodes)
		}
		if s.Blocks > p.Blocks || s.Blocks < p.Blocks/100*95 {
			t.Errorf("statfs: %d blocks, want about %d less the metadata", s.Blocks, p.Blocks)
		}
		// More than the whole base: 1 GiB allocated, 256 MiB of real data,
		// and directories the kernel spreads over the new groups.
		f, err := os.Create(filepath.Join(dir, "allocated"))
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Fallocate(int(f.Fd()), 0, 0, gib); err != nil {
			t.Fatal(err)
		}
		f.Close()
		const dataSize = 256 << 20
		content := randomContent(21, dataSize)
		f, err = os.Create(filepath.Join(dir, "written"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(f, content()); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		for i := range 64 {
			d := filepath.Join(dir, "dir"+strconv.Itoa(i))
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, "f"), []byte(d), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		syscall.Sync()
		after := statfs(t, dir)
		written := uint64(gib+dataSize) / blockSize
		if used := s.Bfree - after.Bfree; used < written || used > written+written/50 {
			t.Errorf("writing %d blocks took %d blocks of free space", written, used)
		}
		if used := s.Ffree - after.Ffree; used != 2+2*64 {
			t.Errorf("creating %d inodes took %d free inodes", 2+2*64, used)
		}
		if uint64(st.ImageBytes) > (s.Bfree-after.Bfree)*blockSize {
			t.Errorf("wrote less than the base's %d bytes", st.ImageBytes)
		}
		fillFree(t, dir, 16<<20)
		unmount()
		fsck(t, disk)
		dir, _ = mountImage(t, disk, "ro")
		f, err = os.Open(filepath.Join(dir, "written"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if sha256Of(f) != sha256Of(content()) {
			t.Error("data written to the grown filesystem changed across a remount")
		}
		for rel, w := range wants {
			if w.nlink == 0 {
				w.nlink = 1
				if w.typ == syscall.S_IFDIR {
					w.nlink = 0 // not checked: the test added directories
				}
			}
			if w.nlink != 0 {
				checkPath(t, filepath.Join(dir, rel), rel, w)
			}
		}
	})

	t.Run("20GiB filled", func(t *testing.T) {
		// meta_bg: every group's bitmap gets initialized by the kernel.
		disk, p := grownDisk(t, img, 20*gib)
		dir, unmount := mountImage(t, disk, "rw")
		if s := statfs(t, dir); s.Bfree != p.FreeBlocks || s.Ffree != p.FreeInodes {
			t.Errorf("statfs: bfree %d, ffree %d; want %d, %d", s.Bfree, s.Ffree, p.FreeBlocks, p.FreeInodes)
		}
		fillFree(t, dir, 16<<20)
		unmount()
		fsck(t, disk)
		for grp, g := range dumpe2fsGroups(t, disk) {
			if strings.Contains(g.flags, "BLOCK_UNINIT") {
				t.Errorf("group %d is still BLOCK_UNINIT after the fill: the kernel never initialized its bitmap", grp)
			}
		}
	})
}

// losetup attaches img to a free loop device and detaches it at the end
// of the test.
func losetup(t testing.TB, img string) string {
	t.Helper()
	out, err := exec.Command(testenv.RequireTool(t, "losetup", "apt-get install util-linux"), "-f", "--show", img).Output()
	if err != nil {
		t.Fatalf("losetup %s: %v", img, err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
		}
	})
	return dev
}

func resize2fs(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command(needTool(t, "resize2fs"), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("resize2fs %v: %v\n%s", args, err, out)
	}
}

// TestGrowThenResize2fs grows grown images further with resize2fs, as a
// guest will on volume expansion. Only offline here: the kernel's online
// resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which the CI machine
// does not grant even to root; the guest, where the resize really runs,
// has it, and the expansion work proves it in the micro-VM e2e.
func TestGrowThenResize2fs(t *testing.T) {
	img, _ := mustBuild(t, growBases()[1].opts, growLayer())
	for _, c := range []struct{ from, to uint64 }{
		{3 * gib, 12 * gib},  // classic table full: resize2fs must switch to meta_bg
		{20 * gib, 40 * gib}, // already meta_bg
	} {
		t.Run(fmt.Sprintf("offline %d to %d GiB", c.from/gib, c.to/gib), func(t *testing.T) {
			disk, _ := grownDisk(t, img, c.from)
			if err := os.Truncate(disk, int64(c.to)); err != nil {
				t.Fatal(err)
			}
			resize2fs(t, "-f", disk)
			fsck(t, disk)
			if n, _ := strconv.ParseUint(dumpe2fsHeader(t, disk)["Block count"], 10, 64); n != c.to/blockSize {
				t.Errorf("resize2fs left %d blocks, want %d", n, c.to/blockSize)
			}
		})
	}
}
