package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Link is one image of a backing chain.
type Link struct {
	// Path is where the image was found. A relative backing name is joined
	// to the directory of the image that names it, as QEMU does.
	Path string
	// Format is FormatQcow2 or FormatRaw.
	Format string
	// Header is nil for a raw image.
	Header *Header
}

// ResolveBacking returns the path QEMU opens for a backing name recorded in
// the image at overlayPath.
func ResolveBacking(overlayPath, backingName string) string {
	if filepath.IsAbs(backingName) {
		return backingName
	}
	return filepath.Join(filepath.Dir(overlayPath), backingName)
}

// Chain walks the backing chain that starts at the qcow2 image at path and
// returns every image in it, top first. It follows at most MaxChainDepth
// backing links and refuses a chain that visits the same file twice.
//
// Chain opens every file the chain names, so it must only be used on images
// whose backing names are trusted; Verify is the check for an overlay a
// guest could have rewritten.
func Chain(ctx context.Context, path string) ([]Link, error) {
	seen := map[fileID]bool{}
	var links []Link
	cur, format, referrer, name := path, FormatQcow2, "", ""
	for {
		if err := ctx.Err(); err != nil {
			return links, fmt.Errorf("walk backing chain of %s: %w", path, err)
		}
		var (
			h   *Header
			id  fileID
			err error
		)
		h, format, id, err = readLink(cur, format, referrer, name, path)
		if err != nil {
			return links, err
		}
		if seen[id] {
			return links, &ChainError{Path: path, Reason: fmt.Sprintf("%s appears twice, so the chain loops", cur)}
		}
		seen[id] = true
		switch format {
		case FormatRaw:
			return append(links, Link{Path: cur, Format: FormatRaw}), nil
		case FormatQcow2:
		default:
			return links, &ChainError{Path: path, Reason: fmt.Sprintf("%s names backing format %q, and only raw and qcow2 are supported", referrer, format)}
		}
		links = append(links, Link{Path: cur, Format: FormatQcow2, Header: h})
		if h.BackingFile == "" {
			return links, nil
		}
		if len(links) > MaxChainDepth {
			return links, &ChainError{Path: path, Reason: fmt.Sprintf("it has more than %d backing links", MaxChainDepth)}
		}
		referrer, name = cur, h.BackingFile
		cur, format = ResolveBacking(cur, h.BackingFile), h.BackingFormat
	}
}

type fileID struct{ dev, ino uint64 }

// readLink opens one image of a chain, once: its type, identity, format
// and header all come from the same descriptor. Links are followed, as
// QEMU follows them (Chain is for trusted chains), but nothing blocks: the
// open is O_NONBLOCK and anything but a regular file is refused before a
// byte is read. format "" is probed from the magic; the header is nil for
// anything but qcow2.
func readLink(cur, format, referrer, name, top string) (*Header, string, fileID, error) {
	fd, err := unix.Open(cur, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		if referrer != "" && errors.Is(err, unix.ENOENT) {
			return nil, "", fileID{}, &MissingBackingError{Overlay: referrer, Backing: name, Err: &os.PathError{Op: "open", Path: cur, Err: err}}
		}
		var st unix.Stat_t
		if serr := unix.Stat(cur, &st); serr == nil && st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil, "", fileID{}, &ChainError{Path: top, Reason: fmt.Sprintf("%s is not a regular file (%s)", cur, FileTypeName(st.Mode))}
		}
		return nil, "", fileID{}, &IOError{Path: cur, Op: "open", Err: err}
	}
	f := os.NewFile(uintptr(fd), cur)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, "", fileID{}, &IOError{Path: cur, Op: "stat", Err: err}
	}
	id := fileID{uint64(st.Dev), st.Ino}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		// A FIFO would feed whatever its writer sends, and a device
		// would read host state. Neither is a disk that boxlite-csi made.
		return nil, "", id, &ChainError{Path: top, Reason: fmt.Sprintf("%s is not a regular file (%s)", cur, FileTypeName(st.Mode))}
	}
	if format == "" {
		if format, err = probeFormat(f); err != nil {
			return nil, "", id, err
		}
	}
	if format != FormatQcow2 {
		return nil, format, id, nil
	}
	h, err := parseHeader(cur, f, st.Size)
	return h, format, id, err
}

// probeFormat tells qcow2 from raw by the magic, as QEMU does when an image
// does not name its backing format.
func probeFormat(f *os.File) (string, error) {
	var m [4]byte
	if _, err := f.ReadAt(m[:], 0); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return FormatRaw, nil
		}
		return "", &IOError{Path: f.Name(), Op: "read", Err: err}
	}
	if binary.BigEndian.Uint32(m[:]) == Magic {
		return FormatQcow2, nil
	}
	return FormatRaw, nil
}

// Expect is what an overlay written by boxlite-csi must say about its
// backing.
type Expect struct {
	BackingFile   string
	BackingFormat string
}

// Verify reads the overlay's header at path and checks it against want,
// without opening anything the header names. The overlay is opened as
// ReadHeader opens it (last component not followed, no blocking, regular
// files only), so Verify is for callers that own path; an overlay in a
// box is opened beneath a safeopen.Root and checked with VerifyFile.
func Verify(path string, want Expect) (*Header, error) {
	f, err := OpenImage(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return VerifyFile(f, want)
}

// VerifyFile reads the header of the overlay open as f and checks it
// against want, without opening anything the header names. A well-formed
// header that names a different backing file or format, or that enables
// encryption, is reported as a *TamperedError, and so is an f that is not
// a regular file. Errors in the header itself are returned as
// ReadHeaderFile reports them.
func VerifyFile(f *os.File, want Expect) (*Header, error) {
	h, err := ReadHeaderFile(f)
	if err != nil {
		return nil, err
	}
	path := f.Name()
	switch {
	case h.BackingFile != want.BackingFile:
		return h, &TamperedError{Path: path, Field: "backing file", Got: h.BackingFile, Want: want.BackingFile}
	case h.BackingFormat != want.BackingFormat:
		return h, &TamperedError{Path: path, Field: "backing format", Got: h.BackingFormat, Want: want.BackingFormat}
	case h.CryptMethod != 0:
		return h, &TamperedError{Path: path, Field: "crypt method", Got: fmt.Sprint(h.CryptMethod), Want: "0"}
	}
	return h, nil
}
