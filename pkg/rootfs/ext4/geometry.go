package ext4

import (
	"fmt"
)

// Fixed geometry. With 4 KiB blocks, one bitmap block covers exactly one
// group of 32768 blocks, which keeps every per-group computation simple.
const (
	blockSize      = 4096
	blocksPerGroup = 8 * blockSize
	inodeSize      = 256
	inodesPerBlock = blockSize / inodeSize
	// descSize is the 64-byte group descriptor of the 64bit feature, which
	// has room for full-width block numbers and bitmap checksums.
	descSize      = 64
	descsPerBlock = blockSize / descSize

	// extraIsize is the i_extra_isize of every inode. It covers all the
	// extra fields, through i_projid. This writer fills in the checksum
	// high half, the nanosecond times and the creation time, and leaves
	// i_version_hi and i_projid zero. The rest of the 256 bytes holds
	// in-inode extended attributes.
	extraIsize = 32

	// maxExtentLen is EXT_INIT_MAX_LEN, the longest initialized extent.
	maxExtentLen = 32768

	// logGroupsPerFlex is the mke2fs default. It only steers the guest's
	// allocator.
	logGroupsPerFlex = 4
)

// Sizing rules of Finish.
const (
	lostFound = "lost+found"
	// bytesPerInode is mke2fs's default inode ratio. It is applied to the
	// space left for the guest.
	bytesPerInode = 16384
	// minSpareInodes is the least number of free inodes in any image.
	minSpareInodes = 16384
	maxInodes      = 1 << 31
	// maxInodesPerGroup is what one inode bitmap block can track.
	maxInodesPerGroup = 8 * blockSize
	// sizeAlign rounds the image size up to 1 MiB (256 blocks).
	sizeAlign = 256
)

// isBackupGroup reports whether group g holds a copy of the superblock and
// group descriptors. Under sparse_super these are groups 0 and 1 and the
// powers of 3, 5 and 7.
func isBackupGroup(g uint64) bool {
	if g <= 1 {
		return true
	}
	for _, base := range [...]uint64{3, 5, 7} {
		n := base
		for n < g {
			n *= base
		}
		if n == g {
			return true
		}
	}
	return false
}

// run is a range of blocks.
type run struct{ start, n uint64 }

// geometry is the final shape of the filesystem.
type geometry struct {
	groups         uint64
	inodesPerGroup uint64
	itableBlocks   uint64 // per group
	gdtBlocks      uint64
	totalBlocks    uint64
	end            uint64 // first block after everything allocated
	blockBitmap    []uint64
	inodeBitmap    []uint64
	inodeTable     []uint64
	runs           []run // blocks allocated by Finish
}

// inodesInGroup is how many of inodes 1..used fall in group grp.
func inodesInGroup(g *geometry, used, grp uint64) uint64 {
	return min(g.inodesPerGroup, used-min(used, grp*g.inodesPerGroup))
}

// planGeometry finds the number of block groups at which everything fits.
// The size of the metadata depends on the group count, and the group count
// depends on the total size, so it tries again with more groups until the
// count stops growing. That takes a step or two.
func (w *Writer) planGeometry(inodes []inodeID, xblocks []*xattrBlock, journal *inode) (*geometry, error) {
	used := uint64(len(inodes) - 1)
	space := uint64(max(w.opts.Headroom, w.opts.MinSize))
	wantInodes := min(used+max(used/4, minSpareInodes, space/bytesPerInode), maxInodes)
	headroom := ceilDiv(uint64(w.opts.Headroom), blockSize) + uint64(float64(w.alloc.next)*w.opts.HeadroomRatio)
	minBlocks := ceilDiv(uint64(w.opts.MinSize), blockSize)
	maxGroups := (w.alloc.skip - 1) * descsPerBlock
	groups := max(1, ceilDiv(w.alloc.next+headroom, blocksPerGroup), ceilDiv(wantInodes, maxInodesPerGroup))
	for {
		if groups > maxGroups {
			return nil, fmt.Errorf("ext4: image needs %d block groups, more than the %d the limits reserved", groups, maxGroups)
		}
		g := w.tryGeometry(groups, wantInodes, journalBlocks(max(w.alloc.next+headroom, minBlocks)), inodes, xblocks, journal)
		total := max(g.end+headroom, minBlocks)
		total = ceilDiv(total, sizeAlign) * sizeAlign
		if need := ceilDiv(total, blocksPerGroup); need > groups {
			groups = need
			continue
		}
		// A previous round may have overshot the group count. The last
		// group must still exist, and it must be big enough for its
		// backup superblock area plus some space.
		total = max(total, (groups-1)*blocksPerGroup+1)
		minLast := uint64(sizeAlign)
		if isBackupGroup(groups - 1) {
			minLast += w.alloc.skip
		}
		if last := total - (groups-1)*blocksPerGroup; last < minLast {
			total += minLast - last
		}
		g.totalBlocks = total
		return g, nil
	}
}

// tryGeometry places all metadata after the data for a given group count.
// It allocates from a copy of the data cursor, so it can be repeated.
func (w *Writer) tryGeometry(groups, wantInodes, journalSize uint64, inodes []inodeID, xblocks []*xattrBlock, journal *inode) *geometry {
	g := &geometry{groups: groups, gdtBlocks: ceilDiv(groups, descsPerBlock)}
	g.inodesPerGroup = ceilDiv(ceilDiv(wantInodes, groups), inodesPerBlock) * inodesPerBlock
	g.itableBlocks = g.inodesPerGroup / inodesPerBlock
	a := metaAlloc{cursor: w.alloc}
	for range groups {
		g.blockBitmap = append(g.blockBitmap, a.contig(1))
	}
	for range groups {
		g.inodeBitmap = append(g.inodeBitmap, a.contig(1))
	}
	for range groups {
		g.inodeTable = append(g.inodeTable, a.contig(g.itableBlocks))
	}
	t := w.tree
	w.metaExts = w.metaExts[:0]
	place := func(in *inode, n uint64) {
		in.ext = uint32(len(w.metaExts))
		w.metaExts = a.appendExtents(w.metaExts, n)
		in.nExt = uint32(len(w.metaExts)) - in.ext
	}
	for _, id := range inodes {
		if id == 0 {
			continue
		}
		if in := t.inode(id); !in.isReg() {
			if n := w.ownBlocks(in); n > 0 {
				place(in, n)
			}
		}
	}
	for _, x := range xblocks {
		x.blk = a.contig(1)
	}
	journal.size = journalSize * blockSize
	place(journal, journalSize)
	var tree []extent
	plan := func(in *inode) {
		n := treeBlockCount(int(in.nExt))
		x := t.extra(in)
		if n == 0 {
			if x != nil {
				x.treeBlocks = x.treeBlocks[:0]
			}
			return
		}
		x = t.extraFor(in)
		x.treeBlocks = x.treeBlocks[:0]
		tree = a.appendExtents(tree[:0], uint64(n))
		for _, e := range tree {
			for i := range uint64(e.length) {
				x.treeBlocks = append(x.treeBlocks, e.start+i)
			}
		}
	}
	for _, id := range inodes[rootIno:] {
		if id != 0 {
			plan(t.inode(id))
		}
	}
	plan(journal)
	g.end = a.cursor.next
	g.runs = a.runs
	return g
}

// metaAlloc allocates the blocks of Finish's metadata from a cursor and
// records them as runs, for the block bitmap.
type metaAlloc struct {
	cursor cursor
	runs   []run
}

// mark records blocks start..start+n-1, merging with the previous run when
// it ends where this one starts.
func (a *metaAlloc) mark(start, n uint64) {
	if k := len(a.runs); k > 0 && a.runs[k-1].start+a.runs[k-1].n == start {
		a.runs[k-1].n += n
		return
	}
	a.runs = append(a.runs, run{start, n})
}

// contig allocates n contiguous blocks and returns the first.
func (a *metaAlloc) contig(n uint64) uint64 {
	start := a.cursor.takeContig(n)
	a.mark(start, n)
	return start
}

// appendExtents allocates n blocks as extents for logical blocks 0..n-1
// and appends them to exts.
func (a *metaAlloc) appendExtents(exts []extent, n uint64) []extent {
	k := len(exts)
	exts = a.cursor.appendExtents(exts, n)
	for _, e := range exts[k:] {
		a.mark(e.start, uint64(e.length))
	}
	return exts
}
