package qcow2

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
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
	type fileID struct{ dev, ino uint64 }
	seen := map[fileID]bool{}
	var links []Link
	cur, format, referrer, name := path, FormatQcow2, "", ""
	for {
		if err := ctx.Err(); err != nil {
			return links, fmt.Errorf("walk backing chain of %s: %w", path, err)
		}
		fi, err := os.Stat(cur)
		if err != nil {
			if referrer != "" && os.IsNotExist(err) {
				return links, &MissingBackingError{Overlay: referrer, Backing: name, Err: err}
			}
			return links, &IOError{Path: cur, Op: "stat", Err: err}
		}
		if !fi.Mode().IsRegular() {
			// Opening a FIFO would block, and a device would read host
			// state. Neither is a disk that boxlite-csi made.
			return links, &ChainError{Path: path, Reason: fmt.Sprintf("%s is not a regular file (%s)", cur, fi.Mode().Type())}
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return links, &IOError{Path: cur, Op: "stat", Err: fmt.Errorf("no device and inode in %T", fi.Sys())}
		}
		id := fileID{uint64(st.Dev), st.Ino}
		if seen[id] {
			return links, &ChainError{Path: path, Reason: fmt.Sprintf("%s appears twice, so the chain loops", cur)}
		}
		seen[id] = true

		if format == "" {
			if format, err = probeFormat(cur); err != nil {
				return links, err
			}
		}
		switch format {
		case FormatRaw:
			return append(links, Link{Path: cur, Format: FormatRaw}), nil
		case FormatQcow2:
		default:
			return links, &ChainError{Path: path, Reason: fmt.Sprintf("%s names backing format %q, and only raw and qcow2 are supported", referrer, format)}
		}

		h, err := ReadHeader(cur)
		if err != nil {
			return links, err
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

// probeFormat tells qcow2 from raw by the magic, as QEMU does when an image
// does not name its backing format.
func probeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", &IOError{Path: path, Op: "open", Err: err}
	}
	defer f.Close()
	var m [4]byte
	if _, err := io.ReadFull(f, m[:]); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return FormatRaw, nil
		}
		return "", &IOError{Path: path, Op: "read", Err: err}
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

// Verify reads the overlay's header and checks it against want, without
// opening anything the header names. A well-formed header that names a
// different backing file or format, or that enables encryption, is reported
// as a *TamperedError. Errors in the header itself are returned as
// ReadHeader reports them.
func Verify(path string, want Expect) (*Header, error) {
	h, err := ReadHeader(path)
	if err != nil {
		return nil, err
	}
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
