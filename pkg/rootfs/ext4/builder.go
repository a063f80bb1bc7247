package ext4

import (
	"archive/tar"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
)

const (
	readBufSize  = 1 << 20
	writeBufSize = 1 << 20
	// maxFileBlocks is what a 32-bit logical block number can address.
	maxFileBlocks = 1 << 32
)

// Builder streams OCI layers into an ext4 image. Use NewBuilder, then
// ApplyLayer once per layer (lowest first), then Finish. After any error
// the Builder is unusable and the image incomplete. A Builder is not safe
// for concurrent use.
type Builder struct {
	f        *os.File
	opts     Options
	csum     checksummer
	uuid     [16]byte
	hashSeed [16]byte
	now      timestamp
	tree     *tree
	layer    int

	alloc cursor // next free block for file data
	used  bitmap // blocks holding live data (freed ones cleared)
	freed []extent
	w     blockWriter
	rbuf  []byte

	totalBytes int64 // regular file bytes read so far, for MaxTotalBytes
	stats      Stats
	err        error // sticky
	finished   bool
}

// NewBuilder starts an image in out, which must be a regular file opened
// for writing; its previous content is discarded. The file is written with
// pwrite and punched with fallocate; the caller owns syncing and closing it.
func NewBuilder(out *os.File, opts Options) (*Builder, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := out.Truncate(0); err != nil {
		return nil, fmt.Errorf("ext4: truncating output: %w", err)
	}
	b := &Builder{
		f:     out,
		opts:  opts,
		uuid:  opts.UUID,
		now:   toTimestamp(opts.Time),
		layer: -1,
		w:     newBlockWriter(out, writeBufSize),
		rbuf:  make([]byte, readBufSize),
	}
	if b.uuid == [16]byte{} {
		if _, err := rand.Read(b.uuid[:]); err != nil {
			return nil, fmt.Errorf("ext4: generating UUID: %w", err)
		}
		b.uuid[6] = b.uuid[6]&0x0f | 0x40 // version 4
		b.uuid[8] = b.uuid[8]&0x3f | 0x80 // RFC 4122 variant
	}
	seed := sha256.Sum256(append([]byte("ext4 dir hash seed "), b.uuid[:]...))
	copy(b.hashSeed[:], seed[:])
	b.csum = newChecksummer(b.uuid)
	b.tree = newTree(b.now, b.freeData)

	// The descriptor table must be sized now, before data is streamed right
	// behind it. Reserve enough for the largest image the limits allow:
	// all content, a few blocks per entry (tail block, inode, directory
	// space, xattr block), the space asked for, the largest journal, and a
	// quarter on top for inode tables and rounding. Unused reserved blocks
	// are free space in the finished image.
	maxBlocks := uint64(opts.MaxTotalBytes)/blockSize + 4*uint64(opts.MaxFiles) +
		uint64(max(opts.Headroom, opts.MinSize))/blockSize + journalBlocks(math.MaxUint64) +
		uint64(float64(opts.MaxTotalBytes/blockSize)*opts.HeadroomRatio)
	maxGroups := ceilDiv(maxBlocks+maxBlocks/4, blocksPerGroup) + 1
	skip := 1 + ceilDiv(maxGroups, descsPerBlock)
	b.alloc = cursor{next: skip, skip: skip}
	return b, nil
}

// ApplyLayer merges one layer, given as an uncompressed tar stream, into the
// image. Regular file contents are written to the image as they are read.
// ctx is checked between entries and between chunks of large files.
func (b *Builder) ApplyLayer(ctx context.Context, tr *tar.Reader) error {
	if err := b.usable(); err != nil {
		return err
	}
	b.layer++
	b.tree.layer = b.layer
	for {
		if err := ctx.Err(); err != nil {
			return b.fail(err)
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return b.fail(fmt.Errorf("ext4: layer %d: reading tar: %w", b.layer, err))
		}
		if err := b.applyEntry(ctx, hdr, tr); err != nil {
			return b.fail(&EntryError{Layer: b.layer, Path: hdr.Name, Err: err})
		}
	}
	return b.fail(b.releaseFreed())
}

func (b *Builder) usable() error {
	if b.err != nil {
		return b.err
	}
	if b.finished {
		return errors.New("ext4: builder already finished")
	}
	return nil
}

func (b *Builder) fail(err error) error {
	if err != nil && b.err == nil {
		b.err = err
	}
	return err
}

func (b *Builder) applyEntry(ctx context.Context, hdr *tar.Header, r io.Reader) error {
	b.stats.Entries++
	if b.stats.Entries > b.opts.MaxFiles {
		return &LimitError{Limit: LimitFiles, Max: b.opts.MaxFiles}
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // PAX defaults; archive/tar already applies them
	}
	comps, err := splitPath(hdr.Name)
	if err != nil {
		return err
	}
	if slices.ContainsFunc(comps, func(c string) bool { return c != whiteoutOpaque && strings.HasPrefix(c, whiteoutMeta) }) {
		return nil // AUFS bookkeeping (hard link pool, ...): not image content
	}
	typ := hdr.Typeflag
	if len(comps) == 0 {
		if typ != tar.TypeDir {
			return errors.New("the root can only be replaced by a directory")
		}
		in, err := b.newInode(hdr, sIFDIR)
		if err != nil {
			return err
		}
		b.tree.merge(b.tree.root, in)
		return nil
	}
	parent, err := b.tree.walkDir(comps[:len(comps)-1], true)
	if err != nil {
		return err
	}
	name := comps[len(comps)-1]
	if strings.HasPrefix(name, whiteoutPrefix) {
		if name == whiteoutOpaque {
			b.tree.opaque(parent)
		} else {
			b.tree.whiteout(parent, strings.TrimPrefix(name, whiteoutPrefix))
		}
		return nil
	}

	switch typ {
	case tar.TypeReg, '\x00', tar.TypeCont, tar.TypeGNUSparse:
		if hdr.Size > b.opts.MaxFileSize {
			return &LimitError{Limit: LimitFileSize, Max: b.opts.MaxFileSize}
		}
		if hdr.Size > maxFileBlocks*blockSize-blockSize {
			return fmt.Errorf("file of %d bytes is too large for ext4", hdr.Size)
		}
		if b.totalBytes += hdr.Size; b.totalBytes > b.opts.MaxTotalBytes {
			return &LimitError{Limit: LimitTotalBytes, Max: b.opts.MaxTotalBytes}
		}
		in, err := b.newInode(hdr, sIFREG)
		if err != nil {
			return err
		}
		if err := b.tree.put(parent, name, in); err != nil {
			return err
		}
		return b.writeData(ctx, r, hdr.Size, in)
	case tar.TypeDir:
		in, err := b.newInode(hdr, sIFDIR)
		if err != nil {
			return err
		}
		return b.tree.put(parent, name, in)
	case tar.TypeSymlink:
		if hdr.Linkname == "" || len(hdr.Linkname) > maxSymlinkLen {
			return fmt.Errorf("symlink target of %d bytes (must be 1..%d)", len(hdr.Linkname), maxSymlinkLen)
		}
		in, err := b.newInode(hdr, sIFLNK)
		if err != nil {
			return err
		}
		// Linux cannot set a symlink's mode; extracting always yields 0777.
		in.mode = sIFLNK | 0o777
		in.target = hdr.Linkname
		in.size = uint64(len(hdr.Linkname))
		return b.tree.put(parent, name, in)
	case tar.TypeLink:
		targetComps, err := splitPath(hdr.Linkname)
		if err != nil {
			return fmt.Errorf("hard link target %q: %w", hdr.Linkname, err)
		}
		target := b.tree.lookup(targetComps)
		switch {
		case target == nil:
			return fmt.Errorf("hard link target %q does not exist", hdr.Linkname)
		case target.inode.isDir():
			return fmt.Errorf("hard link target %q is a directory", hdr.Linkname)
		}
		return b.tree.link(parent, name, target)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		kind := uint16(sIFIFO)
		switch typ {
		case tar.TypeChar:
			kind = sIFCHR
		case tar.TypeBlock:
			kind = sIFBLK
		}
		in, err := b.newInode(hdr, kind)
		if err != nil {
			return err
		}
		if typ != tar.TypeFifo {
			if hdr.Devmajor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor < 0 || hdr.Devminor > 0xfffff {
				return fmt.Errorf("device number %d:%d out of range", hdr.Devmajor, hdr.Devminor)
			}
			in.devMajor, in.devMinor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
		}
		return b.tree.put(parent, name, in)
	}
	b.stats.SkippedOther++
	return nil
}

// newInode builds an inode carrying the entry's metadata.
func (b *Builder) newInode(hdr *tar.Header, kind uint16) (*inode, error) {
	if hdr.Uid < 0 || int64(hdr.Uid) > math.MaxUint32 || hdr.Gid < 0 || int64(hdr.Gid) > math.MaxUint32 {
		return nil, fmt.Errorf("uid/gid %d/%d out of range", hdr.Uid, hdr.Gid)
	}
	mtime := toTimestamp(hdr.ModTime)
	in := &inode{
		mode:  kind | uint16(hdr.Mode&0o7777),
		uid:   uint32(hdr.Uid),
		gid:   uint32(hdr.Gid),
		mtime: mtime,
		atime: mtime,
		ctime: mtime,
	}
	if !hdr.AccessTime.IsZero() {
		in.atime = toTimestamp(hdr.AccessTime)
	}
	if !hdr.ChangeTime.IsZero() {
		in.ctime = toTimestamp(hdr.ChangeTime)
	}
	xs, skipped, err := tarXattrs(hdr)
	if err != nil {
		return nil, err
	}
	if _, block := splitXattrs(xs); blockXattrSize(block)+4 > blockSize-xattrHeaderSize {
		return nil, errors.New("extended attributes do not fit in the inode plus one block")
	}
	b.stats.SkippedXattrs += int64(skipped)
	in.xattrs = xs
	return in, nil
}

func blockXattrSize(xs []xattr) int {
	n := 0
	for _, x := range xs {
		n += x.size()
	}
	return n
}

// writeData streams a regular file's content to freshly allocated blocks.
// All-zero blocks are not allocated: they become holes.
func (b *Builder) writeData(ctx context.Context, r io.Reader, size int64, in *inode) error {
	in.size = uint64(size)
	var logical uint64
	for done := int64(0); done < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(size-done, int64(len(b.rbuf)))
		if _, err := io.ReadFull(r, b.rbuf[:n]); err != nil {
			return fmt.Errorf("reading file content: %w", err)
		}
		blocks := int(ceilDiv(uint64(n), blockSize))
		buf := b.rbuf[:blocks*blockSize]
		clear(buf[n:]) // the tail of the last block reads as zeros
		for i := 0; i < blocks; {
			if isZero(buf[i*blockSize : (i+1)*blockSize]) {
				i++
				continue
			}
			j := i + 1
			for j < blocks && !isZero(buf[j*blockSize:(j+1)*blockSize]) {
				j++
			}
			if err := b.place(in, logical+uint64(i), buf[i*blockSize:j*blockSize]); err != nil {
				return err
			}
			i = j
		}
		logical += uint64(blocks)
		done += n
	}
	return nil
}

// place writes data (whole blocks) as the file's blocks from logical on.
func (b *Builder) place(in *inode, logical uint64, data []byte) error {
	for len(data) > 0 {
		start, n := b.alloc.take(uint64(len(data) / blockSize))
		b.used.setRange(start, n, true)
		if err := b.w.write(start, data[:n*blockSize]); err != nil {
			return err
		}
		in.extents = appendExtent(in.extents, logical, start, n)
		logical += n
		data = data[n*blockSize:]
	}
	return nil
}

// appendExtent adds a mapping, extending the last extent when both logical
// and physical blocks continue it.
func appendExtent(exts []extent, logical, start, n uint64) []extent {
	if k := len(exts); k > 0 {
		last := &exts[k-1]
		if uint64(last.logical)+uint64(last.length) == logical &&
			last.start+uint64(last.length) == start && uint64(last.length) < maxExtentLen {
			grow := min(n, maxExtentLen-uint64(last.length))
			last.length += uint16(grow)
			logical, start, n = logical+grow, start+grow, n-grow
		}
	}
	for n > 0 {
		l := min(n, maxExtentLen)
		exts = append(exts, extent{logical: uint32(logical), start: start, length: uint16(l)})
		logical, start, n = logical+l, start+l, n-l
	}
	return exts
}

// freeData returns a deleted file's blocks. They are not reused (allocation
// only moves forward) but are punched out at the end of the layer.
func (b *Builder) freeData(in *inode) {
	for _, e := range in.extents {
		b.used.setRange(e.start, uint64(e.length), false)
		b.freed = append(b.freed, e)
	}
	in.extents = nil
}

func (b *Builder) releaseFreed() error {
	if err := b.w.flush(); err != nil {
		return err
	}
	slices.SortFunc(b.freed, func(x, y extent) int { return cmp.Compare(x.start, y.start) })
	for i := 0; i < len(b.freed); {
		start, end := b.freed[i].start, b.freed[i].start+uint64(b.freed[i].length)
		for i++; i < len(b.freed) && b.freed[i].start == end; i++ {
			end += uint64(b.freed[i].length)
		}
		if err := punchHole(b.f, start, end-start); err != nil {
			return err
		}
	}
	b.freed = b.freed[:0]
	return nil
}
