package source

import (
	"archive/tar"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
)

// writeLayout writes images (ref.name -> image) to a new OCI layout.
func writeLayout(t *testing.T, images map[string]v1.Image) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	for n, img := range images {
		if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{annotationRefName: n})); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// tarDir archives dir; prefix is put before every name ("" or "./").
func tarDir(t *testing.T, dir, prefix string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "archive.tar")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		h, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		h.Name = prefix + filepath.ToSlash(rel)
		if d.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if d.Type().IsRegular() {
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			defer src.Close()
			_, err = io.Copy(tw, src)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestLocalIndexAndNames(t *testing.T) {
	a := testimage.Random(t, 20, 1, 3, 300)
	b := testimage.Random(t, 21, 1, 3, 300)
	dir := writeLayout(t, map[string]v1.Image{"a": a, "b": b})

	if got := mustResolve(t, "oci:"+dir+":b", Options{}); got.Digest != digestOfImage(t, b) {
		t.Errorf("b: %s", got.Digest)
	}
	_, err := resolve(t, "oci:"+dir, Options{})
	if !IsInvalidArgument(err) || !strings.Contains(err.Error(), "holds 2 images (a, b)") {
		t.Errorf("ambiguous: %v", err)
	}
	_, err = resolve(t, "oci:"+dir+":c", Options{})
	if !IsNotFound(err) || !strings.Contains(err.Error(), `no image named "c"`) || !strings.Contains(err.Error(), "it has: a, b") {
		t.Errorf("missing name: %v", err)
	}
	_, err = resolve(t, "oci:"+dir+"@sha256:"+strings.Repeat("0", 64), Options{})
	if !IsNotFound(err) {
		t.Errorf("missing digest: %v", err)
	}

	// A multi-platform index inside a layout.
	idx := testimage.Index(t, map[string]v1.Image{hostPlatform(): a, "linux/" + otherArch(): b})
	idir := filepath.Join(t.TempDir(), "idx")
	p, err := layout.Write(idir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{annotationRefName: "multi"})); err != nil {
		t.Fatal(err)
	}
	idxDigest, _ := idx.Digest()
	for _, ref := range []string{"oci:" + idir, "oci:" + idir + ":multi", "oci-archive:" + tarDir(t, idir, "")} {
		got := mustResolve(t, ref, Options{})
		if got.IndexDigest != idxDigest || got.Platform.Architecture != hostArch() {
			t.Errorf("%s: index %s platform %+v", ref, got.IndexDigest, got.Platform)
		}
		again := mustResolve(t, got.Pinned, Options{})
		if again.Digest != got.Digest || again.IndexDigest.Hex != "" {
			t.Errorf("%s: pinned %s -> %s (index %s)", ref, got.Pinned, again.Digest, again.IndexDigest)
		}
		readLayers(t, got.V1)
	}
	_, err = resolve(t, "oci:"+idir, Options{Platform: &v1.Platform{OS: "linux", Architecture: "mips64le"}})
	var pe *PlatformNotFoundError
	if !errors.As(err, &pe) || len(pe.Offered) != 2 {
		t.Errorf("platform: %v", err)
	}
}

func hostArch() string { return strings.Split(hostPlatform(), "/")[1] }
