package ext4

import "testing"

func TestGrowGeometry(t *testing.T) {
	const bpg = blocksPerGroup
	// overhead8 is what group 8 (no backup, classic) spends on itself
	// with 8192 inodes: two bitmaps and 512 inode table blocks.
	const overhead8 = 2 + 512
	cases := []struct {
		name                 string
		oldBlocks, ipg, want uint64
		blocks, groups, gdt  uint64
		metaBG               bool
		err                  bool
	}{
		{name: "within the last group", oldBlocks: 3072, ipg: 16416, want: 10000, blocks: 10000, groups: 1, gdt: 1},
		{name: "smaller than the base", oldBlocks: 3*bpg - 7, ipg: 8192, want: 100, blocks: 3*bpg - 7, groups: 3, gdt: 1},
		{name: "1 GiB from a partial group", oldBlocks: 2*bpg + 5000, ipg: 8192, want: 8 * bpg, blocks: 8 * bpg, groups: 8, gdt: 1},
		{name: "classic table full", oldBlocks: bpg, ipg: 8192, want: 64 * bpg, blocks: 64 * bpg, groups: 64, gdt: 1},
		{name: "one group past the classic table", oldBlocks: bpg, ipg: 8192, want: 65 * bpg, blocks: 65 * bpg, groups: 65, gdt: 1, metaBG: true},
		{name: "20 GiB", oldBlocks: 2 * bpg, ipg: 8192, want: 20 << 18, blocks: 20 << 18, groups: 160, gdt: 1, metaBG: true},
		{name: "two classic blocks", oldBlocks: 100 * bpg, ipg: 8192, want: 200 * bpg, blocks: 200 * bpg, groups: 200, gdt: 2, metaBG: true},
		{name: "last group just big enough", oldBlocks: bpg, ipg: 8192, want: 8*bpg + overhead8 + minGrowFree, blocks: 8*bpg + overhead8 + minGrowFree, groups: 9, gdt: 1},
		{name: "last group too small", oldBlocks: bpg, ipg: 8192, want: 8*bpg + overhead8 + minGrowFree - 1, blocks: 8 * bpg, groups: 8, gdt: 1},
		{name: "dropping the last group ends meta_bg", oldBlocks: bpg, ipg: 8192, want: 64*bpg + 10, blocks: 64 * bpg, groups: 64, gdt: 1},
		{name: "old end on a group boundary, tiny growth", oldBlocks: 2 * bpg, ipg: 8192, want: 2*bpg + 10, blocks: 2 * bpg, groups: 2, gdt: 1},
		{name: "16 TiB", oldBlocks: bpg, ipg: 8192, want: 1 << 32, blocks: 1 << 32, groups: 1 << 17, gdt: 1, metaBG: true},
		{name: "inodes overflow 32 bits", oldBlocks: bpg, ipg: 32768, want: 1 << 32, err: true},
	}
	for _, c := range cases {
		g, err := newGrowGeometry(c.oldBlocks, c.ipg, c.want)
		if c.err {
			if err == nil {
				t.Errorf("%s: no error, want one", c.name)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if g.blocks != c.blocks || g.groups != c.groups || g.gdtBlocks != c.gdt || g.metaBG != c.metaBG {
			t.Errorf("%s: blocks %d, groups %d, gdt %d, meta_bg %v; want %d, %d, %d, %v",
				c.name, g.blocks, g.groups, g.gdtBlocks, g.metaBG, c.blocks, c.groups, c.gdt, c.metaBG)
		}
	}
}

func TestGrowGroupLayout(t *testing.T) {
	const bpg = blocksPerGroup
	// 20 GiB grown from a one-group base: one classic block (groups
	// 0..63), meta-groups 1 (64..127) and 2 (128..159, partial).
	one, err := newGrowGeometry(bpg-100, 8192, 160*bpg)
	if err != nil {
		t.Fatal(err)
	}
	// 200 groups from a 100-group base: two classic blocks (0..127).
	two, err := newGrowGeometry(100*bpg, 8192, 200*bpg)
	if err != nil {
		t.Fatal(err)
	}
	const none = ^uint64(0)
	cases := []struct {
		name string
		g    *growGeometry
		grp  uint64
		// startMeta blocks open the group; desc0 and desc1 are where it
		// holds descriptor blocks 0 and 1 (none: nowhere), descOwn where
		// it holds its meta-group's block.
		startMeta, desc0, desc1, descOwn uint64
	}{
		{"group 0", &one, 0, 2, 1, none, none},
		{"classic backup", &one, 3, 2, 3*bpg + 1, none, none},
		{"classic, no backup", &one, 2, 0, none, none, none},
		{"classic backup, two blocks", &two, 125, 3, 125*bpg + 1, 125*bpg + 2, none},
		{"meta-group start", &one, 64, 1, none, 64 * bpg, 64 * bpg},
		{"meta-group second", &one, 65, 1, none, 65 * bpg, 65 * bpg},
		{"meta-group last", &one, 127, 1, none, 127 * bpg, 127 * bpg},
		{"backup in the meta range holds only its superblock", &one, 81, 1, none, none, none},
		{"backup, meta range, 5^3", &one, 125, 1, none, none, none},
		{"plain meta-range group", &one, 100, 0, none, none, none},
		{"meta-group 2 start", &one, 128, 1, none, none, 128 * bpg},
		{"meta range of two classic blocks", &two, 128, 1, none, none, 128 * bpg},
		{"last group of a partial meta-group", &one, 159, 0, none, none, none},
	}
	at := func(g *growGeometry, grp, i uint64) uint64 {
		if blk, ok := g.descBlockAt(grp, i); ok {
			return blk
		}
		return none
	}
	for _, c := range cases {
		own := none
		if !c.g.classic(c.grp) {
			own = at(c.g, c.grp, c.grp/descsPerBlock)
		}
		got := [...]uint64{c.g.startMeta(c.grp), at(c.g, c.grp, 0), at(c.g, c.grp, 1), own}
		if want := [...]uint64{c.startMeta, c.desc0, c.desc1, c.descOwn}; got != want {
			t.Errorf("%s (group %d): startMeta, desc 0, desc 1, own = %v, want %v", c.name, c.grp, got, want)
		}
		if c.grp < c.g.oldGroups {
			continue
		}
		d := c.g.newGroupDesc(c.grp, c.g.oldBlocks)
		first := c.grp*bpg + c.startMeta
		if d.blockBitmap != first || d.inodeBitmap != first+1 || d.inodeTable != first+2 {
			t.Errorf("%s: bitmaps at %d, %d and table at %d; want %d, %d, %d", c.name, d.blockBitmap, d.inodeBitmap, d.inodeTable, first, first+1, first+2)
		}
		if want := uint32(bpg - c.startMeta - 2 - 512); d.freeBlocks != want {
			t.Errorf("%s: %d free blocks, want %d", c.name, d.freeBlocks, want)
		}
		want := uint16(ext4BGBlockUninit | ext4BGInodeUninit | ext4BGInodeZeroed)
		if c.grp == c.g.groups-1 {
			want &^= ext4BGBlockUninit // e2fsck wants the last group's bitmap on disk
		}
		if d.flags != want {
			t.Errorf("%s: flags %#x, want %#x", c.name, d.flags, want)
		}
	}
	// ITABLE_ZEROED only when the whole table lies past the base.
	for _, c := range []struct {
		baseEnd uint64
		zeroed  bool
	}{
		{2 * bpg, true}, {2*bpg + 2, true}, {2*bpg + 3, false}, {3 * bpg, false},
	} {
		d := one.newGroupDesc(2, c.baseEnd)
		if got := d.flags&ext4BGInodeZeroed != 0; got != c.zeroed {
			t.Errorf("group 2 over a base of %d blocks: ITABLE_ZEROED %v, want %v", c.baseEnd, got, c.zeroed)
		}
	}
	// The last group of a partial growth is short.
	g, err := newGrowGeometry(bpg, 8192, 8*bpg+1000)
	if err != nil {
		t.Fatal(err)
	}
	if d := g.newGroupDesc(8, bpg); g.groupBlocks(8) != 1000 || d.freeBlocks != 1000-514 || d.flags&ext4BGBlockUninit != 0 {
		t.Errorf("short last group: %d blocks, %d free, flags %#x; want 1000, %d, initialized", g.groupBlocks(8), d.freeBlocks, d.flags, 1000-514)
	}
	// Its bitmap: its own 514 metadata blocks in use, then free blocks up
	// to the end of the filesystem, then padding in use.
	bm := g.newGroupBitmap(8)
	for bit := range uint64(blocksPerGroup) {
		want := bit < 514 || bit >= 1000
		if got := bm[bit/8]&(1<<(bit%8)) != 0; got != want {
			t.Fatalf("short last group's bitmap: block %d in use %v, want %v", bit, got, want)
		}
	}
}
