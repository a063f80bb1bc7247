package source

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// blobStore reads the files of an OCI layout, by slash-separated path from
// the layout's root.
type blobStore interface {
	open(name string) (io.ReadCloser, int64, error)
}

// dirStore is an OCI layout directory (the oci: transport).
type dirStore struct{ root string }

func (d dirStore) open(name string) (io.ReadCloser, int64, error) {
	f, size, err := openRegular(filepath.Join(d.root, filepath.FromSlash(name)))
	if err != nil {
		return nil, 0, err
	}
	return f, size, nil
}

// tarStore is a tar of an OCI layout (the oci-archive: transport), read in
// place. indexTar scans the archive once for where the data of each
// regular file starts, and each open reads that section of the archive.
type tarStore struct {
	file    string
	entries map[string]tarEntry
}

type tarEntry struct{ off, size int64 }

// cleanTarName turns a tar entry name into a layout path, so that
// "./index.json" and "/index.json" are both "index.json".
func cleanTarName(n string) string {
	return strings.TrimPrefix(path.Clean("/"+n), "/")
}

// indexTar scans the tar file and returns a tarStore of its regular files.
func indexTar(file string) (*tarStore, error) {
	f, size, err := openRegular(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ts := &tarStore{file: file, entries: map[string]tarEntry{}}
	if err := ts.scan(f, size); err != nil {
		return nil, err
	}
	return ts, nil
}

// scan records the entries of the tar f, which has size bytes. A later
// entry of the same name replaces an earlier one, as it would on
// extraction. Hard links get their target's data. Sparse files are left
// out, because their data is not one section of the archive.
func (t *tarStore) scan(f *os.File, size int64) error {
	links := map[string]string{}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%s is not a readable tar archive: %w", t.file, err)
		}
		n := cleanTarName(hdr.Name)
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeGNUSparse:
			if hdr.Typeflag == tar.TypeGNUSparse || isPAXSparse(hdr) {
				delete(t.entries, n)
				continue
			}
			// archive/tar does not read ahead, so the file offset is where
			// this entry's data starts.
			off, err := f.Seek(0, io.SeekCurrent)
			if err != nil {
				return err
			}
			if off+hdr.Size > size {
				return fmt.Errorf("%s is a truncated tar archive", t.file)
			}
			t.entries[n] = tarEntry{off: off, size: hdr.Size}
			delete(links, n)
		case tar.TypeLink:
			links[n] = cleanTarName(hdr.Linkname)
			delete(t.entries, n)
		}
	}
	for n, target := range links {
		if e, ok := t.entries[target]; ok {
			t.entries[n] = e
		}
	}
	return nil
}

// isPAXSparse tells whether a PAX header describes a GNU sparse file.
func isPAXSparse(hdr *tar.Header) bool {
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

func (t *tarStore) open(name string) (io.ReadCloser, int64, error) {
	e, ok := t.entries[name]
	if !ok {
		return nil, 0, &fs.PathError{Op: "open", Path: t.file + ":" + name, Err: fs.ErrNotExist}
	}
	f, err := os.Open(t.file)
	if err != nil {
		return nil, 0, err
	}
	return &sectionFile{Reader: io.NewSectionReader(f, e.off, e.size), f: f}, e.size, nil
}

// sectionFile is one entry of a tarStore; closing it closes the archive.
type sectionFile struct {
	io.Reader
	f *os.File
}

func (s *sectionFile) Close() error { return s.f.Close() }
