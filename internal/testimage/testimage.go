// Package testimage builds OCI images for tests: a runnable busybox, an
// image exercising every tar feature a rootfs builder must honour (with
// the tree it must produce), large pseudo-random images for benchmarks,
// and multi-platform indexes. Everything is built in memory and is
// deterministic: the same inputs give the same digests.
package testimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"runtime"
	"sort"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Created is the creation time written into every config.
var Created = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// layerFromGzip wraps gzipped tar bytes as an OCI layer.
func layerFromGzip(t testing.TB, gz []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(gz)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatalf("testimage: layer: %v", err)
	}
	return l
}

// newGzip returns a deterministic gzip writer (no name, no mtime).
func newGzip(w io.Writer, level int) *gzip.Writer {
	zw, err := gzip.NewWriterLevel(w, level)
	if err != nil {
		panic(err)
	}
	return zw
}

// tarLayer writes hdrs (with contents) as a PAX tar and returns the layer.
func tarLayer(t testing.TB, entries []tarEntry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	zw := newGzip(&buf, gzip.DefaultCompression)
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		h := e.hdr
		h.Format = tar.FormatPAX
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("testimage: tar header %s: %v", h.Name, err)
		}
		if len(e.body) > 0 {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatalf("testimage: tar body %s: %v", h.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return layerFromGzip(t, buf.Bytes())
}

type tarEntry struct {
	hdr  tar.Header
	body []byte
}

// defaultPlatform is linux/GOARCH (arm64 as v8).
func defaultPlatform() v1.Platform {
	p := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if p.Architecture == "arm64" {
		p.Variant = "v8"
	}
	return p
}

// build assembles an OCI image for linux/GOARCH from layers and a config.
func build(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	adds := make([]mutate.Addendum, len(layers))
	for i, l := range layers {
		adds[i] = mutate.Addendum{Layer: l, MediaType: types.OCILayer, History: v1.History{
			Created:   v1.Time{Time: Created},
			CreatedBy: "testimage",
		}}
	}
	img, err := mutate.Append(img, adds...)
	if err != nil {
		t.Fatalf("testimage: append layers: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	p := defaultPlatform()
	cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
	cf.Created = v1.Time{Time: Created}
	cf.Config = cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatalf("testimage: config: %v", err)
	}
	if _, err := img.Digest(); err != nil {
		t.Fatalf("testimage: digest: %v", err)
	}
	return img
}

// WithPlatform returns img with its config's os/architecture/variant set
// from a platform string like "linux/arm64/v8" (the digest changes).
func WithPlatform(t testing.TB, img v1.Image, platform string) v1.Image {
	t.Helper()
	p, err := v1.ParsePlatform(platform)
	if err != nil {
		t.Fatalf("testimage: platform %q: %v", platform, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant, cf.OSVersion = p.OS, p.Architecture, p.Variant, p.OSVersion
	out, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Index builds an OCI index from platform strings ("linux/amd64",
// "linux/arm64/v8", "windows/amd64") to images. Each image is first
// passed through WithPlatform so its config agrees with the index entry;
// entries are in sorted platform order.
func Index(t testing.TB, images map[string]v1.Image) v1.ImageIndex {
	t.Helper()
	keys := make([]string, 0, len(images))
	for k := range images {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var adds []mutate.IndexAddendum
	for _, k := range keys {
		p, err := v1.ParsePlatform(k)
		if err != nil {
			t.Fatalf("testimage: platform %q: %v", k, err)
		}
		adds = append(adds, mutate.IndexAddendum{
			Add:        WithPlatform(t, images[k], k),
			Descriptor: v1.Descriptor{Platform: p},
		})
	}
	idx := mutate.IndexMediaType(mutate.AppendManifests(empty.Index, adds...), types.OCIImageIndex)
	if _, err := idx.Digest(); err != nil {
		t.Fatalf("testimage: index: %v", err)
	}
	return idx
}
