package qcow2

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// OverlayOptions describes an overlay to create. The zero values of Writes,
// Backing and BackingSize give an empty overlay, every read of which falls
// through to the backing file.
type OverlayOptions struct {
	// BackingFile is recorded verbatim. QEMU resolves a relative name
	// against the overlay's directory, which is what lets a box be moved or
	// bind-mounted whole.
	BackingFile string
	// BackingFormat is FormatRaw or FormatQcow2.
	BackingFormat string
	// Size is the virtual size in bytes. It is rounded up to a multiple of
	// 512, as qemu-img does.
	Size uint64
	// NoSync skips fsync. The file still appears atomically, but it may
	// vanish on a crash. It is meant only for tests and benchmarks.
	NoSync bool

	// Writes are stored in the new overlay as if a guest had made them, one
	// after the other, on a disk that read as the backing: where two
	// overlap, the later one wins. Any offset and length are allowed (the
	// expected use is whole 4 KiB blocks), but every write must end at or
	// before Size. Data is only read, during the call, and never modified.
	//
	// Every cluster a write touches is allocated whole, because QEMU reads
	// an allocated cluster entirely from the overlay; see Backing. Writing
	// zeros still allocates the cluster, so the backing's bytes there stop
	// showing through, but the zeros cost no disk space.
	Writes []Write
	// Backing holds the bytes of the backing file, which the caller must
	// have opened (the writer never opens BackingFile). It fills the parts
	// of each allocated cluster that no write covers. Only those clusters
	// are read. Bytes at or past BackingSize read as zeros, as QEMU reads a
	// backing file shorter than the disk. Backing is required when Writes
	// is not empty, and ignored when it is.
	Backing io.ReaderAt
	// BackingSize is the length of Backing in bytes. Backing must return
	// every byte below it (a short read is an error).
	BackingSize int64
}

// overlayLayout is where each structure of an overlay lives. All of it is
// decided before the first byte is written. The file is, cluster by
// cluster and in this order:
//
//	header            cluster 0: the header, the backing format extension
//	                  and the backing name
//	refcount table    rtClusters clusters; entry i points at refcount block i
//	refcount blocks   rbClusters clusters; block i holds the 16-bit
//	                  refcounts of clusters i*32768 to i*32768+32767
//	L1 table          l1Clusters clusters; entry i points at the L2 table
//	                  that maps guest bytes [i*512 MiB, (i+1)*512 MiB), or
//	                  is zero
//	L2 tables         one per L1 entry that a write touches, in L1 order
//	data clusters     one per guest cluster that a write touches, in guest
//	                  order
//
// An empty overlay has only the first four, with one refcount table
// cluster and one refcount block, so its L1 table is at cluster 3 as it
// always was. The refcount structures come before the L1 table, so the L1
// table can never overlap them; upstream's writer had that overlap at
// 10 GiB. How many refcount clusters there are depends on how many clusters
// the file has, themselves included, and sizeRefcounts settles both.
//
// Every cluster of the file is in use exactly once, so the refcounts are a
// run of ones from cluster 0, and every L1 and L2 entry has the COPIED flag
// (bit 63), which QEMU requires of a cluster whose refcount is 1.
type overlayLayout struct {
	header     []byte // cluster 0, up to and including the backing name
	size       uint64 // the virtual size, rounded up to 512
	l1Entries  uint64
	l1Clusters uint64
	rtClusters uint64
	rbClusters uint64
	// l2 holds the L1 index of each L2 table, ascending.
	l2 []uint64
	// data holds the data clusters, by ascending guest cluster.
	data     []dataCluster
	fileSize int64
}

const (
	refcountTableCluster = 1
	// refcountsPerBlock is how many 16-bit refcounts (refcount_order 4) fit
	// in one cluster.
	refcountsPerBlock = ClusterSize / 2
	// refcountTableEntries is how many refcount block offsets fit in one
	// cluster of the refcount table.
	refcountTableEntries = ClusterSize / 8
	// l2Entries is how many guest clusters one L2 table maps.
	l2Entries = ClusterSize / 8
	// copiedFlag marks an L1 or L2 entry whose cluster has refcount 1.
	copiedFlag uint64 = 1 << 63
)

func (lo *overlayLayout) rbOffset(i uint64) uint64 {
	return (refcountTableCluster + lo.rtClusters + i) * ClusterSize
}

func (lo *overlayLayout) l1Offset() uint64 { return lo.rbOffset(lo.rbClusters) }

func (lo *overlayLayout) l2Offset(j int) uint64 {
	return lo.l1Offset() + (lo.l1Clusters+uint64(j))*ClusterSize
}

func (lo *overlayLayout) dataOffset(k int) uint64 { return lo.l2Offset(len(lo.l2) + k) }

// clusters is how many clusters the file has, every one of them in use.
func (lo *overlayLayout) clusters() uint64 { return lo.dataOffset(len(lo.data)) / ClusterSize }

// sizeRefcounts sizes the refcount structures for the rest of lo and
// with them the file.
func (lo *overlayLayout) sizeRefcounts() {
	other := 1 + lo.l1Clusters + uint64(len(lo.l2)) + uint64(len(lo.data))
	lo.rtClusters, lo.rbClusters = refcountClusters(other)
	lo.fileSize = int64(lo.clusters() * ClusterSize)
}

// refcountClusters returns the fewest refcount table clusters and refcount
// blocks that cover a file of other clusters plus themselves. Adding
// refcount clusters may call for another refcount block, so it repeats
// until the counts stop growing; each round adds about 32768 times fewer
// clusters than the one before, so it settles at once. Both are at least
// 1, as an empty overlay has always had.
func refcountClusters(other uint64) (rt, rb uint64) {
	rt, rb = 1, 1
	for {
		n := other + rt + rb
		nrb := max(rb, (n+refcountsPerBlock-1)/refcountsPerBlock)
		nrt := max(rt, (nrb+refcountTableEntries-1)/refcountTableEntries)
		if nrb == rb && nrt == rt {
			return rt, rb
		}
		rt, rb = nrt, nrb
	}
}

// validate checks the options and returns the size rounded up to 512.
func (o *OverlayOptions) validate() (uint64, error) {
	switch {
	case o.BackingFile == "":
		return 0, fmt.Errorf("%w: backing file name is empty", ErrInvalidOption)
	case len(o.BackingFile) > MaxBackingNameLen:
		return 0, fmt.Errorf("%w: backing file name is %d bytes, and at most %d are allowed", ErrInvalidOption, len(o.BackingFile), MaxBackingNameLen)
	case containsNUL(o.BackingFile):
		return 0, fmt.Errorf("%w: backing file name %q contains NUL", ErrInvalidOption, o.BackingFile)
	case !utf8.ValidString(o.BackingFile):
		// The reader refuses such names, so the writer never writes one.
		return 0, fmt.Errorf("%w: backing file name %q is not valid UTF-8", ErrInvalidOption, o.BackingFile)
	}
	if o.BackingFormat != FormatRaw && o.BackingFormat != FormatQcow2 {
		return 0, fmt.Errorf("%w: backing format %q is neither %q nor %q", ErrInvalidOption, o.BackingFormat, FormatRaw, FormatQcow2)
	}
	if o.Size == 0 {
		return 0, fmt.Errorf("%w: virtual size is zero", ErrInvalidOption)
	}
	if o.Size > MaxVirtualSize {
		return 0, fmt.Errorf("%w: virtual size %d exceeds the maximum %d", ErrInvalidOption, o.Size, MaxVirtualSize)
	}
	if err := o.validateWrites(); err != nil {
		return 0, err
	}
	return (o.Size + 511) &^ 511, nil
}

func containsNUL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return true
		}
	}
	return false
}

// layout places every structure for options that validate accepted.
func (o *OverlayOptions) layout(size uint64) overlayLayout {
	lo := overlayLayout{size: size}
	lo.l1Entries = l1Entries(size, ClusterBits)
	lo.l1Clusters = (lo.l1Entries*8 + ClusterSize - 1) / ClusterSize
	if lo.l1Clusters == 0 {
		lo.l1Clusters = 1
	}
	lo.data = planData(o.Writes)
	for _, dc := range lo.data {
		if l1 := dc.guest / l2Entries; len(lo.l2) == 0 || lo.l2[len(lo.l2)-1] != l1 {
			lo.l2 = append(lo.l2, l1)
		}
	}
	lo.sizeRefcounts()

	extLen := 8 + pad8(len(o.BackingFormat))
	nameOff := v3HeaderLen + extLen + 8
	b := make([]byte, nameOff+len(o.BackingFile))
	h := Header{
		Version:               3,
		BackingFileOffset:     uint64(nameOff),
		BackingFileSize:       uint32(len(o.BackingFile)),
		ClusterBits:           ClusterBits,
		Size:                  size,
		L1Size:                uint32(lo.l1Entries),
		L1TableOffset:         lo.l1Offset(),
		RefcountTableOffset:   refcountTableCluster * ClusterSize,
		RefcountTableClusters: uint32(lo.rtClusters),
		RefcountOrder:         4,
		HeaderLength:          v3HeaderLen,
	}
	h.marshal(b)
	binary.BigEndian.PutUint32(b[v3HeaderLen:], extBackingFormat)
	binary.BigEndian.PutUint32(b[v3HeaderLen+4:], uint32(len(o.BackingFormat)))
	copy(b[v3HeaderLen+8:], o.BackingFormat)
	// The end-of-extensions marker is the 8 zero bytes before the name.
	copy(b[nameOff:], o.BackingFile)
	lo.header = b
	return lo
}

// CreateOverlay writes a qcow2 v3 overlay at path over the given backing
// file. Without opts.Writes it is empty: every read of the new image falls
// through to the backing. With them, the clusters they touch are stored in
// the overlay (the rest of each such cluster copied from opts.Backing), and
// every other read still falls through.
//
// The file appears at path only when it is complete. It is written as an
// unnamed O_TMPFILE in the same directory (or as a dot-named temp file where
// O_TMPFILE is unsupported), its data is written out, and then it is linked
// into place and synced. Syncing after the link costs one journal commit,
// where the classic sequence of fsync, rename and fsync of the directory
// costs two, and the guarantee is the same: after a crash the path is
// either absent or complete.
//
// Linking never replaces an existing file. If path exists, the error wraps
// fs.ErrExist and the existing file is untouched.
//
// Only the 4 KiB pieces of the file that are not all zeros are written, the
// rest being left as holes. An empty overlay allocates three filesystem
// blocks whatever its virtual size (the header and the two refcount
// structures). Writes add, for each data cluster, its nonzero 4 KiB pieces
// (the written blocks and whatever of the backing shows around them), one
// or a few blocks for each L2 table, and one block for each 4 KiB page of
// the L1 table with an entry in it.
func CreateOverlay(ctx context.Context, path string, opts OverlayOptions) error {
	dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	defer dir.Close()
	return CreateOverlayAt(ctx, dir, filepath.Base(path), opts)
}

// CreateOverlayAt is CreateOverlay for the entry name in the directory open
// as dir (an O_PATH descriptor is enough). Every file operation is relative
// to dir, so nothing is created outside it even if the path dir was opened
// by has since been replaced with a symbolic link; name must be a single
// path component. Errors name dir.Name()/name.
func CreateOverlayAt(ctx context.Context, dir *os.File, name string, opts OverlayOptions) error {
	path := filepath.Join(dir.Name(), name)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("create overlay %s: %w: %q is not a single file name", path, ErrInvalidOption, name)
	}
	size, err := opts.validate()
	if err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	lo := opts.layout(size)
	dfd := int(dir.Fd())

	f, tmpName, err := openUnnamed(dir)
	if err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	ok := false
	defer func() {
		f.Close()
		if !ok && tmpName != "" {
			unix.Unlinkat(dfd, tmpName, 0)
		}
	}()

	if err := writeOverlay(ctx, f, &lo, &opts); err != nil {
		return fmt.Errorf("create overlay %s: write the new file: %w", path, err)
	}
	if !opts.NoSync {
		// Write the data out, without a journal commit, before the file
		// gets its name. Then no commit can publish the name while the data
		// is still only in the page cache.
		if err := unix.SyncFileRange(int(f.Fd()), 0, 0,
			unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
			return fmt.Errorf("create overlay %s: sync_file_range: %w", path, err)
		}
	}
	if err := linkInto(f, dfd, tmpName, name); err != nil {
		return fmt.Errorf("create overlay %s: %w", path, err)
	}
	ok = true
	if tmpName != "" {
		// The final name holds the inode now. A leftover temp name would
		// only be clutter, so a failure to remove it is not fatal.
		_ = unix.Unlinkat(dfd, tmpName, 0)
	}
	if !opts.NoSync {
		// One commit makes the inode, its block map and the new directory
		// entry durable together, because the link updated the inode in the
		// same journal transaction as the entry. The cache flush before the
		// commit record also makes the data written above durable.
		if err := f.Sync(); err != nil {
			return fmt.Errorf("create overlay %s: fsync: %w", path, err)
		}
		// On ext4 and XFS the entry is already durable, and this costs no
		// commit. It covers filesystems that log directories separately.
		if err := syncDir(dir); err != nil {
			return fmt.Errorf("create overlay %s: %w", path, err)
		}
	}
	return nil
}

// writeOverlay writes every structure of lo into f, a new and empty file,
// so every byte it does not write reads as zero. It writes only the 4 KiB
// pieces that are not all zeros (see writeSparse): an L1 table, L2 table
// or data cluster that is mostly zeros costs only its nonzero pieces of
// disk space.
func writeOverlay(ctx context.Context, f *os.File, lo *overlayLayout, opts *OverlayOptions) error {
	be := binary.BigEndian
	if err := writeSparse(f, lo.header, 0); err != nil {
		return err
	}

	// Refcount table entry i points at refcount block i.
	rt := make([]byte, lo.rbClusters*8)
	for i := range lo.rbClusters {
		be.PutUint64(rt[i*8:], lo.rbOffset(i))
	}
	if err := writeSparse(f, rt, refcountTableCluster*ClusterSize); err != nil {
		return err
	}

	// Every cluster of the file has a refcount of exactly 1; QEMU reports
	// any other value as a leak or as corruption. The refcount blocks are
	// contiguous, so the refcounts of clusters 0 to n-1 are one run of n
	// 16-bit ones from the first block, written a cluster at a time.
	ones := make([]byte, min(lo.clusters()*2, ClusterSize))
	for i := 0; i < len(ones); i += 2 {
		be.PutUint16(ones[i:], 1)
	}
	for off, end := lo.rbOffset(0), lo.rbOffset(0)+lo.clusters()*2; off < end; off += uint64(len(ones)) {
		if err := writeSparse(f, ones[:min(uint64(len(ones)), end-off)], int64(off)); err != nil {
			return err
		}
	}

	// The L1 table is zero but for the entries of the L2 tables, so only
	// the 4 KiB pages of it that hold one are written. An empty overlay's
	// L1 table is all hole.
	var page [sparseBlock]byte
	pageOff := lo.l1Offset()
	for j, l1 := range lo.l2 {
		off := lo.l1Offset() + l1*l1EntrySize
		if p := off &^ (sparseBlock - 1); p != pageOff {
			if err := writeSparse(f, page[:], int64(pageOff)); err != nil {
				return err
			}
			clear(page[:])
			pageOff = p
		}
		be.PutUint64(page[off-pageOff:], lo.l2Offset(j)|copiedFlag)
	}
	if err := writeSparse(f, page[:], int64(pageOff)); err != nil {
		return err
	}

	// Each L2 table maps the data clusters of its 512 MiB of the disk,
	// which are contiguous in lo.data because both are in guest order.
	buf := make([]byte, ClusterSize)
	k := 0
	for j, l1 := range lo.l2 {
		if err := ctx.Err(); err != nil {
			return err
		}
		clear(buf)
		for ; k < len(lo.data) && lo.data[k].guest/l2Entries == l1; k++ {
			be.PutUint64(buf[lo.data[k].guest%l2Entries*8:], lo.dataOffset(k)|copiedFlag)
		}
		if err := writeSparse(f, buf, int64(lo.l2Offset(j))); err != nil {
			return err
		}
	}

	// Backing reads and data writes are the part that grows with the
	// writes asked for, so cancellation is checked once a cluster.
	for k := range lo.data {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := lo.data[k].fill(buf, opts, lo.size); err != nil {
			return err
		}
		if err := writeSparse(f, buf, int64(lo.dataOffset(k))); err != nil {
			return err
		}
	}
	// The file ends with its last cluster, whatever holes it ends with.
	return f.Truncate(lo.fileSize)
}

// openUnnamed opens a file in dir that has no name yet, so a crash before
// linkInto leaves nothing behind. On filesystems without O_TMPFILE it
// creates a dot-named temp file instead, and returns its name in dir as
// tmpName for the caller to clean up.
func openUnnamed(dir *os.File) (*os.File, string, error) {
	dfd := int(dir.Fd())
	fd, err := unix.Openat(dfd, ".", unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o644)
	if err == nil {
		return os.NewFile(uintptr(fd), filepath.Join(dir.Name(), "(unnamed)")), "", nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EINVAL) {
		return nil, "", fmt.Errorf("open temp file in %s: %w", dir.Name(), err)
	}
	for range 100 {
		var r [8]byte
		if _, err := rand.Read(r[:]); err != nil {
			return nil, "", err
		}
		name := ".qcow2-" + hex.EncodeToString(r[:]) + ".tmp"
		fd, err := unix.Openat(dfd, name, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return nil, "", fmt.Errorf("create temp file in %s: %w", dir.Name(), err)
		}
		return os.NewFile(uintptr(fd), filepath.Join(dir.Name(), name)), name, nil
	}
	return nil, "", fmt.Errorf("create temp file in %s: %w", dir.Name(), unix.EEXIST)
}

// linkInto gives the file the name name in the directory dfd without ever
// replacing one. Its errors do not name the path, because the caller's
// error does.
func linkInto(f *os.File, dfd int, tmpName, name string) error {
	if tmpName != "" {
		if err := unix.Linkat(dfd, tmpName, dfd, name, 0); err != nil {
			return fmt.Errorf("link the new file into place: %w", err)
		}
		return nil
	}
	// Linking with AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, and without it
	// the kernel returns ENOENT. Linking through /proc needs no capability.
	err := unix.Linkat(int(f.Fd()), "", dfd, name, unix.AT_EMPTY_PATH)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOENT) {
		procPath := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
		err = unix.Linkat(unix.AT_FDCWD, procPath, dfd, name, unix.AT_SYMLINK_FOLLOW)
	}
	if err != nil {
		return fmt.Errorf("link the new file into place: %w", err)
	}
	return nil
}

// syncDir makes a new directory entry in dir durable. dir may be an O_PATH
// descriptor, which cannot be fsynced, so the directory is opened again
// through it.
func syncDir(dir *os.File) error {
	fd, err := unix.Openat(int(dir.Fd()), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory %s for fsync: %w", dir.Name(), err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir.Name(), err)
	}
	return nil
}
