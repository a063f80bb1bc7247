package source

import (
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
	"sort"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations naming an entry of an OCI layout's index.json.
const (
	annotationRefName       = "org.opencontainers.image.ref.name"
	annotationContainerName = "io.containerd.image.name"
)

// maxIndexDepth is how many levels of index resolveLayout follows: an
// index may point at indexes, but those must point at image manifests.
const maxIndexDepth = 2

// ociLayout reads an OCI image layout from a blobStore. max is
// Options.MaxManifestBytes.
type ociLayout struct {
	store blobStore
	max   int64
}

// blobName returns the path of a blob in a layout.
func blobName(h v1.Hash) (string, error) {
	if err := validDigest(h.String()); err != nil {
		return "", err
	}
	return "blobs/" + h.Algorithm + "/" + h.Hex, nil
}

// readSmall reads a whole file of the layout. It fails with a
// *ManifestTooLargeError if the file is larger than l.max, without reading
// more than l.max+1 bytes of it.
func (l *ociLayout) readSmall(name, what string) ([]byte, error) {
	rc, size, err := l.store.open(name)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	if err := checkSize(what, size, l.max); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(rc, l.max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > l.max {
		// The file grew after it was opened.
		return nil, &ManifestTooLargeError{What: what, Size: -1, Limit: l.max}
	}
	return b, nil
}

// readBlob reads a small blob (an image manifest, an index or an image
// config) and checks that its content matches its digest.
func (l *ociLayout) readBlob(h v1.Hash, what string) ([]byte, error) {
	n, err := blobName(h)
	if err != nil {
		return nil, err
	}
	b, err := l.readSmall(n, what+" "+h.String())
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, &notFoundError{msg: fmt.Sprintf("the layout has no blob for %s %s", what, h)}
		}
		return nil, err
	}
	if got, err := digestOf(h.Algorithm, b); err != nil || got != h {
		return nil, fmt.Errorf("the content of %s %s does not match its digest", what, h)
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

// docKind names what a descriptor with media type mt points at, for
// messages. An empty or unknown media type could be either.
func docKind(mt types.MediaType) string {
	switch {
	case mt.IsIndex():
		return "index"
	case mt.IsImage():
		return "image manifest"
	}
	return "image manifest or index"
}

// sniffMediaType guesses the media type of an image manifest or index that
// was found without a descriptor saying what it is.
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

// entryNames lists the names of index.json's entries for messages, at most
// 20 of them. An entry without a name is shown as @<digest>.
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

// selectTop picks the index.json entry, or the blob, that the reference
// names.
func (l *ociLayout) selectTop(ref Ref, idx *v1.IndexManifest) (v1.Descriptor, error) {
	switch {
	case ref.tag != "":
		return selectByName(ref, idx)
	case ref.digest != "":
		return l.selectByDigest(ref, idx)
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

// selectByName picks the index.json entry named ref.tag. Several entries
// may carry the name if they point at the same digest.
func selectByName(ref Ref, idx *v1.IndexManifest) (v1.Descriptor, error) {
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
}

// selectByDigest picks the index.json entry with digest ref.digest. If
// there is none, any image manifest or index blob with that digest will do,
// such as a platform manifest inside an index (which is what Image.Pinned
// names).
func (l *ociLayout) selectByDigest(ref Ref, idx *v1.IndexManifest) (v1.Descriptor, error) {
	h, err := v1.NewHash(ref.digest)
	if err != nil {
		return v1.Descriptor{}, &InvalidReferenceError{Ref: ref.String(), Reason: err.Error()}
	}
	for _, d := range idx.Manifests {
		if d.Digest == h {
			return d, nil
		}
	}
	b, err := l.readBlob(h, docKind(""))
	if err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{MediaType: sniffMediaType(b), Digest: h, Size: int64(len(b))}, nil
}

// openLayout returns the blobStore of an oci: directory or an oci-archive:
// tar.
func openLayout(ref Ref) (blobStore, error) {
	if ref.transport == TransportOCIArchive {
		return indexTar(ref.path)
	}
	st, err := os.Stat(ref.path)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", ref.path)
	}
	return dirStore{root: ref.path}, nil
}

// checkVersion checks the oci-layout file, if there is one.
func (l *ociLayout) checkVersion() error {
	b, err := l.readSmall("oci-layout", "oci-layout")
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var ol struct {
		Version string `json:"imageLayoutVersion"`
	}
	if json.Unmarshal(b, &ol) != nil || !strings.HasPrefix(ol.Version, "1.") {
		return errors.New("the oci-layout file does not say imageLayoutVersion 1.x, the only version this plugin reads")
	}
	return nil
}

// readIndex reads and parses index.json.
func (l *ociLayout) readIndex() (*v1.IndexManifest, error) {
	raw, err := l.readSmall("index.json", "index.json")
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("this is not an OCI image layout because it has no index.json: %w", err)
	}
	if err != nil {
		return nil, err
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("index.json is not a valid image index: %w", err)
	}
	return idx, nil
}

func resolveLayout(ctx context.Context, ref Ref, opts *Options) (*Image, error) {
	fail := localFail(ref)
	store, err := openLayout(ref)
	if err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	l := &ociLayout{store: store, max: opts.MaxManifestBytes}
	if err := l.checkVersion(); err != nil {
		return fail(err)
	}
	idx, err := l.readIndex()
	if err != nil {
		return fail(err)
	}
	desc, err := l.selectTop(ref, idx)
	if err != nil {
		return fail(err)
	}
	return l.descend(ctx, ref, desc, opts)
}

// descend reads the image manifest or index desc points at. An index is
// narrowed to opts.Platform and the entry picked is read in turn, until an
// image manifest is reached.
func (l *ociLayout) descend(ctx context.Context, ref Ref, desc v1.Descriptor, opts *Options) (*Image, error) {
	fail := localFail(ref)
	var indexDigest v1.Hash
	var platform *v1.Platform
	for depth := 0; ; depth++ {
		what := docKind(desc.MediaType)
		if err := checkSize(what+" "+desc.Digest.String(), desc.Size, l.max); err != nil {
			return fail(err)
		}
		b, err := l.readBlob(desc.Digest, what)
		if err != nil {
			return fail(err)
		}
		mt := desc.MediaType
		if mt == "" {
			mt = sniffMediaType(b)
		}
		switch {
		case mt.IsImage():
			img, err := partial.CompressedToImage(&layoutImage{l: l, raw: b, mediaType: mt})
			if err != nil {
				return fail(err)
			}
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
			return finish(ref, img, indexDigest, platform, opts, fail)
		case mt.IsIndex():
			if depth >= maxIndexDepth {
				return fail(fmt.Errorf("index %s is nested too deep: only %d levels of index are followed", desc.Digest, maxIndexDepth))
			}
			im, err := v1.ParseIndexManifest(bytes.NewReader(b))
			if err != nil {
				return fail(fmt.Errorf("index %s is not valid: %w", desc.Digest, err))
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
	raw       []byte // the image manifest
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
	return nil, &notFoundError{msg: fmt.Sprintf("layer %s is not in the image manifest", h)}
}

// layoutLayer is one layer blob. Reading it checks its size and digest.
type layoutLayer struct {
	img  *layoutImage
	desc v1.Descriptor
}

func (ll *layoutLayer) Digest() (v1.Hash, error)            { return ll.desc.Digest, nil }
func (ll *layoutLayer) Size() (int64, error)                { return ll.desc.Size, nil }
func (ll *layoutLayer) MediaType() (types.MediaType, error) { return ll.desc.MediaType, nil }
func (ll *layoutLayer) Descriptor() (*v1.Descriptor, error) { d := ll.desc; return &d, nil }

// DiffID comes from the image config, without reading the layer.
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
			return nil, &notFoundError{msg: fmt.Sprintf("the layout has no blob for layer %s", ll.desc.Digest)}
		}
		return nil, err
	}
	if size != ll.desc.Size {
		rc.Close()
		return nil, fmt.Errorf("the blob of layer %s has %d bytes, but the image manifest says %d", ll.desc.Digest, size, ll.desc.Size)
	}
	hr, err := v1.Hasher(ll.desc.Digest.Algorithm)
	if err != nil {
		rc.Close()
		return nil, err
	}
	return &verifyReader{rc: rc, h: hr, want: ll.desc.Digest, left: size}, nil
}

// verifyReader reads a layer blob and fails at EOF if the content does not
// match the digest.
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
			v.err = fmt.Errorf("the content of layer %s does not match its digest", v.want)
			return n, v.err
		}
	}
	if err != nil {
		v.err = err
	}
	return n, err
}

func (v *verifyReader) Close() error { return v.rc.Close() }
