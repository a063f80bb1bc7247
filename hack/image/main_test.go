package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// buildPlugin builds the real plugin the way the Dockerfile does.
func buildPlugin(t *testing.T) string {
	t.Helper()
	if runtime.GOOS != "linux" {
		testenv.ByDesign(t, testenv.LinuxOnly)
	}
	bin := filepath.Join(t.TempDir(), "boxlite-csi")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=v0.0.0-test", "-o", bin, "./cmd/boxlite-csi")
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// layerFile is one entry of the image's layer.
type layerFile struct {
	typ  byte
	mode int64
	uid  int
	data string
}

func TestImage(t *testing.T) {
	bin := buildPlugin(t)
	binData, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	ca := filepath.Join(t.TempDir(), "ca.crt")
	const caData = "-----BEGIN CERTIFICATE-----\nnot a real one\n-----END CERTIFICATE-----\n"
	if err := os.WriteFile(ca, []byte(caData), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	created := time.Unix(1700000000, 0).UTC()
	platform := "linux/" + runtime.GOARCH

	tests := []struct {
		name, format, image, wantName string
		// open returns the image and the name the archive gives it.
		open func(t *testing.T, archive string) (v1.Image, string)
	}{
		{
			name: "OCI archive", format: formatOCI,
			image: "ghcr.io/boxlite-csi/boxlite-csi:v0.0.0-test", wantName: "ghcr.io/boxlite-csi/boxlite-csi:v0.0.0-test",
			open: openOCIArchive,
		},
		{
			// A Docker Hub short name gets the full name kubelet asks for.
			name: "OCI archive, short name", format: formatOCI,
			image: "boxlite-csi:dev", wantName: "docker.io/library/boxlite-csi:dev",
			open: openOCIArchive,
		},
		{
			name: "docker archive", format: formatDocker,
			image: "registry.local:5000/boxlite-csi:e2e", wantName: "registry.local:5000/boxlite-csi:e2e",
			open: openDockerArchive,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Gzip dominates, and is slow under -race: use both cores.
			t.Parallel()
			out := filepath.Join(t.TempDir(), "image.tar")
			var stderr strings.Builder
			args := []string{"-binary", bin, "-image", tt.image, "-out", out, "-format", tt.format, "-platform", platform, "-ca-certs", ca}
			if code := run(args, &stderr); code != 0 {
				t.Fatalf("run = %d: %s", code, stderr.String())
			}
			img, gotName := tt.open(t, out)
			if gotName != tt.wantName {
				t.Errorf("archive names the image %q, want %q", gotName, tt.wantName)
			}
			if err := validate.Image(img); err != nil {
				t.Errorf("image is inconsistent: %v", err)
			}

			cf, err := img.ConfigFile()
			if err != nil {
				t.Fatal(err)
			}
			tag, _ := name.NewTag(tt.image)
			if got, want := cf.Config.Entrypoint, []string{"/boxlite-csi"}; !reflect.DeepEqual(got, want) {
				t.Errorf("entrypoint = %q, want %q", got, want)
			}
			if cf.Config.User != "0" {
				t.Errorf("user = %q, want 0", cf.Config.User)
			}
			if got, want := cf.Config.Labels, labels(tag.TagStr()); !reflect.DeepEqual(got, want) {
				t.Errorf("labels = %v, want %v", got, want)
			}
			if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
				t.Errorf("platform = %s/%s, want %s", cf.OS, cf.Architecture, platform)
			}
			if !cf.Created.Equal(created) {
				t.Errorf("created = %v, want SOURCE_DATE_EPOCH %v", cf.Created.Time, created)
			}

			layers, err := img.Layers()
			if err != nil {
				t.Fatal(err)
			}
			if len(layers) != 1 {
				t.Fatalf("%d layers, want 1", len(layers))
			}
			mt, _ := layers[0].MediaType()
			wantMT := types.DockerLayer
			if tt.format == formatOCI {
				wantMT = types.OCILayer
			}
			if mt != wantMT {
				t.Errorf("layer media type %s, want %s", mt, wantMT)
			}
			got := readLayer(t, layers[0])
			want := map[string]layerFile{
				"boxlite-csi":                       {tar.TypeReg, 0o755, 0, string(binData)},
				"etc/":                              {tar.TypeDir, 0o755, 0, ""},
				"etc/ssl/":                          {tar.TypeDir, 0o755, 0, ""},
				"etc/ssl/certs/":                    {tar.TypeDir, 0o755, 0, ""},
				"etc/ssl/certs/ca-certificates.crt": {tar.TypeReg, 0o644, 0, caData},
			}
			if len(got) != len(want) {
				t.Errorf("layer has %d entries, want %d", len(got), len(want))
			}
			for path, w := range want {
				g, ok := got[path]
				switch {
				case !ok:
					t.Errorf("layer lacks %s", path)
				case g.typ != w.typ || g.mode != w.mode || g.uid != w.uid:
					t.Errorf("%s: type %c mode %o uid %d, want type %c mode %o uid %d", path, g.typ, g.mode, g.uid, w.typ, w.mode, w.uid)
				case g.data != w.data:
					t.Errorf("%s: content differs from the input (%d bytes, want %d)", path, len(g.data), len(w.data))
				}
			}
		})
	}
}

// TestReproducible checks that equal inputs give byte-identical archives.
func TestReproducible(t *testing.T) {
	bin := buildPlugin(t)
	t.Setenv("SOURCE_DATE_EPOCH", "0")
	var archives [2][]byte
	for i := range archives {
		out := filepath.Join(t.TempDir(), "image.tar")
		var stderr strings.Builder
		if code := run([]string{"-binary", bin, "-out", out, "-ca-certs", "", "-platform", "linux/" + runtime.GOARCH}, &stderr); code != 0 {
			t.Fatalf("run = %d: %s", code, stderr.String())
		}
		var err error
		if archives[i], err = os.ReadFile(out); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(archives[0], archives[1]) {
		t.Error("two builds of the same binary differ")
	}
}

func TestRejects(t *testing.T) {
	bin := buildPlugin(t)
	other := "arm64"
	if runtime.GOARCH == "arm64" {
		other = "amd64"
	}
	dynamic := "/bin/true" // Debian's coreutils: dynamically linked
	if _, err := os.Stat(dynamic); err != nil {
		dynamic = ""
	}
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no binary flag", []string{"-out", "x.tar"}, 2, "Usage"},
		{"other architecture", []string{"-binary", bin, "-platform", "linux/" + other}, 1, "built for"},
		{"not linux", []string{"-binary", bin, "-platform", "windows/amd64"}, 1, "only linux"},
		{"dynamic binary", []string{"-binary", dynamic}, 1, "not statically linked"},
		{"not ELF", []string{"-binary", "main.go"}, 1, "not an ELF"},
		{"bad name", []string{"-binary", bin, "-image", "Upper/Case:tag"}, 1, "-image"},
		{"bad format", []string{"-binary", bin, "-format", "zip"}, 1, "-format"},
		{"missing CA bundle", []string{"-binary", bin, "-ca-certs", "/nonexistent/ca.crt"}, 1, "-ca-certs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "dynamic binary" && dynamic == "" {
				testenv.ByDesign(t, testenv.NoDynamicBinary)
			}
			out := filepath.Join(t.TempDir(), "image.tar")
			args := append([]string{"-out", out, "-platform", "linux/" + runtime.GOARCH}, tt.args...)
			var stderr strings.Builder
			if code := run(args, &stderr); code != tt.code || !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("run = %d %q, want %d and %q", code, stderr.String(), tt.code, tt.want)
			}
			if _, err := os.Stat(out); tt.code != 2 && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("a failed run left %s behind (%v)", out, err)
			}
		})
	}
}

// openOCIArchive unpacks an OCI archive and returns its only image and the
// name its index gives it, after checking both name annotations agree.
func openOCIArchive(t *testing.T, archive string) (v1.Image, string) {
	t.Helper()
	dir := t.TempDir()
	untar(t, archive, dir)
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != 1 {
		t.Fatalf("index has %d manifests, want 1", len(m.Manifests))
	}
	d := m.Manifests[0]
	if d.MediaType != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %s, want %s", d.MediaType, types.OCIManifestSchema1)
	}
	if d.Platform == nil || d.Platform.OS != "linux" || d.Platform.Architecture != runtime.GOARCH {
		t.Errorf("index platform %v, want linux/%s", d.Platform, runtime.GOARCH)
	}
	ref := d.Annotations["org.opencontainers.image.ref.name"]
	if c := d.Annotations[annotationContainerdName]; c != ref {
		t.Errorf("%s = %q, ref.name = %q: they must agree", annotationContainerdName, c, ref)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img, ref
}

// openDockerArchive reads a `docker save` tarball and the tag it records.
func openDockerArchive(t *testing.T, archive string) (v1.Image, string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	var repoTags []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == "manifest.json" {
			var m []struct{ RepoTags []string }
			if err := json.NewDecoder(tr).Decode(&m); err != nil {
				t.Fatal(err)
			}
			for _, e := range m {
				repoTags = append(repoTags, e.RepoTags...)
			}
		}
	}
	if len(repoTags) != 1 {
		t.Fatalf("RepoTags %q, want one", repoTags)
	}
	img, err := tarball.ImageFromPath(archive, nil)
	if err != nil {
		t.Fatal(err)
	}
	return img, repoTags[0]
}

// readLayer lists a layer's entries.
func readLayer(t *testing.T, l v1.Layer) map[string]layerFile {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]layerFile{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = layerFile{typ: h.Typeflag, mode: h.Mode, uid: h.Uid, data: string(data)}
	}
}

// untar extracts a tar of regular files and directories into dir.
func untar(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			t.Fatalf("archive entry %q escapes the directory", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("archive entry %q has type %c", h.Name, h.Typeflag)
		}
	}
}

// TestDockerfileAgrees keeps the Dockerfile and this program building the
// same image: same files, entrypoint, user and labels.
func TestDockerfileAgrees(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	df := string(data)
	want := []string{
		"FROM scratch",
		"COPY --from=build /etc/ssl/certs/ca-certificates.crt /" + caPath,
		"COPY --from=build --chmod=0755 /out/boxlite-csi /" + binaryPath,
		"USER 0",
		`ENTRYPOINT ["/` + binaryPath + `"]`,
		"CGO_ENABLED=0",
		"-trimpath",
	}
	for k, v := range labels("${VERSION}") {
		want = append(want, k+`="`+v+`"`)
	}
	for _, w := range want {
		if !strings.Contains(df, w) {
			t.Errorf("Dockerfile lacks %q", w)
		}
	}
}
