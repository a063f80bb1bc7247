package source

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
)

func TestLocalSourcesMatchRegistry(t *testing.T) {
	img := testimage.Rich(t)
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "rich:1", img)
	fromReg := mustResolve(t, reg.Ref("rich:1"), Options{PlainHTTP: true})
	want := fromReg.Digest
	wantDiffIDs := diffIDs(t, img)

	dir := writeLayout(t, map[string]v1.Image{"v1": img})
	archive := tarDir(t, dir, "")
	archiveDot := tarDir(t, dir, "./")
	for _, ref := range []string{
		"oci:" + dir, "oci:" + dir + ":v1", "oci:" + dir + "@" + want.String(), "oci:" + dir + "/",
		"oci-archive:" + archive, "oci-archive:" + archive + ":v1", "oci-archive:" + archiveDot + "@" + want.String(),
	} {
		t.Run(ref, func(t *testing.T) {
			got := mustResolve(t, ref, Options{})
			if got.Digest != want {
				t.Fatalf("digest %s, registry has %s", got.Digest, want)
			}
			r, _ := Parse(ref)
			if got.Pinned != string(r.Transport())+":"+r.Path()+"@"+want.String() {
				t.Errorf("pinned %s", got.Pinned)
			}
			if !reflect.DeepEqual(readLayers(t, got.V1), wantDiffIDs) {
				t.Error("layer content differs")
			}
			layers, _ := got.V1.Layers()
			for i, l := range layers {
				if d, err := l.DiffID(); err != nil || d != wantDiffIDs[i] {
					t.Errorf("layer %d DiffID %s %v", i, d, err)
				}
			}
			cfg, err := got.Config()
			if err != nil || cfg.User != "1000:1000" {
				t.Errorf("config %+v %v", cfg, err)
			}
			mustResolve(t, got.Pinned, Options{})
		})
	}

	// docker save format: go-containerregistry rebuilds a Docker schema 2
	// manifest from manifest.json, so the manifest digest differs from
	// the registry's OCI manifest; config and layer blobs are the same.
	tarPath := filepath.Join(t.TempDir(), "docker.tar")
	tag, _ := name.NewTag("example.com/rich:1")
	if err := tarball.WriteToFile(tarPath, tag, img); err != nil {
		t.Fatal(err)
	}
	var dockerDigest v1.Hash
	for _, ref := range []string{"docker-archive:" + tarPath, "docker-archive:" + tarPath + ":example.com/rich:1"} {
		got := mustResolve(t, ref, Options{})
		if got.Digest == want {
			t.Errorf("%s: same digest as the registry; update the documentation", ref)
		}
		if dockerDigest.Hex != "" && got.Digest != dockerDigest {
			t.Errorf("%s: digest %s, earlier %s", ref, got.Digest, dockerDigest)
		}
		dockerDigest = got.Digest
		m1, _ := got.V1.Manifest()
		m2, _ := img.Manifest()
		if m1.Config.Digest != m2.Config.Digest || len(m1.Layers) != len(m2.Layers) {
			t.Fatalf("config %s vs %s", m1.Config.Digest, m2.Config.Digest)
		}
		for i := range m1.Layers {
			if m1.Layers[i].Digest != m2.Layers[i].Digest {
				t.Errorf("layer %d: %s vs %s", i, m1.Layers[i].Digest, m2.Layers[i].Digest)
			}
		}
		if !reflect.DeepEqual(readLayers(t, got.V1), wantDiffIDs) {
			t.Error("layer content differs")
		}
		if !strings.HasPrefix(got.Pinned, "docker-archive:"+tarPath+"@sha256:") {
			t.Errorf("pinned %s", got.Pinned)
		}
		again := mustResolve(t, got.Pinned, Options{})
		if again.Digest != got.Digest {
			t.Errorf("pinned resolves to %s", again.Digest)
		}
	}
}

func TestLocalErrors(t *testing.T) {
	img := testimage.Random(t, 30, 2, 4, 4000)
	dir := writeLayout(t, map[string]v1.Image{"x": img})

	for _, ref := range []string{
		"oci:/nonexistent/layout", "oci-archive:/nonexistent.tar", "docker-archive:/nonexistent.tar",
	} {
		_, err := resolve(t, ref, Options{})
		if !IsNotFound(err) || !strings.Contains(err.Error(), ref) {
			t.Errorf("%s: %v", ref, err)
		}
	}
	notLayout := t.TempDir()
	if _, err := resolve(t, "oci:"+notLayout, Options{}); !IsNotFound(err) || !strings.Contains(err.Error(), "no index.json") {
		t.Errorf("not a layout: %v", err)
	}
	junk := filepath.Join(t.TempDir(), "junk.tar")
	os.WriteFile(junk, []byte(strings.Repeat("junk", 1000)), 0o644)
	if _, err := resolve(t, "oci-archive:"+junk, Options{}); err == nil {
		t.Error("junk archive resolved")
	}
	if _, err := resolve(t, "docker-archive:"+junk, Options{}); err == nil || !strings.Contains(err.Error(), "not a docker-archive") {
		t.Errorf("junk docker archive: %v", err)
	}

	// docker-archive with two images and a missing tag.
	tarPath := filepath.Join(t.TempDir(), "two.tar")
	t1, _ := name.NewTag("one:1")
	t2, _ := name.NewTag("two:2")
	if err := tarball.MultiWriteToFile(tarPath, map[name.Tag]v1.Image{t1: img, t2: testimage.Random(t, 31, 1, 2, 100)}); err != nil {
		t.Fatal(err)
	}
	if _, err := resolve(t, "docker-archive:"+tarPath, Options{}); !IsInvalidArgument(err) {
		t.Errorf("ambiguous docker archive: %v", err)
	}
	if _, err := resolve(t, "docker-archive:"+tarPath+":three:3", Options{}); !IsNotFound(err) || !strings.Contains(err.Error(), "one:1") {
		t.Errorf("missing tag: %v", err)
	}
	if got := mustResolve(t, "docker-archive:"+tarPath+":index.docker.io/library/one:1", Options{}); !reflect.DeepEqual(readLayers(t, got.V1), diffIDs(t, img)) {
		t.Error("one:1 content")
	}

	// Limits.
	if _, err := resolve(t, "oci:"+dir, Options{MaxManifestBytes: 64}); !errors.As(err, new(*ManifestTooLargeError)) {
		t.Errorf("limit: %v", err)
	}

	// A corrupted layer blob (same size) is caught when read.
	m, _ := img.Manifest()
	blob := filepath.Join(dir, "blobs", "sha256", m.Layers[0].Digest.Hex)
	data, _ := os.ReadFile(blob)
	data[len(data)/2] ^= 0xff
	os.Chmod(blob, 0o644)
	if err := os.WriteFile(blob, data, 0o644); err != nil {
		t.Fatal(err)
	}
	got := mustResolve(t, "oci:"+dir+":x", Options{})
	l, _ := got.V1.LayerByDigest(m.Layers[0].Digest)
	rc, _ := l.Compressed()
	_, err := io.Copy(io.Discard, rc)
	rc.Close()
	if err == nil || !strings.Contains(err.Error(), "does not match its digest") {
		t.Errorf("corrupt layer: %v", err)
	}
	// A missing one is IsNotFound.
	os.Remove(blob)
	if _, err := l.Compressed(); !IsNotFound(err) {
		t.Errorf("missing layer: %v", err)
	}
	// A corrupted manifest fails at Resolve.
	mb := filepath.Join(dir, "blobs", "sha256", got.Digest.Hex)
	os.Chmod(mb, 0o644)
	os.WriteFile(mb, []byte(`{"schemaVersion":2}`), 0o644)
	if _, err := resolve(t, "oci:"+dir+":x", Options{}); err == nil || !strings.Contains(err.Error(), "does not match its digest") {
		t.Errorf("corrupt manifest: %v", err)
	}
}

// TestLocalLimits checks that every small document a local source reads is
// bounded by Options.MaxManifestBytes before it is read whole.
func TestLocalLimits(t *testing.T) {
	img := testimage.Random(t, 40, 1, 2, 100)
	dir := writeLayout(t, map[string]v1.Image{"x": img})

	// Many tags of one image make a long manifest.json entry (one
	// descriptor listing every tag) while the image config stays small.
	manyTags := filepath.Join(t.TempDir(), "many-tags.tar")
	tagged := map[name.Tag]v1.Image{}
	for i := range 50 {
		tag, _ := name.NewTag(fmt.Sprintf("example.com/many-tags/image:tag-%d", i))
		tagged[tag] = img
	}
	if err := tarball.MultiWriteToFile(manyTags, tagged); err != nil {
		t.Fatal(err)
	}

	// A long environment variable makes a large image config.
	bigConfig := filepath.Join(t.TempDir(), "big-config.tar")
	cfg, _ := img.ConfigFile()
	cfg = cfg.DeepCopy()
	cfg.Config.Env = append(cfg.Config.Env, "BIG="+strings.Repeat("x", 3000))
	bigImg, err := mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	bigTag, _ := name.NewTag("example.com/big:1")
	if err := tarball.WriteToFile(bigConfig, bigTag, bigImg); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		ref   string
		limit int64
		what  string // prefix of ManifestTooLargeError.What
	}{
		{"oci index.json", "oci:" + dir, 64, "index.json"},
		{"oci-archive index.json", "oci-archive:" + tarDir(t, dir, ""), 64, "index.json"},
		{"docker-archive manifest.json", "docker-archive:" + manyTags + ":example.com/many-tags/image:tag-0", 1000, "manifest.json"},
		{"docker-archive image config", "docker-archive:" + bigConfig, 2000, "image config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := resolve(t, tc.ref, Options{MaxManifestBytes: tc.limit})
			var te *ManifestTooLargeError
			if !errors.As(err, &te) || !strings.HasPrefix(te.What, tc.what) || te.Limit != tc.limit {
				t.Fatalf("%v: want *ManifestTooLargeError for %s with limit %d", err, tc.what, tc.limit)
			}
			if !strings.Contains(err.Error(), tc.ref) {
				t.Errorf("%v: the message does not name %s", err, tc.ref)
			}
		})
	}
}
