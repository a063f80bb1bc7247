package source

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations naming an entry of an OCI layout's index.json.
const (
	annotationRefName       = "org.opencontainers.image.ref.name"
	annotationContainerName = "io.containerd.image.name"
)

// blobStore reads files of an OCI layout, by slash path from its root.
type blobStore interface {
	open(name string) (io.ReadCloser, int64, error)
}

// dirStore is an OCI layout directory.
type dirStore struct{ root string }

func (d dirStore) open(name string) (io.ReadCloser, int64, error) {
	f, err := os.Open(filepath.Join(d.root, filepath.FromSlash(name)))
	if err != nil {
		return nil, 0, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, fmt.Errorf("%s: not a regular file", f.Name())
	}
	return f, st.Size(), nil
}

// tarStore is a tar of an OCI layout, read in place: the archive is
// scanned once for the offsets of its regular files, and each open reads a
// section of it.
type tarStore struct {
	file    string
	entries map[string]tarEntry
}

type tarEntry struct{ off, size int64 }

func cleanTarName(n string) string {
	return strings.TrimPrefix(path.Clean("/"+n), "/")
}

func indexTar(file string) (*tarStore, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", file)
	}
	ts := &tarStore{file: file, entries: map[string]tarEntry{}}
	links := map[string]string{}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: not a readable tar archive: %w", file, err)
		}
		n := cleanTarName(hdr.Name)
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeGNUSparse:
			if hdr.Typeflag == tar.TypeGNUSparse || isPAXSparse(hdr) {
				delete(ts.entries, n) // cannot be read as one section
				continue
			}
			// archive/tar does not read ahead: the file offset is the
			// start of this entry's data.
			off, err := f.Seek(0, io.SeekCurrent)
			if err != nil {
				return nil, err
			}
			if off+hdr.Size > st.Size() {
				return nil, fmt.Errorf("%s: truncated tar archive", file)
			}
			ts.entries[n] = tarEntry{off: off, size: hdr.Size}
			delete(links, n)
		case tar.TypeLink:
			links[n] = cleanTarName(hdr.Linkname)
			delete(ts.entries, n)
		}
	}
	for n, target := range links {
		if e, ok := ts.entries[target]; ok {
			ts.entries[n] = e
		}
	}
	return ts, nil
}

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

type sectionFile struct {
	io.Reader
	f *os.File
}

func (s *sectionFile) Close() error { return s.f.Close() }

// ociLayout reads an OCI image layout from a blobStore.
type ociLayout struct {
	store blobStore
	max   int64
}

func blobName(h v1.Hash) (string, error) {
	if err := validDigest(h.String()); err != nil {
		return "", err
	}
	return "blobs/" + h.Algorithm + "/" + h.Hex, nil
}

// readSmall reads a whole file of at most max bytes.
func (l *ociLayout) readSmall(name, what string) ([]byte, error) {
	rc, size, err := l.store.open(name)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	if size > l.max {
		return nil, &ManifestTooLargeError{What: what, Size: size, Limit: l.max}
	}
	b, err := io.ReadAll(io.LimitReader(rc, l.max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > l.max {
		return nil, &ManifestTooLargeError{What: what, Size: -1, Limit: l.max}
	}
	return b, nil
}

// readBlob reads a small blob and checks its digest.
func (l *ociLayout) readBlob(h v1.Hash, what string) ([]byte, error) {
	n, err := blobName(h)
	if err != nil {
		return nil, err
	}
	b, err := l.readSmall(n, what)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, &notFoundError{msg: fmt.Sprintf("%s %s: no such blob in the layout", what, h)}
		}
		return nil, err
	}
	if got, err := digestOf(h.Algorithm, b); err != nil || got != h {
		return nil, fmt.Errorf("%s %s: blob content does not match its digest", what, h)
	}
	return b, nil
}

func digestOf(algo string, b []byte) (v1.Hash, error) {
	hr, err := v1.Hasher(algo)
	if err != nil {
		return v1.Hash{}, err
	}
	hr.Write(b)
	return v1.Hash{Algorithm: algo, Hex: hex.EncodeToString(hr.Sum(nil))}, nil
}

// sniffMediaType guesses the media type of a manifest-like document that
// came without a descriptor.
func sniffMediaType(b []byte) types.MediaType {
	var doc struct {
		MediaType types.MediaType `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
		Config    json.RawMessage `json:"config"`
	}
	if json.Unmarshal(b, &doc) != nil {
		return ""
	}
	switch {
	case doc.MediaType != "":
		return doc.MediaType
	case doc.Manifests != nil:
		return types.OCIImageIndex
	case doc.Config != nil:
		return types.OCIManifestSchema1
	}
	return ""
}

func entryNames(ms []v1.Descriptor) string {
	var names []string
	for _, d := range ms {
		n := d.Annotations[annotationRefName]
		if n == "" {
			n = d.Annotations[annotationContainerName]
		}
		if n == "" {
			n = "@" + d.Digest.String()
		}
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) > 20 {
		names = append(names[:20], fmt.Sprintf("and %d more", len(names)-20))
	}
	return strings.Join(names, ", ")
}

// selectTop picks the index.json entry (or blob) the reference names.
func (l *ociLayout) selectTop(ref Ref, idx *v1.IndexManifest) (v1.Descriptor, error) {
	switch {
	case ref.tag != "":
		var found []v1.Descriptor
		for _, d := range idx.Manifests {
			if d.Annotations[annotationRefName] == ref.tag || d.Annotations[annotationContainerName] == ref.tag {
				if len(found) == 0 || found[0].Digest != d.Digest {
					found = append(found, d)
				}
			}
		}
		switch len(found) {
		case 0:
			return v1.Descriptor{}, &notFoundError{msg: fmt.Sprintf("no image named %q in the layout; it has: %s", ref.tag, entryNames(idx.Manifests))}
		case 1:
			return found[0], nil
		}
		return v1.Descriptor{}, &InvalidReferenceError{Ref: ref.String(), Reason: fmt.Sprintf("%d different images are named %q in the layout; use @<digest>", len(found), ref.tag)}
	case ref.digest != "":
		h, err := v1.NewHash(ref.digest)
		if err != nil {
			return v1.Descriptor{}, &InvalidReferenceError{Ref: ref.String(), Reason: err.Error()}
		}
		for _, d := range idx.Manifests {
			if d.Digest == h {
				return d, nil
			}
		}
		// Not a top-level entry: any manifest or index blob will do, e.g.
		// a platform manifest inside an index (what Image.Pinned names).
		b, err := l.readBlob(h, "manifest")
		if err != nil {
			return v1.Descriptor{}, err
		}
		return v1.Descriptor{MediaType: sniffMediaType(b), Digest: h, Size: int64(len(b))}, nil
	}
	switch len(idx.Manifests) {
	case 0:
		return v1.Descriptor{}, &notFoundError{msg: "the layout holds no image"}
	case 1:
		return idx.Manifests[0], nil
	}
	return v1.Descriptor{}, &InvalidReferenceError{Ref: ref.String(), Reason: fmt.Sprintf(
		"the layout holds %d images (%s); name one with :<name> or @<digest>", len(idx.Manifests), entryNames(idx.Manifests))}
}

func resolveLayout(ctx context.Context, ref Ref, opts *Options) (*Image, error) {
	fail := func(err error) (*Image, error) { return nil, wrap(ref, "", credInfo{}, err) }
	var store blobStore
	if ref.transport == TransportOCI {
		st, err := os.Stat(ref.path)
		if err != nil {
			return fail(err)
		}
		if !st.IsDir() {
			return fail(fmt.Errorf("%s is not a directory", ref.path))
		}
		store = dirStore{root: ref.path}
	} else {
		ts, err := indexTar(ref.path)
		if err != nil {
			return fail(err)
		}
		store = ts
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	l := &ociLayout{store: store, max: opts.MaxManifestBytes}

	if b, err := l.readSmall("oci-layout", "oci-layout"); err == nil {
		var ol struct {
			Version string `json:"imageLayoutVersion"`
		}
		if json.Unmarshal(b, &ol) != nil || !strings.HasPrefix(ol.Version, "1.") {
			return fail(fmt.Errorf("unsupported oci-layout file (want imageLayoutVersion 1.x)"))
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fail(err)
	}
	raw, err := l.readSmall("index.json", "index.json")
	if errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("not an OCI image layout (no index.json): %w", err))
	}
	if err != nil {
		return fail(err)
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
	if err != nil {
		return fail(fmt.Errorf("index.json: %w", err))
	}
	desc, err := l.selectTop(ref, idx)
	if err != nil {
		return fail(err)
	}

	var indexDigest v1.Hash
	var platform *v1.Platform
	for depth := 0; ; depth++ {
		if desc.Size > l.max {
			return fail(&ManifestTooLargeError{What: "manifest " + desc.Digest.String(), Size: desc.Size, Limit: l.max})
		}
		b, err := l.readBlob(desc.Digest, "manifest")
		if err != nil {
			return fail(err)
		}
		mt := desc.MediaType
		if mt == "" {
			mt = sniffMediaType(b)
		}
		switch {
		case mt.IsImage():
			core := &layoutImage{l: l, raw: b, mediaType: mt}
			img, err := partial.CompressedToImage(core)
			if err != nil {
				return fail(err)
			}
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
			return finish(ref, img, indexDigest, platform, opts, fail)
		case mt.IsIndex():
			if depth >= 2 {
				return fail(fmt.Errorf("indexes nested too deep at %s", desc.Digest))
			}
			im, err := v1.ParseIndexManifest(bytes.NewReader(b))
			if err != nil {
				return fail(fmt.Errorf("index %s: %w", desc.Digest, err))
			}
			child, offered, ok := pickPlatform(im, *opts.Platform)
			if !ok {
				return fail(&PlatformNotFoundError{Ref: ref.String(), Want: platformString(*opts.Platform), Offered: offered})
			}
			indexDigest, platform, desc = desc.Digest, child.Platform, child
		default:
			return fail(fmt.Errorf("%s has media type %q, which is neither an image manifest nor an index", desc.Digest, mt))
		}
	}
}

// layoutImage is a partial.CompressedImageCore over a layout.
type layoutImage struct {
	l         *ociLayout
	raw       []byte
	mediaType types.MediaType

	cfgOnce sync.Once
	cfg     []byte
	cfgErr  error
}

func (li *layoutImage) RawManifest() ([]byte, error)        { return li.raw, nil }
func (li *layoutImage) MediaType() (types.MediaType, error) { return li.mediaType, nil }

func (li *layoutImage) RawConfigFile() ([]byte, error) {
	li.cfgOnce.Do(func() {
		m, err := partial.Manifest(li)
		if err != nil {
			li.cfgErr = err
			return
		}
		li.cfg, li.cfgErr = li.l.readBlob(m.Config.Digest, "image config")
	})
	return li.cfg, li.cfgErr
}

func (li *layoutImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	m, err := partial.Manifest(li)
	if err != nil {
		return nil, err
	}
	for _, d := range m.Layers {
		if d.Digest == h {
			return &layoutLayer{img: li, desc: d}, nil
		}
	}
	return nil, &notFoundError{msg: fmt.Sprintf("layer %s is not in manifest", h)}
}

// layoutLayer is one layer blob; reading it checks size and digest.
type layoutLayer struct {
	img  *layoutImage
	desc v1.Descriptor
}

func (ll *layoutLayer) Digest() (v1.Hash, error)            { return ll.desc.Digest, nil }
func (ll *layoutLayer) Size() (int64, error)                { return ll.desc.Size, nil }
func (ll *layoutLayer) MediaType() (types.MediaType, error) { return ll.desc.MediaType, nil }
func (ll *layoutLayer) Descriptor() (*v1.Descriptor, error) { d := ll.desc; return &d, nil }

// DiffID comes from the config, not from reading the layer.
func (ll *layoutLayer) DiffID() (v1.Hash, error) {
	img, err := partial.CompressedToImage(ll.img)
	if err != nil {
		return v1.Hash{}, err
	}
	return partial.BlobToDiffID(img, ll.desc.Digest)
}

func (ll *layoutLayer) Compressed() (io.ReadCloser, error) {
	n, err := blobName(ll.desc.Digest)
	if err != nil {
		return nil, err
	}
	rc, size, err := ll.img.l.store.open(n)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, &notFoundError{msg: fmt.Sprintf("layer %s: no such blob in the layout", ll.desc.Digest)}
		}
		return nil, err
	}
	if size != ll.desc.Size {
		rc.Close()
		return nil, fmt.Errorf("layer %s: blob has %d bytes, the manifest says %d", ll.desc.Digest, size, ll.desc.Size)
	}
	hr, err := v1.Hasher(ll.desc.Digest.Algorithm)
	if err != nil {
		rc.Close()
		return nil, err
	}
	return &verifyReader{rc: rc, h: hr, want: ll.desc.Digest, left: size}, nil
}

// verifyReader fails at EOF if the content does not match the digest.
type verifyReader struct {
	rc   io.ReadCloser
	h    hash.Hash
	want v1.Hash
	left int64
	err  error
}

func (v *verifyReader) Read(b []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.rc.Read(b)
	v.h.Write(b[:n])
	v.left -= int64(n)
	if err == io.EOF {
		if v.left != 0 || hex.EncodeToString(v.h.Sum(nil)) != v.want.Hex {
			v.err = fmt.Errorf("layer %s: blob content does not match its digest", v.want)
			return n, v.err
		}
	}
	if err != nil {
		v.err = err
	}
	return n, err
}

func (v *verifyReader) Close() error { return v.rc.Close() }

func resolveDockerArchive(ctx context.Context, ref Ref, opts *Options) (*Image, error) {
	fail := func(err error) (*Image, error) { return nil, wrap(ref, "", credInfo{}, err) }
	st, err := os.Stat(ref.path)
	if err != nil {
		return fail(err)
	}
	if !st.Mode().IsRegular() {
		return fail(fmt.Errorf("%s is not a regular file", ref.path))
	}
	opener := func() (io.ReadCloser, error) { return os.Open(ref.path) }
	m, err := tarball.LoadManifest(opener)
	if err != nil {
		return fail(fmt.Errorf("not a docker-archive (manifest.json): %w", err))
	}
	tags := func() string {
		var all []string
		for _, d := range m {
			all = append(all, d.RepoTags...)
		}
		if len(all) == 0 {
			return "no tags"
		}
		return strings.Join(all, ", ")
	}
	var img v1.Image
	switch {
	case ref.tag != "":
		want, err := name.NewTag(ref.tag)
		if err != nil {
			return fail(&InvalidReferenceError{Ref: ref.String(), Reason: err.Error()})
		}
		found := false
		for _, d := range m {
			for _, t := range d.RepoTags {
				if have, err := name.NewTag(t); err == nil && have.Name() == want.Name() {
					found = true
				}
			}
		}
		if !found {
			return fail(&notFoundError{msg: fmt.Sprintf("no image tagged %q in the archive; it has: %s", ref.tag, tags())})
		}
		if img, err = tarball.Image(opener, &want); err != nil {
			return fail(err)
		}
	case ref.digest != "":
		for _, d := range m {
			var tag *name.Tag
			if len(d.RepoTags) > 0 {
				t, err := name.NewTag(d.RepoTags[0])
				if err != nil {
					continue
				}
				tag = &t
			} else if len(m) != 1 {
				continue // untagged images of multi-image archives cannot be addressed
			}
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
			cand, err := tarball.Image(opener, tag)
			if err != nil {
				return fail(err)
			}
			if h, err := cand.Digest(); err == nil && h.String() == ref.digest {
				img = cand
				break
			}
		}
		if img == nil {
			return fail(&notFoundError{msg: fmt.Sprintf("no image with manifest digest %s in the archive", ref.digest)})
		}
	default:
		if len(m) != 1 {
			return fail(&InvalidReferenceError{Ref: ref.String(), Reason: fmt.Sprintf(
				"the archive holds %d images (%s); name one with :<repo:tag> or @<digest>", len(m), tags())})
		}
		if img, err = tarball.Image(opener, nil); err != nil {
			return fail(err)
		}
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	return finish(ref, img, v1.Hash{}, nil, opts, fail)
}
