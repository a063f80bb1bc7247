package driver

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
)

// watchedDir is a directory whose files must never be opened: an inotify
// watch records any open or read of them, and fifo blocks whoever opens
// it for reading (so a call that opened it would never return).
type watchedDir struct {
	dir, fifo, file string
	fd              int
}

func newWatchedDir(t *testing.T) *watchedDir {
	t.Helper()
	w := &watchedDir{dir: t.TempDir()}
	w.fifo = filepath.Join(w.dir, "fifo")
	w.file = filepath.Join(w.dir, "shadow")
	if err := unix.Mkfifo(w.fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(w.file, []byte("root:secret:::\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if _, err := unix.InotifyAddWatch(fd, w.dir, unix.IN_OPEN|unix.IN_ACCESS); err != nil {
		t.Fatal(err)
	}
	w.fd = fd
	return w
}

// assertUntouched fails if anything opened a file in the directory since
// the last call, or holds the FIFO open for reading now.
func (w *watchedDir) assertUntouched(t *testing.T) {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := unix.Read(w.fd, buf)
	if err == nil && n > 0 {
		var names []string
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			names = append(names, name)
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
		t.Errorf("files in %s were opened or read: %q", w.dir, names)
	} else if err != nil && !errors.Is(err, unix.EAGAIN) {
		t.Fatal(err)
	}
	// Opening a FIFO for writing without blocking fails with ENXIO
	// exactly when no one has it open for reading.
	fd, err := unix.Open(w.fifo, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err == nil {
		unix.Close(fd)
		t.Errorf("someone holds %s open for reading", w.fifo)
	} else if !errors.Is(err, unix.ENXIO) {
		t.Fatal(err)
	}
	// Our own open above shows up as an event; drain it.
	for {
		if _, err := unix.Read(w.fd, buf); err != nil {
			break
		}
	}
}

// TestHostileTamperedOverlay rewrites a staged box's overlay the way a
// guest with write access could: its backing pointed at a secret, at a
// FIFO, out of the box by a relative path, or through a longer chain.
// NodeStage and NodePublish (and the health check) must refuse it as
// FailedPrecondition, keep it as it is, and never open what it names.
func TestHostileTamperedOverlay(t *testing.T) {
	needRoot(t)
	params := smallImageParams(t)
	w := newWatchedDir(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	ctx := context.Background()

	cases := []struct {
		name string
		// evil returns the overlay's new backing name and format; it may
		// plant more files in the box (a chain).
		evil func(t *testing.T, disks string) (backing, format string)
	}{
		{"backing /etc/shadow", func(*testing.T, string) (string, string) { return "/etc/shadow", qcow2.FormatRaw }},
		{"absolute path to a FIFO", func(*testing.T, string) (string, string) { return w.fifo, qcow2.FormatRaw }},
		{"absolute path to a watched file", func(*testing.T, string) (string, string) { return w.file, qcow2.FormatRaw }},
		{"relative path climbing out of the box", func(t *testing.T, disks string) (string, string) {
			rel, err := filepath.Rel(disks, w.fifo)
			if err != nil || !strings.HasPrefix(rel, "../") {
				t.Fatalf("relative path from %s to %s: %q, %v", disks, w.fifo, rel, err)
			}
			return "../base/../" + rel, qcow2.FormatRaw
		}},
		{"longer chain through a planted qcow2", func(t *testing.T, disks string) (string, string) {
			mid := filepath.Join(disks, "middle.qcow2")
			if err := qcow2.CreateOverlay(ctx, mid, qcow2.OverlayOptions{BackingFile: w.fifo, BackingFormat: qcow2.FormatRaw, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			return "middle.qcow2", qcow2.FormatQcow2
		}},
		{"right name, base probed as qcow2", func(*testing.T, string) (string, string) {
			return "../base/rootfs.ext4", qcow2.FormatQcow2
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id, box := createVolume(t, p, "tamper-"+string(rune('a'+i)), params)
			staging := filepath.Join(dir, "staging", id)
			target := filepath.Join(dir, "pods", id, "mount")
			if err := stageVolume(ctx, p, id, staging); err != nil {
				t.Fatal(err)
			}
			defer unstageVolume(t, p, id, staging)

			backing, format := tc.evil(t, box.DisksDir())
			tmp := filepath.Join(t.TempDir(), "evil.qcow2")
			if err := qcow2.CreateOverlay(ctx, tmp, qcow2.OverlayOptions{BackingFile: backing, BackingFormat: format, Size: 1 << 30}); err != nil {
				t.Fatal(err)
			}
			evil, err := os.ReadFile(tmp)
			if err != nil {
				t.Fatal(err)
			}
			// Written through the staged path, as the guest would.
			if err := os.WriteFile(filepath.Join(staging, "disks", "guest-rootfs.qcow2"), evil, 0o644); err != nil {
				t.Fatal(err)
			}
			w.assertUntouched(t)

			// A call that opened the FIFO would block until this deadline.
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			err = stageVolume(cctx, p, id, staging)
			// The message names the overlay and the field a guest changed.
			differs := backing
			if backing == box.BackingName() {
				differs = format
			}
			wantStatus(t, "NodeStage", err, codes.FailedPrecondition, "tampered", box.GuestRootfsDiskPath(), differs)
			_, err = p.node().NodePublishVolume(cctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo})
			wantStatus(t, "NodePublish", err, codes.FailedPrecondition, "tampered", box.GuestRootfsDiskPath(), differs)
			if ok, _ := p.d.mounter.isMountPoint(target); ok {
				t.Errorf("tampered volume was published at %s", target)
				_ = syscallUnmount(target)
			}
			h, err := p.node().NodeGetVolumeHealth(cctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
			if err != nil {
				t.Fatal(err)
			}
			if e := h.GetVolumeHealth().GetHealthStatuses(); len(e) == 0 || e[0].GetReason() != "OverlayTampered" {
				t.Errorf("health: %v, want OverlayTampered", e)
			}
			w.assertUntouched(t)
			// Refused, not repaired: the evidence stays as the guest left it.
			if got, err := os.ReadFile(box.GuestRootfsDiskPath()); err != nil || !bytes.Equal(got, evil) {
				t.Errorf("tampered overlay was changed or removed (%v)", err)
			}
		})
	}
}

// tree records every path under a directory with its type, mode, size
// and mtime, to prove nothing there changed.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		out[p] = fmt.Sprint(fi.Mode(), fi.ModTime(), fi.Size())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestHostileIDsAndPaths sends IDs, names and paths that try to climb out
// of the home or the kubelet directory: "..", NUL, 4 KiB strings, and
// symlinks from the kubelet directory to elsewhere. Every one is refused
// with InvalidArgument, and a sentinel directory outside is left exactly
// as it was (no file removed, nothing mounted on it).
func TestHostileIDsAndPaths(t *testing.T) {
	needRoot(t)
	params := smallImageParams(t)
	dir := t.TempDir()
	outside := t.TempDir()
	t.Cleanup(func() {
		assertNoMounts(t, dir)
		assertNoMounts(t, outside)
	})
	for _, d := range []string{"vol", "staging", "boxes/victim/disks"} {
		if err := os.MkdirAll(filepath.Join(outside, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(outside, "keep"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	kubelet := filepath.Join(dir, "kubelet")
	// pods/evil is a directory kubelet would own, replaced by a link out.
	if err := os.MkdirAll(filepath.Join(kubelet, "pods"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(kubelet, "pods", "evil")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "vol"), filepath.Join(kubelet, "pods", "target-link")); err != nil {
		t.Fatal(err)
	}
	p := startPlugin(t, dir, testConfig(dir))
	ctx := context.Background()
	id, _ := createVolume(t, p, "real", params)
	staging := filepath.Join(kubelet, "plugins", "staging")
	if err := stageVolume(ctx, p, id, staging); err != nil {
		t.Fatal(err)
	}
	defer unstageVolume(t, p, id, staging)
	before := tree(t, outside)

	long := strings.Repeat("a", 4096)
	relOut, err := filepath.Rel(p.d.home.BoxesDir(), filepath.Join(outside, "boxes", "victim"))
	if err != nil {
		t.Fatal(err)
	}
	stage := func(id, staging string) error {
		_, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo})
		return err
	}
	publish := func(id, target string) error {
		_, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo})
		return err
	}
	unpublish := func(id, target string) error {
		_, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		return err
	}
	unstage := func(id, staging string) error {
		_, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}
	create := func(name string) error {
		_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
		return err
	}
	goodTarget := filepath.Join(kubelet, "pods", "p1", "mount")
	cases := []struct {
		name string
		call func() error
		msg  string
	}{
		{"CreateVolume name of 4 KiB", func() error { return create(long) }, "at most"},
		{"CreateVolume name with NUL", func() error { return create("pvc-\x00x") }, "NUL"},
		{"DeleteVolume ID climbing out of boxes/", func() error {
			_, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: relOut})
			return err
		}, "invalid volume ID"},
		{"DeleteVolume ID ..", func() error {
			_, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: ".."})
			return err
		}, "invalid volume ID"},
		{"NodeStage ID climbing out", func() error { return stage(relOut, staging) }, "invalid volume ID"},
		{"NodeStage ID with NUL", func() error { return stage(id+"\x00", staging) }, "NUL"},
		{"NodeStage ID of 4 KiB", func() error { return stage(long, staging) }, "longer than"},
		{"NodeStage staging with ..", func() error { return stage(id, kubelet+"/plugins/../../"+filepath.Base(outside)) }, "absolute, clean"},
		{"NodeStage staging with NUL", func() error { return stage(id, staging+"\x00x") }, "NUL"},
		{"NodeStage staging of 4 KiB", func() error { return stage(id, "/"+long) }, "at most"},
		{"NodeStage staging under a symlink", func() error { return stage(id, filepath.Join(kubelet, "pods", "evil", "staging")) }, "symbolic link"},
		{"NodePublish ID climbing out", func() error { return publish(relOut, goodTarget) }, "invalid volume ID"},
		{"NodePublish target with ..", func() error { return publish(id, kubelet+"/pods/../../../"+filepath.Base(outside)+"/vol") }, "absolute, clean"},
		{"NodePublish target with NUL", func() error { return publish(id, goodTarget+"\x00") }, "NUL"},
		{"NodePublish target of 4 KiB", func() error { return publish(id, "/"+long) }, "at most"},
		{"NodePublish target whose parent is a symlink out", func() error { return publish(id, filepath.Join(kubelet, "pods", "evil", "vol")) }, "symbolic link"},
		{"NodePublish target that is a symlink out", func() error { return publish(id, filepath.Join(kubelet, "pods", "target-link")) }, "symbolic link"},
		{"NodeUnpublish target whose parent is a symlink out", func() error { return unpublish(id, filepath.Join(kubelet, "pods", "evil", "vol")) }, "symbolic link"},
		{"NodeUnstage staging under a symlink", func() error { return unstage(id, filepath.Join(kubelet, "pods", "evil", "staging")) }, "symbolic link"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			wantStatus(t, tc.name, err, codes.InvalidArgument, tc.msg)
		})
	}
	after := tree(t, outside)
	for p, v := range before {
		if after[p] != v {
			t.Errorf("outside the home: %s changed from %q to %q", p, v, after[p])
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			t.Errorf("outside the home: %s appeared", p)
		}
	}
	if n := dirEntries(t, p.d.home.BoxesDir()); len(n) != 1 {
		t.Errorf("boxes/ holds %v, want only the real volume", n)
	}
}

// hostileEntry is one tar entry; rawBody, if set, is written instead of
// a body matching the header's size (a header that lies).
type hostileEntry struct {
	hdr  tar.Header
	body []byte
	lie  bool
}

// hostileImage builds a one-layer image from entries in memory.
func hostileImage(t *testing.T, entries []hostileEntry) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		h := e.hdr
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if !e.lie && (h.Typeflag == tar.TypeReg) {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatalf("tar body %s: %v", h.Name, err)
		}
	}
	if !slicesAnyLie(entries) {
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return hostileImageFromGzip(t, buf.Bytes())
}

func slicesAnyLie(es []hostileEntry) bool {
	for _, e := range es {
		if e.lie {
			return true
		}
	}
	return false
}

func hostileImageFromGzip(t *testing.T, gz []byte) v1.Image {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(gz)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return imageOf(t, l)
}

// imageOf is a linux/GOARCH image of one layer.
func imageOf(t *testing.T, l v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if runtime.GOARCH == "arm64" {
		cf.Variant = "v8"
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// bomb is a gzipped tar of files of zeros: megabytes on the wire, far more
// once inflated.
func bomb(t *testing.T, files int, size int64) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	tw := tar.NewWriter(zw)
	zero := make([]byte, 1<<20)
	for i := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "zero" + string(rune('a'+i%26)) + string(rune('a'+i/26)), Mode: 0o644, Size: size}); err != nil {
			t.Fatal(err)
		}
		for n := size; n > 0; n -= int64(len(zero)) {
			if _, err := tw.Write(zero[:min(n, int64(len(zero)))]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return hostileImageFromGzip(t, buf.Bytes())
}

// TestHostileImages stages images built to attack the base builder:
// paths and hard links escaping the root, a file claiming a terabyte, a
// flood of entries, a decompression bomb. Each is refused with
// FailedPrecondition by a limit or a rule the message names, nothing is
// cached, and nothing lands outside the image. Entries that only look
// like escapes (an absolute name, a file behind a symlink to a host path)
// are confined to the image, as container runtimes confine them.
func TestHostileImages(t *testing.T) {
	needRoot(t)
	host := t.TempDir() // paths an escape would write to; must stay empty
	dir := t.TempDir()
	p := startPluginWith(t, dir, testConfig(dir), &rootfs.Ext4Builder{Options: ext4.Options{
		MaxFiles:      100,
		MaxFileSize:   2 << 20,
		MaxTotalBytes: 4 << 20,
	}})
	reg := testregistry.NewInProcess(t)
	reg_ := func(name string, img v1.Image) map[string]string {
		reg.Push(t, name+":1", img)
		return map[string]string{ParamImage: reg.Ref(name + ":1"), ParamPlainHTTP: "true"}
	}
	file := func(name string, body string) hostileEntry {
		return hostileEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name}, body: []byte(body)}
	}
	many := []hostileEntry{}
	for i := range 300 {
		many = append(many, file("f/"+strings.Repeat("x", i%7)+string(rune('a'+i%26))+string(rune('a'+(i/26)%26))+string(rune('a'+i/676)), ""))
	}
	escapeTarget := filepath.Join(host, "escaped")
	cases := []struct {
		name   string
		img    func(t *testing.T) v1.Image
		code   codes.Code
		msg    []string
		inBase string // for a confined image: a path that must exist in the base
	}{
		{"entry climbing out of the root", func(t *testing.T) v1.Image {
			return hostileImage(t, []hostileEntry{file("ok", "x"), file("../../.."+escapeTarget, "pwned")})
		}, codes.FailedPrecondition, []string{"escapes the root", "../../.." + escapeTarget}, ""},
		{"hard link climbing out of the root", func(t *testing.T) v1.Image {
			return hostileImage(t, []hostileEntry{{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "passwd", Linkname: "../../../etc/passwd"}}})
		}, codes.FailedPrecondition, []string{"hard link target", "escapes the root"}, ""},
		{"hard link to a host path", func(t *testing.T) v1.Image {
			return hostileImage(t, []hostileEntry{{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "passwd", Linkname: "/etc/passwd"}}})
		}, codes.FailedPrecondition, []string{"/etc/passwd", "does not exist"}, ""},
		{"1 TiB file claim", func(t *testing.T) v1.Image {
			return hostileImage(t, []hostileEntry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "huge", Size: 1 << 40}, body: make([]byte, 4096), lie: true}})
		}, codes.FailedPrecondition, []string{"MaxFileSize", "--image-max-file-size"}, ""},
		{"flood of tiny files", func(t *testing.T) v1.Image { return hostileImage(t, many) },
			codes.FailedPrecondition, []string{"MaxFiles (100)", "--image-max-files"}, ""},
		{"decompression bomb", func(t *testing.T) v1.Image { return bomb(t, 8, 1<<20) },
			codes.FailedPrecondition, []string{"MaxTotalBytes", "--image-max-bytes"}, ""},
		{"absolute entry is confined", func(t *testing.T) v1.Image {
			return hostileImage(t, []hostileEntry{file(escapeTarget, "confined")})
		}, codes.OK, nil, escapeTarget},
		{"file behind a symlink to a host path is confined", func(t *testing.T) v1.Image {
			return hostileImage(t, []hostileEntry{
				{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "evil", Linkname: host, Mode: 0o777}},
				file("evil/escaped", "confined"),
			})
		}, codes.OK, nil, escapeTarget},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			params := reg_("hostile"+string(rune('a'+i)), tc.img(t))
			id, box := createVolume(t, p, "hostile-"+string(rune('a'+i)), params)
			staging := filepath.Join(dir, "staging", id)
			err := stageVolume(testCtx(t), p, id, staging)
			if n := dirEntries(t, host); len(n) != 0 {
				t.Errorf("the image wrote %v on the host in %s", n, host)
			}
			if tc.code == codes.OK {
				if err != nil {
					t.Fatalf("NodeStage: %v", err)
				}
				defer unstageVolume(t, p, id, staging)
				if debugfs, lerr := exec.LookPath("debugfs"); lerr == nil {
					out, _ := exec.Command(debugfs, "-R", "stat "+tc.inBase, box.BasePath()).CombinedOutput()
					if !strings.Contains(string(out), "Type: regular") {
						t.Errorf("%s is not in the base:\n%s", tc.inBase, out)
					}
				}
				return
			}
			wantStatus(t, "NodeStage", err, tc.code, tc.msg...)
			if n := dirEntries(t, p.d.home.TempDir()); len(n) != 0 {
				t.Errorf("temp files left in %s: %v", p.d.home.TempDir(), n)
			}
			assertNoDisk(t, box)
			if b, _, err := p.d.cache.Lookup(rootfs.Key{Digest: mustManifest(t, p.d, box).Digest, Builder: rootfs.Ext4BuilderVersion}); err != nil || b.Path != "" {
				t.Errorf("a refused image was cached: %v %v", b, err)
			}
			// The image cannot get better: the retry answers the same from
			// memory, without pulling the image again.
			pulls := reg.ManifestGETs()
			err = stageVolume(testCtx(t), p, id, staging)
			wantStatus(t, "NodeStage again", err, tc.code, append([]string{"remembered from a build"}, tc.msg...)...)
			if n := reg.ManifestGETs(); n != pulls {
				t.Errorf("the retry asked the registry for %d more manifests", n-pulls)
			}
		})
	}
}

func mustManifest(t *testing.T, d *Driver, box layout.Box) *volumeRecord {
	t.Helper()
	m, err := d.readRecord(box)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func testCtx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}
