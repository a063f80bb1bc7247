package qcow2

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// OverlayOptions describes an empty overlay to create.
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
}

// overlayLayout is where each structure of an empty overlay lives. The
// refcount structures come before the L1 table, so their positions stay
// fixed whatever the virtual size and the L1 table can never overlap them.
// Upstream's writer had that overlap at 10 GiB.
type overlayLayout struct {
	header     []byte // cluster 0, up to and including the backing name
	l1Entries  uint64
	l1Clusters uint64
	fileSize   int64
}

const (
	refcountTableCluster = 1
	refcountBlockCluster = 2
	l1FirstCluster       = 3
	// refcountsPerBlock is how many 16-bit refcounts (refcount_order 4) fit
	// in one cluster.
	refcountsPerBlock = ClusterSize / 2
)

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

func (o *OverlayOptions) layout(size uint64) overlayLayout {
	var lo overlayLayout
	lo.l1Entries = l1Entries(size, ClusterBits)
	lo.l1Clusters = (lo.l1Entries*8 + ClusterSize - 1) / ClusterSize
	if lo.l1Clusters == 0 {
		lo.l1Clusters = 1
	}
	lo.fileSize = int64((l1FirstCluster + lo.l1Clusters) * ClusterSize)

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
		L1TableOffset:         l1FirstCluster * ClusterSize,
		RefcountTableOffset:   refcountTableCluster * ClusterSize,
		RefcountTableClusters: 1,
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

// CreateOverlay writes an empty qcow2 v3 overlay at path over the given
// backing file. Every read of the new image falls through to the backing.
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
// Only the header and the two refcount structures are written, so the
// overlay allocates three filesystem blocks whatever its virtual size.
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

	if err := writeOverlay(f, lo); err != nil {
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

func writeOverlay(f *os.File, lo overlayLayout) error {
	if _, err := f.WriteAt(lo.header, 0); err != nil {
		return err
	}
	// Refcount table entry 0 points at the single refcount block.
	var rt [8]byte
	binary.BigEndian.PutUint64(rt[:], refcountBlockCluster*ClusterSize)
	if _, err := f.WriteAt(rt[:], refcountTableCluster*ClusterSize); err != nil {
		return err
	}
	// Every cluster in use (the header, the refcount table and block, and
	// the L1 table) has a refcount of exactly 1. QEMU reports any other
	// value as corruption.
	used := l1FirstCluster + lo.l1Clusters
	if used > refcountsPerBlock {
		return fmt.Errorf("internal error: %d clusters do not fit in one refcount block", used)
	}
	rb := make([]byte, used*2)
	for i := range used {
		binary.BigEndian.PutUint16(rb[i*2:], 1)
	}
	if _, err := f.WriteAt(rb, refcountBlockCluster*ClusterSize); err != nil {
		return err
	}
	// The L1 table is all zeros, so it is left as a hole.
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
