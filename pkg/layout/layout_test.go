package layout

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// --- image layout (ports of upstream's local bundle cache tests) ---

func testImages() Image { return NewHome("/", Config{}).Images() }

func TestLocalBundleCacheDirFormat(t *testing.T) {
	dir := testImages().LocalBundleCacheDir("/my/bundle", "sha256:abc123def456789")
	if parent := filepath.Dir(dir); parent != "/images/local" {
		t.Fatalf("cache dir %s: parent %s, want /images/local", dir, parent)
	}
	parts := strings.Split(filepath.Base(dir), "-")
	if len(parts) != 2 {
		t.Fatalf("cache dir name %q: want <path_hash>-<manifest_short>", filepath.Base(dir))
	}
	if len(parts[0]) != 8 || len(parts[1]) != 8 {
		t.Errorf("cache dir name %q: want 8+8 chars", filepath.Base(dir))
	}
	if parts[1] != "abc123de" {
		t.Errorf("manifest short = %q, want abc123de", parts[1])
	}
}

func TestLocalBundleCacheDirExactValue(t *testing.T) {
	// Pinned (printf /my/bundle | sha256sum) so a change in the hashed
	// input, such as a trailing newline or a cleaned path, cannot slip
	// through: it would orphan every existing cache entry.
	got := testImages().LocalBundleCacheDir("/my/bundle", "sha256:abc123def456789")
	if want := "/images/local/6df4400c-abc123de"; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestLocalBundleCacheInvalidationOnContentChange(t *testing.T) {
	img := testImages()
	v1 := img.LocalBundleCacheDir("/my/bundle", "sha256:a1b2c3d4e5f6789012345678901234567890abcd")
	v2 := img.LocalBundleCacheDir("/my/bundle", "sha256:f9e8d7c6b5a4321098765432109876543210fedc")
	if v1 == v2 {
		t.Fatalf("same path, different manifest: both %s", v1)
	}
	if filepath.Dir(v1) != filepath.Dir(v2) {
		t.Errorf("parents differ: %s vs %s", v1, v2)
	}
	p1 := strings.Split(filepath.Base(v1), "-")
	p2 := strings.Split(filepath.Base(v2), "-")
	if p1[0] != p2[0] {
		t.Errorf("same path should give same path hash: %s vs %s", p1[0], p2[0])
	}
	if p1[1] == p2[1] {
		t.Errorf("different manifests should give different hash: %s", p1[1])
	}
}

func TestLocalBundleCacheSameContentSameCache(t *testing.T) {
	img := testImages()
	a := img.LocalBundleCacheDir("/my/bundle", "sha256:abc123")
	b := img.LocalBundleCacheDir("/my/bundle", "sha256:abc123")
	if a != b {
		t.Errorf("same path and manifest: %s vs %s", a, b)
	}
	// Digests shorter than 8 are used whole, as upstream does.
	if !strings.HasSuffix(a, "-abc123") {
		t.Errorf("short digest: got %s", a)
	}
}

func TestLocalBundleDifferentPathsDifferentCaches(t *testing.T) {
	img := testImages()
	a := img.LocalBundleCacheDir("/bundle1", "sha256:same_manifest")
	b := img.LocalBundleCacheDir("/bundle2", "sha256:same_manifest")
	if a == b {
		t.Errorf("different paths share cache dir %s", a)
	}
}

func TestDigestWithoutPrefix(t *testing.T) {
	got := testImages().LocalBundleCacheDir("/b", "0123456789abcdef")
	if !strings.HasSuffix(got, "-01234567") {
		t.Errorf("got %s", got)
	}
}

func TestImagePaths(t *testing.T) {
	img := NewHome("/h", Config{}).Images()
	for _, tc := range []struct{ name, got, want string }{
		{"Root", img.Root(), "/h/images"},
		{"LayersDir", img.LayersDir(), "/h/images/layers"},
		{"ExtractedDir", img.ExtractedDir(), "/h/images/extracted"},
		{"DiskImagesDir", img.DiskImagesDir(), "/h/images/disk-images"},
		{"ManifestsDir", img.ManifestsDir(), "/h/images/manifests"},
		{"ConfigsDir", img.ConfigsDir(), "/h/images/configs"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %s, want %s", tc.name, tc.got, tc.want)
		}
	}
}

func TestImagePrepare(t *testing.T) {
	img := NewHome(t.TempDir(), Config{}).Images()
	if err := img.Prepare(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{img.LayersDir(), img.ExtractedDir(), img.DiskImagesDir(), img.ManifestsDir(), img.ConfigsDir()} {
		assertDir(t, d)
	}
}

// --- home layout ---

func TestHomePaths(t *testing.T) {
	h := NewHome("/home/user/.boxlite/", Config{})
	for _, tc := range []struct{ name, got, want string }{
		{"Dir", h.Dir(), "/home/user/.boxlite"},
		{"DBDir", h.DBDir(), "/home/user/.boxlite/db"},
		{"ImagesDir", h.ImagesDir(), "/home/user/.boxlite/images"},
		{"LogsDir", h.LogsDir(), "/home/user/.boxlite/logs"},
		{"ImageLayersDir", h.ImageLayersDir(), "/home/user/.boxlite/images/layers"},
		{"ImageManifestsDir", h.ImageManifestsDir(), "/home/user/.boxlite/images/manifests"},
		{"BoxesDir", h.BoxesDir(), "/home/user/.boxlite/boxes"},
		{"BasesDir", h.BasesDir(), "/home/user/.boxlite/bases"}, // upstream test_bases_dir
		{"LocksDir", h.LocksDir(), "/home/user/.boxlite/locks"},
		{"TempDir", h.TempDir(), "/home/user/.boxlite/tmp"},
		{"Images", h.Images().Root(), "/home/user/.boxlite/images"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %s, want %s", tc.name, tc.got, tc.want)
		}
	}
}

func TestPrepareCreatesDirs(t *testing.T) {
	h := NewHome(filepath.Join(t.TempDir(), "home"), Config{})
	if err := h.Prepare(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{
		h.Dir(), h.BoxesDir(), h.BasesDir(), h.TempDir(), h.LocksDir(),
		h.ImageLayersDir(), h.ImageManifestsDir(), h.Images().DiskImagesDir(),
	} {
		assertDir(t, d)
	}
	// Idempotent: the driver calls it on every start.
	if err := h.Prepare(); err != nil {
		t.Fatalf("second Prepare: %v", err)
	}
}

func TestPrepareValidatesSameFilesystem(t *testing.T) {
	h := NewHome(t.TempDir(), Config{})
	if err := h.Prepare(); err != nil {
		t.Fatal(err)
	}
	if err := h.validateSameFilesystem(); err != nil {
		t.Fatal(err)
	}
}

func TestPrepareErrorNamesPath(t *testing.T) {
	root := t.TempDir()
	h := NewHome(root, Config{})
	// A file where bases/ should be makes MkdirAll fail deterministically,
	// even as root.
	if err := os.WriteFile(h.BasesDir(), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	err := h.Prepare()
	if err == nil {
		t.Fatal("Prepare succeeded with a file in place of bases/")
	}
	if !strings.Contains(err.Error(), h.BasesDir()) {
		t.Errorf("error %q does not name %s", err, h.BasesDir())
	}
	var pe *os.PathError
	if !errors.As(err, &pe) {
		t.Errorf("error %q does not wrap *os.PathError", err)
	}
}

func TestFormatDev(t *testing.T) {
	// makedev is glibc's gnu_dev_makedev, written independently of
	// formatDev so the two check each other.
	makedev := func(major, minor uint64) uint64 {
		return (major&0xfff)<<8 | (major&^0xfff)<<32 | minor&0xff | (minor&^0xff)<<12
	}
	for _, tc := range []struct {
		dev  uint64
		want string
	}{
		{0x0801, "8:1"},
		{0x34, "0:52"},
		{0x10300, "259:0"}, // nvme0n1
		{makedev(8, 259), "8:259"},
		{makedev(65544, 1), "65544:1"},
		{makedev(0xfffffabc, 0xfffff), "4294965948:1048575"},
		{makedev(0xffffffff, 0xffffffff), "4294967295:4294967295"},
	} {
		if got := formatDev(tc.dev); got != tc.want {
			t.Errorf("formatDev(%#x) = %s, want %s", tc.dev, got, tc.want)
		}
	}
}

// --- box layout ---

func testBox(t *testing.T, home, id string, opts ...BoxOption) Box {
	t.Helper()
	b, err := NewHome(home, Config{}).Box(id, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDifferentBoxesGetDifferentNetBackendSocketPaths(t *testing.T) {
	a := testBox(t, "/home/user/.boxlite", "box-aaa").NetBackendSocketPath()
	b := testBox(t, "/home/user/.boxlite", "box-bbb").NetBackendSocketPath()
	if a == b {
		t.Fatalf("both boxes use %s", a)
	}
	if a != "/home/user/.boxlite/boxes/box-aaa/sockets/net.sock" {
		t.Errorf("box-aaa: %s", a)
	}
	if b != "/home/user/.boxlite/boxes/box-bbb/sockets/net.sock" {
		t.Errorf("box-bbb: %s", b)
	}
}

func TestBoxPaths(t *testing.T) {
	b := testBox(t, "/home/.boxlite", "mybox")
	const r = "/home/.boxlite/boxes/mybox"
	for _, tc := range []struct{ name, got, want string }{
		{"Root", b.Root(), r},
		{"SocketsDir", b.SocketsDir(), r + "/sockets"},
		{"SocketPath", b.SocketPath(), r + "/sockets/box.sock"},
		{"ReadySocketPath", b.ReadySocketPath(), r + "/sockets/ready.sock"},
		{"NetBackendSocketPath", b.NetBackendSocketPath(), r + "/sockets/net.sock"},
		{"MountsDir", b.MountsDir(), r + "/shared"},
		{"SharedDir", b.SharedDir(), r + "/shared"},
		{"BinDir", b.BinDir(), r + "/bin"},
		{"CADir", b.CADir(), r + "/ca"},
		{"LogsDir", b.LogsDir(), r + "/logs"},
		{"TmpDir", b.TmpDir(), r + "/tmp"},
		{"DisksDir", b.DisksDir(), r + "/disks"},
		{"DiskPath", b.DiskPath(), r + "/disks/disk.qcow2"},
		{"GuestRootfsDiskPath", b.GuestRootfsDiskPath(), r + "/disks/guest-rootfs.qcow2"},
		{"ConsoleOutputPath", b.ConsoleOutputPath(), r + "/logs/console.log"},
		{"PIDFilePath", b.PIDFilePath(), r + "/shim.pid"},
		{"ExitFilePath", b.ExitFilePath(), r + "/exit"},
		{"StderrFilePath", b.StderrFilePath(), r + "/shim.stderr"},
		{"BaseDir", b.BaseDir(), r + "/base"},
		{"BasePath", b.BasePath(), r + "/base/rootfs.ext4"},
		{"BackingName", b.BackingName(), "../base/rootfs.ext4"},
		{"ManifestPath", b.ManifestPath(), r + "/box.json"},
		{"ID", b.ID(), "mybox"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %s, want %s", tc.name, tc.got, tc.want)
		}
	}
}

func TestBoxLayoutAllJailerPathsInsideBoxDir(t *testing.T) {
	b := testBox(t, "/home/.boxlite", "test")
	for _, p := range []string{
		b.LogsDir(), b.BinDir(), b.SocketsDir(), b.TmpDir(), b.GuestRootfsDiskPath(),
		b.ExitFilePath(), b.ConsoleOutputPath(), b.DiskPath(),
	} {
		if !strings.HasPrefix(p, "/home/.boxlite/boxes/test/") {
			t.Errorf("%s is not inside the box dir", p)
		}
	}
}

func TestMountsDirIsolation(t *testing.T) {
	for _, tc := range []struct {
		bind, isolate bool
		wantDir       string
		wantIsolated  bool
	}{
		{false, false, "shared", false},
		{false, true, "shared", false}, // requested but unsupported: fall back
		{true, false, "shared", false},
		{true, true, "mounts", true},
	} {
		var opts []BoxOption
		if tc.isolate {
			opts = append(opts, WithIsolatedMounts())
		}
		b, err := NewHome("/h", Config{BindMountSupported: tc.bind}).Box("v", opts...)
		if err != nil {
			t.Fatal(err)
		}
		if got := filepath.Base(b.MountsDir()); got != tc.wantDir {
			t.Errorf("bind=%v isolate=%v: MountsDir %s, want .../%s", tc.bind, tc.isolate, b.MountsDir(), tc.wantDir)
		}
		if b.IsolateMounts() != tc.wantIsolated {
			t.Errorf("bind=%v isolate=%v: IsolateMounts %v", tc.bind, tc.isolate, b.IsolateMounts())
		}
	}
}

func TestBackingNameResolvesToBasePath(t *testing.T) {
	for _, home := range []string{"/var/lib/boxlite-csi", "rel/home", "."} {
		b := testBox(t, home, "pvc-1")
		if filepath.IsAbs(b.BackingName()) {
			t.Errorf("home %s: BackingName %s is absolute", home, b.BackingName())
		}
		if got := filepath.Join(b.DisksDir(), b.BackingName()); got != b.BasePath() {
			t.Errorf("home %s: DisksDir + BackingName = %s, want %s", home, got, b.BasePath())
		}
	}
}

func TestBoxPrepareCreatesDirs(t *testing.T) {
	for _, isolate := range []bool{false, true} {
		h := NewHome(t.TempDir(), Config{BindMountSupported: true})
		var opts []BoxOption
		if isolate {
			opts = append(opts, WithIsolatedMounts())
		}
		b, err := h.Box("box-tmp-test", opts...)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Prepare(); err != nil {
			t.Fatal(err)
		}
		for _, d := range []string{b.Root(), b.SocketsDir(), b.TmpDir(), b.DisksDir(), b.MountsDir(), b.LogsDir(), b.BaseDir()} {
			assertDir(t, d)
		}
		if err := b.Prepare(); err != nil {
			t.Fatalf("second Prepare: %v", err)
		}
	}
}

func TestBoxCleanup(t *testing.T) {
	h := NewHome(t.TempDir(), Config{})
	b, err := h.Box("pvc-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Cleanup(); err != nil {
		t.Fatalf("Cleanup of a missing box: %v", err)
	}
	if err := b.Prepare(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b.ManifestPath(), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := b.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(b.Root()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("box dir still there after Cleanup: %v", err)
	}
	assertDir(t, h.BoxesDir())
}

// --- volume IDs ---

var volumeIDCases = []struct {
	name  string
	id    string
	valid bool
}{
	{"pvc", "pvc-1234", true},
	{"csi", "csi-abc", true},
	{"uuid", "pvc-0b5f0c2e-4f6e-4a53-9c1e-6b0f0b8d3a11", true},
	{"inner dots", "a..b", true},
	{"trailing dot", "a.", true},
	{"255 bytes", strings.Repeat("a", 255), true},
	{"empty", "", false},
	{"dot", ".", false},
	{"dotdot", "..", false},
	{"slash", "a/b", false},
	{"absolute", "/abs", false},
	{"trailing slash", "a/", false},
	{"traversal", "../x", false},
	{"nul", "a\x00b", false},
	{"256 bytes", strings.Repeat("a", 256), false},
	{"hidden", ".hidden", false},
	{"tmp entry", ".tmp-pvc-1", false},
}

func TestValidateVolumeID(t *testing.T) {
	h := NewHome("/h", Config{})
	for _, tc := range volumeIDCases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateVolumeID(tc.id)
			_, boxErr := h.Box(tc.id)
			if tc.valid {
				if err != nil || boxErr != nil {
					t.Fatalf("ValidateVolumeID: %v; Box: %v", err, boxErr)
				}
				return
			}
			for _, e := range []error{err, boxErr} {
				var ive *InvalidVolumeIDError
				if !errors.As(e, &ive) {
					t.Fatalf("got %v (%T), want *InvalidVolumeIDError", e, e)
				}
				if ive.ID != tc.id || ive.Reason == "" {
					t.Errorf("error fields: ID %q Reason %q", ive.ID, ive.Reason)
				}
			}
		})
	}
}

func TestInvalidVolumeIDErrorMessage(t *testing.T) {
	msg := ValidateVolumeID("a/b").Error()
	if !strings.Contains(msg, `"a/b"`) || !strings.Contains(msg, "'/'") {
		t.Errorf("message %q should quote the ID and give the reason", msg)
	}
	msg = ValidateVolumeID("a\x00b").Error()
	if strings.ContainsRune(msg, 0) || !strings.Contains(msg, `"a\x00b"`) {
		t.Errorf("message %q should escape the NUL", msg)
	}
	long := strings.Repeat("x", 10000)
	msg = ValidateVolumeID(long).Error()
	if len(msg) > 300 || !strings.Contains(msg, "10000 bytes") {
		t.Errorf("long-ID message not truncated (%d bytes): %.120s", len(msg), msg)
	}
}

// boxPathMethods finds every exported Box method of type func() string by
// reflection, so a path method added later is covered by the containment
// test without anyone remembering to list it.
func boxPathMethods(t *testing.T, b Box) map[string]string {
	t.Helper()
	notPaths := map[string]bool{"ID": true, "BackingName": true, "Top": true}
	v := reflect.ValueOf(b)
	paths := map[string]string{}
	for i := 0; i < v.NumMethod(); i++ {
		m := v.Type().Method(i)
		ft := m.Type // includes the receiver
		if ft.NumIn() != 1 || ft.NumOut() != 1 || ft.Out(0).Kind() != reflect.String || notPaths[m.Name] {
			continue
		}
		paths[m.Name] = v.Method(i).Call(nil)[0].String()
	}
	if len(paths) < 21 {
		t.Fatalf("found only %d path methods: %v", len(paths), paths)
	}
	return paths
}

func TestEveryBoxPathInsideItsBox(t *testing.T) {
	for _, home := range []string{"/var/lib/boxlite-csi", "relhome"} {
		for _, bind := range []bool{false, true} {
			h := NewHome(home, Config{BindMountSupported: bind})
			for _, tc := range volumeIDCases {
				if !tc.valid {
					continue
				}
				b, err := h.Box(tc.id, WithIsolatedMounts())
				if err != nil {
					t.Fatal(err)
				}
				for name, p := range boxPathMethods(t, b) {
					rel, err := filepath.Rel(h.BoxesDir(), p)
					if err != nil {
						t.Fatalf("%s(%q): %v", name, tc.id, err)
					}
					first, _, _ := strings.Cut(rel, string(filepath.Separator))
					if first != tc.id || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
						t.Errorf("%s(%q) = %s escapes %s/%s (rel %s)", name, tc.id, p, h.BoxesDir(), tc.id, rel)
					}
				}
			}
		}
	}
}

func TestBoxIDs(t *testing.T) {
	h := NewHome(t.TempDir(), Config{})
	if _, err := h.BoxIDs(); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("BoxIDs before Prepare: %v, want ErrNotExist", err)
	}
	if err := h.Prepare(); err != nil {
		t.Fatal(err)
	}
	ids, err := h.BoxIDs()
	if err != nil || len(ids) != 0 {
		t.Fatalf("empty home: %v, %v", ids, err)
	}
	for _, id := range []string{"pvc-b", "pvc-a"} {
		b, err := h.Box(id)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Prepare(); err != nil {
			t.Fatal(err)
		}
	}
	boxes := h.BoxesDir()
	for _, d := range []string{".tmp-pvc-c", ".."} {
		_ = os.Mkdir(filepath.Join(boxes, d), 0o755)
	}
	if err := os.WriteFile(filepath.Join(boxes, "stray-file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(h.TempDir(), filepath.Join(boxes, "link-to-dir")); err != nil {
		t.Fatal(err)
	}
	ids, err = h.BoxIDs()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"pvc-a", "pvc-b"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("BoxIDs = %q, want %q", ids, want)
	}
}

func assertDir(t *testing.T, path string) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Errorf("%s: %v", path, err)
		return
	}
	if !fi.IsDir() {
		t.Errorf("%s is not a directory", path)
	}
}
