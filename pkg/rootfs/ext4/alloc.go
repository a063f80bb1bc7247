package ext4

// cursor hands out blocks strictly in ascending order. It never returns a
// block inside a backup area, which is the first skip blocks of a backup
// group. Finish writes the superblock and descriptor copies there, and
// data streamed before the final group count was known must not be in the
// way.
type cursor struct {
	next uint64 // first block not yet handed out
	skip uint64 // 1 (superblock) + reserved descriptor blocks
}

// take returns a run of at most want contiguous blocks (want > 0). The run
// is shorter than want only when it would otherwise enter a backup area.
func (c *cursor) take(want uint64) (start, n uint64) {
	g := c.next / blocksPerGroup
	if isBackupGroup(g) && c.next%blocksPerGroup < c.skip {
		c.next = g*blocksPerGroup + c.skip
	}
	start = c.next
	end := start + want
	for h := g + 1; h*blocksPerGroup < end; h++ {
		if isBackupGroup(h) {
			end = h * blocksPerGroup
			break
		}
	}
	c.next = end
	return start, end - start
}

// takeContig returns exactly n contiguous blocks. n must fit in a group
// minus its backup area. Blocks passed over stay free.
func (c *cursor) takeContig(n uint64) uint64 {
	start, got := c.take(n)
	if got < n {
		// The cursor now sits right after a backup area, so a whole
		// group lies ahead.
		start, _ = c.take(n)
	}
	return start
}

// appendExtents allocates n blocks as extents for logical blocks 0..n-1
// and appends them to exts.
func (c *cursor) appendExtents(exts []extent, n uint64) []extent {
	for logical := uint64(0); logical < n; {
		start, got := c.take(min(n-logical, maxExtentLen))
		exts = append(exts, extent{logical: uint32(logical), start: start, length: uint16(got)})
		logical += got
	}
	return exts
}

// bitmap is a growable set of block numbers.
type bitmap []uint64

func (b *bitmap) setRange(start, n uint64, v bool) {
	end := start + n
	if need := (end + 63) / 64; uint64(len(*b)) < need {
		if uint64(cap(*b)) >= need {
			*b = (*b)[:need]
		} else {
			grown := make(bitmap, need, need+need/2)
			copy(grown, *b)
			*b = grown
		}
	}
	w := *b
	for i := start; i < end; {
		if i%64 == 0 && end-i >= 64 {
			if v {
				w[i/64] = ^uint64(0)
			} else {
				w[i/64] = 0
			}
			i += 64
			continue
		}
		if v {
			w[i/64] |= 1 << (i % 64)
		} else {
			w[i/64] &^= 1 << (i % 64)
		}
		i++
	}
}

func ceilDiv(a, b uint64) uint64 { return (a + b - 1) / b }
