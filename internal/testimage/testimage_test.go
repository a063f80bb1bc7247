package testimage

import (
	"archive/tar"
	"bytes"
	"io"
	"reflect"
	"runtime"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func TestRichMatchesItsTree(t *testing.T) {
	img := Rich(t)
	checkImage(t, img)
	rc := mutate.Extract(img)
	defer rc.Close()
	got, err := FromTar(rc)
	if err != nil {
		t.Fatal(err)
	}
	want := RichTree()
	for _, d := range Diff(want, got) {
		t.Error(d)
	}
	if want["/hl/link2"].Nlink != 3 || want["/usr/bin/suid"].Mode != 0o4755 || len(want["/usr/lib/long"].Link) <= 60 {
		t.Errorf("RichTree lost a feature: %+v", want)
	}
	if want["/home/user"].UID != 1000 || want["/opq"].Mode != 0o711 || want["/over"].Size != int64(len("version two, longer\n")) {
		t.Errorf("RichTree lost a feature")
	}
	if want["/a/keep"].ModTime.Nanosecond() == 0 {
		t.Errorf("mtimes have no nanoseconds")
	}
}

func TestDeterministic(t *testing.T) {
	for name, mk := range map[string]func() (string, string){
		"rich": func() (string, string) {
			a, _ := Rich(t).Digest()
			b, _ := Rich(t).Digest()
			return a.String(), b.String()
		},
		"random": func() (string, string) {
			a, _ := Random(t, 7, 2, 50, 1<<20).Digest()
			b, _ := Random(t, 7, 2, 50, 1<<20).Digest()
			return a.String(), b.String()
		},
	} {
		if a, b := mk(); a != b {
			t.Errorf("%s: digests differ: %s %s", name, a, b)
		}
	}
	a, _ := Random(t, 1, 1, 10, 4096).Digest()
	b, _ := Random(t, 2, 1, 10, 4096).Digest()
	if a == b {
		t.Errorf("different seeds give the same image")
	}
}

func TestRandomShape(t *testing.T) {
	const files, total = 300, 3 << 20
	img := Random(t, 42, 3, files, total)
	checkImage(t, img)
	layers, err := img.Layers()
	if err != nil || len(layers) != 3 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	var n, size, compressed int64
	for _, l := range layers {
		cs, _ := l.Size()
		compressed += cs
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.Typeflag == tar.TypeReg {
				n++
				size += h.Size
				b, _ := io.ReadAll(tr)
				if bytes.ContainsAny(b, "\x00") {
					t.Fatalf("%s: not text", h.Name)
				}
			}
		}
		rc.Close()
	}
	if n != files || size != total {
		t.Errorf("got %d files, %d bytes; want %d, %d", n, size, files, total)
	}
	if compressed > total/2 {
		t.Errorf("content does not compress: %d of %d", compressed, total)
	}
}

func TestBusybox(t *testing.T) {
	img := Busybox(t)
	checkImage(t, img)
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cf.Config, BusyboxConfig()) || cf.Architecture != runtime.GOARCH || cf.OS != "linux" {
		t.Errorf("config %+v", cf)
	}
	mt, _ := img.MediaType()
	if mt != types.OCIManifestSchema1 {
		t.Errorf("media type %s", mt)
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	tree, err := FromTar(rc)
	if err != nil {
		t.Fatal(err)
	}
	if e := tree["/bin/busybox"]; e.Type != TypeFile || e.Mode != 0o755 || e.Size < 100000 {
		t.Errorf("/bin/busybox: %+v", e)
	}
	if e := tree["/bin/sh"]; e.Type != TypeSymlink || e.Link != "busybox" {
		t.Errorf("/bin/sh: %+v", e)
	}
	if e := tree["/tmp"]; e.Mode != 0o1777 {
		t.Errorf("/tmp: %+v", e)
	}
}

func TestIndex(t *testing.T) {
	base := Random(t, 1, 1, 4, 1000)
	idx := Index(t, map[string]v1.Image{"linux/amd64": base, "linux/arm64/v8": base, "windows/amd64": base})
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cf, _ := img.ConfigFile()
		got = append(got, d.Platform.String()+"="+cf.OS+"/"+cf.Architecture+"/"+cf.Variant)
	}
	want := []string{"linux/amd64=linux/amd64/", "linux/arm64/v8=linux/arm64/v8", "windows/amd64=windows/amd64/"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// checkImage checks that the manifest agrees with the layers and config.
func checkImage(t *testing.T, img v1.Image) {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := img.RawConfigFile()
	if h, _, _ := v1.SHA256(bytes.NewReader(raw)); h != m.Config.Digest || int64(len(raw)) != m.Config.Size {
		t.Errorf("config digest/size mismatch")
	}
	if len(m.Layers) != len(cf.RootFS.DiffIDs) {
		t.Fatalf("%d layers, %d diff ids", len(m.Layers), len(cf.RootFS.DiffIDs))
	}
	for i, d := range m.Layers {
		l, err := img.LayerByDigest(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		h, n, err := v1.SHA256(rc)
		rc.Close()
		if err != nil || h != d.Digest || n != d.Size {
			t.Errorf("layer %d: digest %s size %d, manifest says %s %d", i, h, n, d.Digest, d.Size)
		}
		rc, err = l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		h, _, err = v1.SHA256(rc)
		rc.Close()
		if err != nil || h != cf.RootFS.DiffIDs[i] {
			t.Errorf("layer %d: diff id %s, config says %s", i, h, cf.RootFS.DiffIDs[i])
		}
		if d.MediaType != "application/vnd.oci.image.layer.v1.tar+gzip" {
			t.Errorf("layer %d: media type %s", i, d.MediaType)
		}
	}
}
