package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Names the node's containerd knows the locally built images by; pods use
// them with imagePullPolicy: Never.
const (
	pauseImage       = "boxlite-e2e/pause:1"
	toolsImage       = "boxlite-e2e/tools:1"
	pluginImageRepo  = "ghcr.io/boxlite-csi/boxlite-csi"
	pluginImageTag   = "e2e"
	provisionerRepo  = "registry.k8s.io/sig-storage/csi-provisioner"
	provisionerTag   = provisionerVersion + "-e2e"
	busyboxHost      = "/bin/busybox"
	imageFixedMTime  = 1704164645 // 2024-01-02T03:04:05Z: equal inputs, equal digests
	defaultImagePath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// layerBuilder collects tar entries for one image layer.
type layerBuilder struct {
	buf  bytes.Buffer
	tw   *tar.Writer
	dirs map[string]bool
}

func newLayer() *layerBuilder {
	l := &layerBuilder{dirs: map[string]bool{}}
	l.tw = tar.NewWriter(&l.buf)
	return l
}

func (l *layerBuilder) hdr(h *tar.Header) {
	h.ModTime = time.Unix(imageFixedMTime, 0)
	h.Format = tar.FormatPAX
	if err := l.tw.WriteHeader(h); err != nil {
		panic(err)
	}
}

// parents adds the directories above p that the layer does not have yet;
// runtimes cope without them, but the plugin's ext4 writer and ctr's
// unpacker should see a well-formed tree.
func (l *layerBuilder) parents(p string) {
	dir := filepath.Dir(p)
	if dir == "." || dir == "/" || l.dirs[dir] {
		return
	}
	l.parents(dir)
	l.dirs[dir] = true
	l.hdr(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755})
}

func (l *layerBuilder) file(p string, mode int64, data []byte) {
	p = strings.TrimPrefix(p, "/")
	l.parents(p)
	l.hdr(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data))})
	if _, err := l.tw.Write(data); err != nil {
		panic(err)
	}
}

func (l *layerBuilder) hostFile(t testing.TB, p, host string) {
	t.Helper()
	data, err := os.ReadFile(host)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(host)
	if err != nil {
		t.Fatal(err)
	}
	l.file(p, int64(fi.Mode().Perm()), data)
}

func (l *layerBuilder) symlink(p, target string) {
	p = strings.TrimPrefix(p, "/")
	l.parents(p)
	l.hdr(&tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: target, Mode: 0o777})
}

func (l *layerBuilder) dir(p string, mode int64) {
	p = strings.TrimPrefix(p, "/")
	l.parents(p)
	if !l.dirs[p] {
		l.dirs[p] = true
		l.hdr(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: mode})
	}
}

func (l *layerBuilder) layer(t testing.TB) v1.Layer {
	t.Helper()
	if err := l.tw.Close(); err != nil {
		t.Fatal(err)
	}
	data := l.buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		t.Fatal(err)
	}
	return layer
}

func image(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Created = v1.Time{Time: time.Unix(imageFixedMTime, 0).UTC()}
	if len(cfg.Env) == 0 {
		cfg.Env = []string{defaultImagePath}
	}
	cf.Config = cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// busyboxLayer is Debian's static busybox with a symlink per applet.
func busyboxLayer(t testing.TB, l *layerBuilder) {
	t.Helper()
	l.hostFile(t, "bin/busybox", busyboxHost)
	out, err := exec.Command(busyboxHost, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	applets := strings.Fields(string(out))
	sort.Strings(applets)
	for _, a := range applets {
		if a != "busybox" {
			l.symlink("bin/"+a, "busybox")
		}
	}
	l.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"))
	l.file("etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n"))
	l.dir("root", 0o700)
	l.dir("tmp", 0o1777)
}

// writeArchive writes img as a docker archive that ctr imports under ref.
func writeArchive(t testing.TB, img v1.Image, ref, path string) {
	t.Helper()
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(path, tag, img); err != nil {
		t.Fatal(err)
	}
}

func pushImage(t testing.TB, img v1.Image, ref string) string {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// staticBinaryImage is one static binary and its entrypoint, nothing else.
func staticBinaryImage(t testing.TB, bin, at string, args ...string) v1.Image {
	t.Helper()
	l := newLayer()
	l.hostFile(t, at, bin)
	l.dir("tmp", 0o1777)
	return image(t, v1.Config{Entrypoint: append([]string{"/" + strings.TrimPrefix(at, "/")}, args...)}, l.layer(t))
}

// hostLibraries lists the shared objects a dynamic binary loads, as ldd
// resolves them on this host, so they can be copied to the same paths.
func hostLibraries(t testing.TB, bins ...string) []string {
	t.Helper()
	seen := map[string]bool{}
	for _, b := range bins {
		out, err := exec.Command("ldd", b).Output()
		if err != nil {
			t.Fatalf("ldd %s: %v", b, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			for _, f := range strings.Fields(line) {
				if strings.HasPrefix(f, "/") {
					seen[f] = true
				}
			}
		}
	}
	var libs []string
	for l := range seen {
		libs = append(libs, l)
	}
	sort.Strings(libs)
	return libs
}

// toolsImage is what test pods run: busybox, the chain checker and QEMU
// with its libraries, firmware and TCG accelerator module, plus the guest
// kernel and initramfs, so a pod can boot its box (examples/microvm-pod.yaml
// uses the same paths).
func buildToolsImage(t testing.TB, chaincheck string, g guest) v1.Image {
	t.Helper()
	l := newLayer()
	busyboxLayer(t, l)
	l.hostFile(t, "chaincheck", chaincheck)
	qemu := "/usr/bin/qemu-system-x86_64"
	accel, _ := filepath.Glob("/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-*.so")
	l.hostFile(t, qemu, qemu)
	for _, a := range accel {
		l.hostFile(t, a, a)
	}
	for _, lib := range hostLibraries(t, append([]string{qemu}, accel...)...) {
		// Copy the resolved file under the path ldd printed: the loader
		// opens that path, and a symlink's target might not be copied.
		l.hostFile(t, lib, lib)
	}
	for _, dir := range []string{"/usr/share/qemu", "/usr/share/seabios"} {
		err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err != nil || fi.IsDir() {
				return err
			}
			if _, err := os.Stat(p); err != nil {
				return nil // dangling link to firmware not installed
			}
			l.hostFile(t, p, p)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	l.hostFile(t, "vmlinuz", g.kernel)
	l.hostFile(t, "initrd.gz", g.initrd)
	return image(t, v1.Config{Entrypoint: []string{"/bin/sh"}}, l.layer(t))
}

// rootfsImage is what boxes are built from: busybox plus a marker file,
// so two tags get two different digests and two different bases.
func rootfsImage(t testing.TB, marker string) v1.Image {
	t.Helper()
	l := newLayer()
	busyboxLayer(t, l)
	l.file("etc/e2e-image", 0o644, []byte(marker+"\n"))
	return image(t, v1.Config{Entrypoint: []string{"/bin/sh"}, WorkingDir: "/root"}, l.layer(t))
}
