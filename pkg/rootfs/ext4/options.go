package ext4

import (
	"fmt"
	"time"
)

// Default limits. They bound what a hostile image can make the Writer do.
// Without them an image could claim a huge sparse file, unpack a
// decompression bomb, or flood the tree with tiny entries, each of which
// costs memory until Finish.
const (
	DefaultMaxTotalBytes = 64 << 30
	DefaultMaxFileSize   = 16 << 30
	DefaultMaxFiles      = 1 << 20

	maxSize = 16 << 40
)

// Options configures a Writer. The zero value is usable.
type Options struct {
	// Headroom is the free space, in bytes, the filesystem must have on top
	// of the image content, for what the guest writes.
	Headroom int64
	// HeadroomRatio adds free space in proportion to the content. For
	// example, 0.1 adds a tenth of the data's size on top of Headroom.
	// Upstream BoxLite sizes bases as content*1.1 + 64 MiB, and at least
	// 256 MiB.
	HeadroomRatio float64
	// MinSize is the smallest filesystem size in bytes. The image grows
	// beyond it when content plus Headroom need more.
	MinSize int64
	// Label is the volume label, at most 16 bytes.
	Label string
	// UUID is the filesystem UUID. The zero value picks a random one. The
	// directory hash seed is derived from it, so a fixed UUID together with
	// a fixed Time and identical layers gives a byte-identical image.
	UUID [16]byte
	// Time stamps the superblock, lost+found and directories that the
	// layers create only implicitly. Zero means time.Now().
	Time time.Time

	// MaxTotalBytes caps, in bytes, both the uncompressed layer streams
	// read over all layers (every byte: headers, padding, bodies of
	// whiteouts and skipped entries, data after the tar end) and the sum
	// of regular file sizes over all layers (including files later
	// deleted, and sparse files at their full size). 0 means
	// DefaultMaxTotalBytes.
	MaxTotalBytes int64
	// MaxFileSize caps a single regular file's size. 0 means DefaultMaxFileSize.
	MaxFileSize int64
	// MaxFiles caps the number of tar entries over all layers, plus the
	// directories they imply without an entry of their own (each costs
	// memory until Finish, and one deep path implies thousands). 0 means
	// DefaultMaxFiles.
	MaxFiles int64
}

func (o Options) withDefaults() (Options, error) {
	if o.MaxTotalBytes == 0 {
		o.MaxTotalBytes = DefaultMaxTotalBytes
	}
	if o.MaxFileSize == 0 {
		o.MaxFileSize = DefaultMaxFileSize
	}
	if o.MaxFiles == 0 {
		o.MaxFiles = DefaultMaxFiles
	}
	if o.Time.IsZero() {
		o.Time = time.Now()
	}
	switch {
	case o.Headroom < 0 || o.MinSize < 0:
		return o, fmt.Errorf("ext4: negative Headroom or MinSize")
	case !(o.HeadroomRatio >= 0 && o.HeadroomRatio <= 16):
		return o, fmt.Errorf("ext4: HeadroomRatio %v outside 0..16", o.HeadroomRatio)
	case o.MaxTotalBytes < 0 || o.MaxFileSize < 0 || o.MaxFiles < 0:
		return o, fmt.Errorf("ext4: negative limit")
	case len(o.Label) > 16:
		return o, fmt.Errorf("ext4: label %q longer than 16 bytes", o.Label)
	case o.Headroom > maxSize || o.MinSize > maxSize || o.MaxTotalBytes > maxSize || o.MaxFiles > 1<<31:
		// Keeps the descriptor table reserved for these limits well inside
		// group 0, all block arithmetic far from overflow, and the tree's
		// nodes and inodes within their 32-bit indexes.
		return o, fmt.Errorf("ext4: sizes above 16 TiB or more than 2^31 files are not supported")
	}
	return o, nil
}

// Limit names one of the Options limits, so that callers can tell which
// one an image crossed without matching strings.
type Limit int

const (
	LimitTotalBytes Limit = iota + 1 // Options.MaxTotalBytes
	LimitFileSize                    // Options.MaxFileSize
	LimitFiles                       // Options.MaxFiles
)

// String is the name of the Options field the limit comes from.
func (l Limit) String() string {
	switch l {
	case LimitTotalBytes:
		return "MaxTotalBytes"
	case LimitFileSize:
		return "MaxFileSize"
	case LimitFiles:
		return "MaxFiles"
	}
	return fmt.Sprintf("Limit(%d)", int(l))
}

// LimitError reports that the layers exceed one of the Options limits.
type LimitError struct {
	Limit Limit // which limit
	Max   int64 // its value
}

func (e *LimitError) Error() string {
	return fmt.Sprintf("limit %s (%d) exceeded", e.Limit, e.Max)
}

// EntryError reports a tar entry that cannot be applied, for example
// because its path escapes the root, a hard link points nowhere or a limit
// is crossed. It wraps the cause, such as a *LimitError.
type EntryError struct {
	Layer int    // index of the layer, 0 for the first ApplyLayer call
	Path  string // entry name as found in the tar header
	Err   error
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("ext4: layer %d: %q: %v", e.Layer, e.Path, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

// Stats describes a finished image.
type Stats struct {
	Entries       int64 // tar entries read over all layers
	Files         int64 // regular file inodes in the image
	Dirs          int64 // directories, including the root and lost+found
	Symlinks      int64
	Specials      int64 // character and block devices, FIFOs
	HardLinks     int64 // directory entries beyond the first for an inode
	DataBytes     int64 // sum of regular file sizes in the image
	LayerBytes    int64 // uncompressed layer bytes read over all layers
	Inodes        int64 // inodes in use, including reserved ones
	FreeInodes    int64
	ImageBytes    int64 // size of the filesystem (and of the file)
	FreeBytes     int64
	SkippedXattrs int64 // attributes in namespaces ext4 cannot store
	SkippedOther  int64 // entries of types an image cannot hold (sockets, ...)
}
