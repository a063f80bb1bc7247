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

// Writer streams OCI layers into one ext4 image. Call NewWriter, then
// ApplyLayer once per layer (lowest first), then Finish. After any error
// the Writer is unusable and the image is incomplete. A Writer is not safe
// for concurrent use.
type Writer struct {
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
	// exts holds the extents of all regular files, each file's in one run
	// (files are streamed one at a time). metaExts holds those Finish
	// allocates, for directories, long symlinks and the journal.
	exts, metaExts []extent
	// dirs and ents are built by Finish: what each directory needs to be
	// written, and every directory's children in name order, one run per
	// directory.
	dirs   []dirInfo
	ents   []nodeID
	dirBuf []byte   // the directory block being encoded
	comps  []string // the path of the entry being applied
	bw     blockWriter
	rbuf   []byte

	totalBytes int64 // regular file sizes so far, for MaxTotalBytes
	readBytes  int64 // layer stream bytes read so far, for MaxTotalBytes
	stats      Stats
	err        error // sticky
	finished   bool
}

// NewWriter starts an image in out, which must be a regular file opened
// for writing. Its previous content is discarded. The file is written with
// pwrite and punched with fallocate. The caller owns syncing and closing
// it.
func NewWriter(out *os.File, opts Options) (*Writer, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := out.Truncate(0); err != nil {
		return nil, fmt.Errorf("ext4: truncating output: %w", err)
	}
	w := &Writer{
		f:     out,
		opts:  opts,
		uuid:  opts.UUID,
		now:   toTimestamp(opts.Time),
		layer: -1,
		bw:    newBlockWriter(out, writeBufSize),
		rbuf:  make([]byte, readBufSize),
	}
	if w.uuid == [16]byte{} {
		if _, err := rand.Read(w.uuid[:]); err != nil {
			return nil, fmt.Errorf("ext4: generating UUID: %w", err)
		}
		w.uuid[6] = w.uuid[6]&0x0f | 0x40 // version 4
		w.uuid[8] = w.uuid[8]&0x3f | 0x80 // RFC 4122 variant
	}
	seed := sha256.Sum256(append([]byte("ext4 dir hash seed "), w.uuid[:]...))
	copy(w.hashSeed[:], seed[:])
	w.csum = newChecksummer(w.uuid)
	w.tree = newTree(w.now, w.freeData)

	// The descriptor table must be sized now, because data is streamed
	// right behind it. It is reserved for the largest image the limits
	// allow. That image holds all content, a few blocks per entry (tail
	// block, inode, directory space, xattr block), the space asked for and
	// the largest journal, plus a quarter on top for inode tables and
	// rounding. Reserved blocks left unused are free space in the finished
	// image.
	maxBlocks := uint64(opts.MaxTotalBytes)/blockSize + 4*uint64(opts.MaxFiles) +
		uint64(max(opts.Headroom, opts.MinSize))/blockSize + journalBlocks(math.MaxUint64) +
		uint64(float64(opts.MaxTotalBytes/blockSize)*opts.HeadroomRatio)
	maxGroups := ceilDiv(maxBlocks+maxBlocks/4, blocksPerGroup) + 1
	skip := 1 + ceilDiv(maxGroups, descsPerBlock)
	w.alloc = cursor{next: skip, skip: skip}
	return w, nil
}

// ApplyLayer merges one layer, given as its uncompressed tar stream, into
// the image. Regular file contents are written to the image as they are
// read. r is read to its end, and every byte of it counts toward
// MaxTotalBytes over all layers: headers, padding, the bodies of entries
// that leave nothing in the image (whiteouts, skipped entries) and
// whatever follows the end-of-archive marker. ctx is checked between
// entries and between chunks of large bodies.
func (w *Writer) ApplyLayer(ctx context.Context, r io.Reader) error {
	if err := w.usable(); err != nil {
		return err
	}
	w.layer++
	w.tree.layer = int32(w.layer)
	m := &meter{r: r, w: w}
	tr := tar.NewReader(m)
	prev := ""
	for {
		if err := ctx.Err(); err != nil {
			return w.fail(err)
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			// Next also skips what the previous entry left unread, so
			// name it: a limit is most likely crossed in its body.
			if prev != "" {
				return w.fail(fmt.Errorf("ext4: layer %d: reading tar after %q: %w", w.layer, prev, err))
			}
			return w.fail(fmt.Errorf("ext4: layer %d: reading tar: %w", w.layer, err))
		}
		if err := w.applyEntry(ctx, hdr, tr); err != nil {
			return w.fail(&EntryError{Layer: w.layer, Path: hdr.Name, Err: err})
		}
		prev = hdr.Name
	}
	// The end-of-archive marker need not end the stream (tar pads to its
	// record size, and anything may follow). Read and count the rest.
	for {
		if err := ctx.Err(); err != nil {
			return w.fail(err)
		}
		_, err := m.Read(w.rbuf)
		if err == io.EOF {
			break
		}
		if err != nil {
			return w.fail(fmt.Errorf("ext4: layer %d: after the tar end: %w", w.layer, err))
		}
	}
	return w.fail(w.releaseFreed())
}

// meter counts the bytes read from a layer stream toward MaxTotalBytes,
// for all layers together.
type meter struct {
	r io.Reader
	w *Writer
}

func (m *meter) Read(p []byte) (int, error) {
	limit := m.w.opts.MaxTotalBytes
	// Read at most one byte past the limit: enough to tell a stream that
	// ends right at it from one that goes on.
	if left := limit - m.w.readBytes; int64(len(p)) > left+1 {
		p = p[:max(left+1, 0)]
	}
	n, err := m.r.Read(p)
	m.w.readBytes += int64(n)
	if m.w.readBytes > limit {
		return 0, &LimitError{Limit: LimitTotalBytes, Max: limit}
	}
	return n, err
}

func (w *Writer) usable() error {
	if w.err != nil {
		return w.err
	}
	if w.finished {
		return errors.New("ext4: writer already finished")
	}
	return nil
}

func (w *Writer) fail(err error) error {
	if err != nil && w.err == nil {
		w.err = err
	}
	return err
}

// applyEntry applies one tar entry to the merged tree. A whiteout entry
// deletes from lower layers, and any other entry places new content at its
// path.
func (w *Writer) applyEntry(ctx context.Context, hdr *tar.Header, r io.Reader) error {
	w.stats.Entries++
	if err := w.checkFiles(); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // PAX defaults, which archive/tar already applies
	}
	comps, err := appendPath(w.comps[:0], hdr.Name)
	if err != nil {
		return err
	}
	w.comps = comps
	if slices.ContainsFunc(comps, isAUFSMeta) {
		return nil // AUFS bookkeeping such as the hard link pool, not image content
	}
	if len(comps) == 0 {
		return w.replaceRoot(hdr)
	}
	parent, err := w.tree.walkDir(comps[:len(comps)-1], true)
	if err != nil {
		return err
	}
	// walkDir may have made directories the entry implies.
	if err := w.checkFiles(); err != nil {
		return err
	}
	name := comps[len(comps)-1]
	if strings.HasPrefix(name, whiteoutPrefix) {
		w.applyWhiteout(parent, name)
		return nil
	}
	switch hdr.Typeflag {
	case tar.TypeReg, '\x00', tar.TypeCont, tar.TypeGNUSparse:
		return w.addFile(ctx, parent, name, hdr, r)
	case tar.TypeDir:
		return w.addDir(parent, name, hdr)
	case tar.TypeSymlink:
		return w.addSymlink(parent, name, hdr)
	case tar.TypeLink:
		return w.addHardLink(parent, name, hdr)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		return w.addSpecial(parent, name, hdr)
	}
	w.stats.SkippedOther++
	return nil
}

// checkFiles enforces MaxFiles on the entries read so far plus the
// directories they implied, which cost memory like entries do.
func (w *Writer) checkFiles() error {
	if w.stats.Entries+w.tree.implicit > w.opts.MaxFiles {
		return &LimitError{Limit: LimitFiles, Max: w.opts.MaxFiles}
	}
	return nil
}

// isAUFSMeta reports whether a path component is AUFS bookkeeping
// (.wh..wh.plnk and the like), which OCI says to ignore. The opaque
// whiteout shares the prefix but is not bookkeeping.
func isAUFSMeta(comp string) bool {
	return comp != whiteoutOpaque && strings.HasPrefix(comp, whiteoutMeta)
}

// replaceRoot applies an entry for the root itself. Only a directory can
// take its place, and it merges with the root like any directory over a
// directory.
func (w *Writer) replaceRoot(hdr *tar.Header) error {
	if hdr.Typeflag != tar.TypeDir {
		return errors.New("the root can only be replaced by a directory")
	}
	in, x, err := w.newInode(hdr, sIFDIR)
	if err != nil {
		return err
	}
	w.tree.merge(w.tree.root, &in, x.xattrs)
	return nil
}

// applyWhiteout applies a whiteout entry named name in parent. The opaque
// whiteout hides everything lower layers put in parent. Any other
// whiteout hides the one name that follows the prefix.
func (w *Writer) applyWhiteout(parent nodeID, name string) {
	if name == whiteoutOpaque {
		w.tree.opaque(parent)
	} else {
		w.tree.whiteout(parent, strings.TrimPrefix(name, whiteoutPrefix))
	}
}

// addFile places a regular file and streams its content into the image.
// The size limits are checked before anything is read.
func (w *Writer) addFile(ctx context.Context, parent nodeID, name string, hdr *tar.Header, r io.Reader) error {
	if hdr.Size > w.opts.MaxFileSize {
		return &LimitError{Limit: LimitFileSize, Max: w.opts.MaxFileSize}
	}
	if hdr.Size > maxFileBlocks*blockSize-blockSize {
		return fmt.Errorf("file of %d bytes is too large for ext4", hdr.Size)
	}
	if w.totalBytes += hdr.Size; w.totalBytes > w.opts.MaxTotalBytes {
		return &LimitError{Limit: LimitTotalBytes, Max: w.opts.MaxTotalBytes}
	}
	in, x, err := w.newInode(hdr, sIFREG)
	if err != nil {
		return err
	}
	p, err := w.tree.put(parent, name, in, &x)
	if err != nil {
		return err
	}
	return w.writeData(ctx, r, hdr.Size, p)
}

func (w *Writer) addDir(parent nodeID, name string, hdr *tar.Header) error {
	in, x, err := w.newInode(hdr, sIFDIR)
	if err != nil {
		return err
	}
	_, err = w.tree.put(parent, name, in, &x)
	return err
}

// addSymlink places a symlink. Finish stores its target in the inode, or in
// a block of its own when it is longer than fastSymlinkMax.
func (w *Writer) addSymlink(parent nodeID, name string, hdr *tar.Header) error {
	if hdr.Linkname == "" || len(hdr.Linkname) > maxSymlinkLen {
		return fmt.Errorf("symlink target of %d bytes (must be 1..%d)", len(hdr.Linkname), maxSymlinkLen)
	}
	in, x, err := w.newInode(hdr, sIFLNK)
	if err != nil {
		return err
	}
	// Linux cannot set a symlink's mode, so extracting always yields 0777.
	in.mode = sIFLNK | 0o777
	// A copy: the tar reader's string may share a PAX block of up to 1 MiB.
	x.target = strings.Clone(hdr.Linkname)
	in.size = uint64(len(hdr.Linkname))
	_, err = w.tree.put(parent, name, in, &x)
	return err
}

// addHardLink makes parent/name another name for an existing file. The
// target is looked up in the tree as merged so far, and it must not be a
// directory.
func (w *Writer) addHardLink(parent nodeID, name string, hdr *tar.Header) error {
	targetComps, err := splitPath(hdr.Linkname)
	if err != nil {
		return fmt.Errorf("hard link target %q: %w", hdr.Linkname, err)
	}
	target := w.tree.lookup(targetComps)
	switch {
	case target == 0:
		return fmt.Errorf("hard link target %q does not exist", hdr.Linkname)
	case w.tree.inodeOf(target).isDir():
		return fmt.Errorf("hard link target %q is a directory", hdr.Linkname)
	}
	return w.tree.link(parent, name, target)
}

// addSpecial places a character device, block device or FIFO.
func (w *Writer) addSpecial(parent nodeID, name string, hdr *tar.Header) error {
	kind := uint16(sIFIFO)
	switch hdr.Typeflag {
	case tar.TypeChar:
		kind = sIFCHR
	case tar.TypeBlock:
		kind = sIFBLK
	}
	in, x, err := w.newInode(hdr, kind)
	if err != nil {
		return err
	}
	if hdr.Typeflag != tar.TypeFifo {
		if hdr.Devmajor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor < 0 || hdr.Devminor > 0xfffff {
			return fmt.Errorf("device number %d:%d out of range", hdr.Devmajor, hdr.Devminor)
		}
		x.devMajor, x.devMinor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	}
	_, err = w.tree.put(parent, name, in, &x)
	return err
}

// newInode builds an inode carrying the entry's metadata, and its extra
// fields (the xattrs, so far).
func (w *Writer) newInode(hdr *tar.Header, kind uint16) (inode, inodeExtra, error) {
	if hdr.Uid < 0 || int64(hdr.Uid) > math.MaxUint32 || hdr.Gid < 0 || int64(hdr.Gid) > math.MaxUint32 {
		return inode{}, inodeExtra{}, fmt.Errorf("uid/gid %d/%d out of range", hdr.Uid, hdr.Gid)
	}
	mtime := toTimestamp(hdr.ModTime)
	in := inode{
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
		return inode{}, inodeExtra{}, err
	}
	if _, block := splitXattrs(xs); blockXattrSize(block)+xattrListEnd > blockSize-xattrHeaderSize {
		return inode{}, inodeExtra{}, errors.New("extended attributes do not fit in the inode plus one block")
	}
	w.stats.SkippedXattrs += int64(skipped)
	return in, inodeExtra{xattrs: xs}, nil
}

func blockXattrSize(xs []xattr) int {
	n := 0
	for _, x := range xs {
		n += x.size()
	}
	return n
}

// writeData streams a regular file's content to freshly allocated blocks.
// All-zero blocks are not allocated, so they become holes.
func (w *Writer) writeData(ctx context.Context, r io.Reader, size int64, in *inode) error {
	in.size = uint64(size)
	var logical uint64
	for done := int64(0); done < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(size-done, int64(len(w.rbuf)))
		if _, err := io.ReadFull(r, w.rbuf[:n]); err != nil {
			return fmt.Errorf("reading file content: %w", err)
		}
		blocks := int(ceilDiv(uint64(n), blockSize))
		buf := w.rbuf[:blocks*blockSize]
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
			if err := w.place(in, logical+uint64(i), buf[i*blockSize:j*blockSize]); err != nil {
				return err
			}
			i = j
		}
		logical += uint64(blocks)
		done += n
	}
	return nil
}

// place writes data, a whole number of blocks, as the file's blocks from
// logical block logical on. The file's extents are the last ones in
// w.exts.
func (w *Writer) place(in *inode, logical uint64, data []byte) error {
	if in.nExt == 0 {
		in.ext = uint32(len(w.exts))
	}
	for len(data) > 0 {
		start, n := w.alloc.take(uint64(len(data) / blockSize))
		w.used.setRange(start, n, true)
		if err := w.bw.write(start, data[:n*blockSize]); err != nil {
			return err
		}
		w.exts = appendExtent(w.exts, int(in.ext), logical, start, n)
		logical += n
		data = data[n*blockSize:]
	}
	in.nExt = uint32(len(w.exts)) - in.ext
	return nil
}

// appendExtent adds a mapping to the extents from first on, extending the
// last of them when both logical and physical blocks continue it.
func appendExtent(exts []extent, first int, logical, start, n uint64) []extent {
	if k := len(exts); k > first {
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

// extents returns in's extents.
func (w *Writer) extents(in *inode) []extent {
	// The journal is the one regular file whose blocks Finish allocates.
	if in.isReg() && in.num != journalIno {
		return w.exts[in.ext : in.ext+in.nExt]
	}
	return w.metaExts[in.ext : in.ext+in.nExt]
}

// dataBlocks counts the data blocks in maps (holes excluded).
func (w *Writer) dataBlocks(in *inode) uint64 {
	var n uint64
	for _, e := range w.extents(in) {
		n += uint64(e.length)
	}
	return n
}

// freeData releases a deleted file's blocks. They are never reused, because
// allocation only moves forward, but they are punched out of the image at
// the end of the layer.
func (w *Writer) freeData(in *inode) {
	for _, e := range w.extents(in) {
		w.used.setRange(e.start, uint64(e.length), false)
		w.freed = append(w.freed, e)
	}
	in.nExt = 0
}

// releaseFreed punches the blocks freed during the layer out of the image
// file, merging neighbouring extents into one call.
func (w *Writer) releaseFreed() error {
	if err := w.bw.flush(); err != nil {
		return err
	}
	slices.SortFunc(w.freed, func(x, y extent) int { return cmp.Compare(x.start, y.start) })
	for i := 0; i < len(w.freed); {
		start, end := w.freed[i].start, w.freed[i].start+uint64(w.freed[i].length)
		for i++; i < len(w.freed) && w.freed[i].start == end; i++ {
			end += uint64(w.freed[i].length)
		}
		if err := punchHole(w.f, start, end-start); err != nil {
			return err
		}
	}
	w.freed = w.freed[:0]
	return nil
}
