package driver

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// wantStatus fails unless err is a gRPC status with code and a message
// containing every one of msgs.
func wantStatus(t *testing.T, what string, err error, code codes.Code, msgs ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: %v, want %s", what, err, code)
	}
	for _, m := range msgs {
		if !strings.Contains(err.Error(), m) {
			t.Errorf("%s: message %q does not mention %q", what, status.Convert(err).Message(), m)
		}
	}
}

// dirEntries lists dir, failing the test on any error but absence.
func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// assertNothingCached fails if a failed build left anything behind: a temp
// file in tmp/ or a (partial) base in images/disk-images.
func assertNothingCached(t *testing.T, home layout.Home) {
	t.Helper()
	if n := dirEntries(t, home.TempDir()); len(n) != 0 {
		t.Errorf("temp files left in %s: %v", home.TempDir(), n)
	}
	if n := dirEntries(t, home.Images().DiskImagesDir()); len(n) != 0 {
		t.Errorf("bases left in %s: %v", home.Images().DiskImagesDir(), n)
	}
}

// assertNoDisk fails if the box got an overlay or a base link: a stage
// that failed must leave the box as CreateVolume made it.
func assertNoDisk(t *testing.T, box layout.Box) {
	t.Helper()
	for _, p := range []string{box.GuestRootfsDiskPath(), box.BasePath()} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("failed stage left %s behind (%v)", p, err)
		}
	}
}

func createVolume(t *testing.T, p *plugin, name string, params map[string]string) (string, layout.Box) {
	t.Helper()
	v, err := p.controller().CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	id := v.GetVolume().GetVolumeId()
	box, err := p.d.home.Box(id)
	if err != nil {
		t.Fatal(err)
	}
	return id, box
}

func stageVolume(ctx context.Context, p *plugin, id, staging string) error {
	_, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo})
	return err
}

func unstageVolume(t *testing.T, p *plugin, id, staging string) {
	t.Helper()
	if _, err := p.node().NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Errorf("unstage %s: %v", id, err)
	}
}

// mountTmpfs mounts a tmpfs of size bytes on a fresh directory, unmounted
// when the test ends (after the plugin, whose cleanup runs first).
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.FormatInt(size, 10)); err != nil {
		testenv.Unmet(t, "cannot mount a tmpfs for a small home: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount tmpfs %s: %v", dir, err)
		}
	})
	return dir
}

// fill writes to a file under dir until the filesystem has no block left.
func fill(t *testing.T, dir string) { fillLeaving(t, dir, 0) }

// fillLeaving is fill, then gives leave bytes back.
func fillLeaving(t *testing.T, dir string, leave int64) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, chunk := range []int{1 << 20, 4096} {
		buf := make([]byte, chunk)
		for {
			if _, err := f.Write(buf); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatal(err)
				}
				break
			}
		}
	}
	if leave > 0 {
		st, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(st.Size() - leave); err != nil {
			t.Fatal(err)
		}
	}
}

// smallImage is a few small files: enough for a base and an overlay, and
// cheap to build and push under -race, where gzipping busybox is not.
func smallImage(t *testing.T, tag string) v1.Image {
	t.Helper()
	return hostileImage(t, []hostileEntry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/hostname"}, body: []byte(tag + "\n")},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "hostname", Linkname: "etc/hostname", Mode: 0o777}},
	})
}

// smallImageParams serves smallImage from an in-process registry and
// returns the StorageClass parameters naming it.
func smallImageParams(t *testing.T) map[string]string {
	t.Helper()
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "small:1", smallImage(t, "small"))
	return map[string]string{ParamImage: reg.Ref("small:1"), ParamPlainHTTP: "true"}
}

// fastRetries makes transient registry failures fail after three quick
// tries instead of go-containerregistry's 4 s of back-off.
func fastRetries(cfg Config) Config {
	cfg.RegistryRetry = &remote.Backoff{Duration: time.Millisecond, Factor: 1, Steps: 3}
	return cfg
}

// bigImage is one uncompressed layer holding a file of size bytes that
// are not zero (so no writer can leave them sparse).
func bigImage(t *testing.T, size int) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "big", Mode: 0o644, Size: int64(size)}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(bytes.Repeat([]byte("boxlite!"), size/8)); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return imageOf(t, static.NewLayer(buf.Bytes(), types.OCIUncompressedLayer))
}

// TestFaultHomeFull runs the plugin on a home too small for what it is
// asked to write: every call answers ResourceExhausted naming the path it
// could not write, and leaves nothing half-written.
func TestFaultHomeFull(t *testing.T) {
	needRoot(t)
	reg := testregistry.NewInProcess(t)
	// 12 MiB of content cannot fit an 8 MiB home, so the build fails
	// while writing file data.
	reg.Push(t, "big:1", bigImage(t, 12<<20))
	reg.Push(t, "bb:1", smallImage(t, "small"))
	params := func(tag string) map[string]string {
		return map[string]string{ParamImage: reg.Ref(tag), ParamPlainHTTP: "true"}
	}
	cases := []struct {
		name string
		run  func(t *testing.T, p *plugin, staging string)
	}{
		{"base build does not fit", func(t *testing.T, p *plugin, staging string) {
			id, box := createVolume(t, p, "big", params("big:1"))
			err := stageVolume(context.Background(), p, id, staging)
			wantStatus(t, "NodeStage", err, codes.ResourceExhausted, "no space left on device", p.d.home.TempDir())
			assertNothingCached(t, p.d.home)
			assertNoDisk(t, box)
		}},
		{"overlay does not fit", func(t *testing.T, p *plugin, staging string) {
			// A first volume caches the base, so the second needs only its
			// overlay, which is what the full filesystem refuses.
			first, _ := createVolume(t, p, "first", params("bb:1"))
			if err := stageVolume(context.Background(), p, first, staging+"-first"); err != nil {
				t.Fatal(err)
			}
			defer unstageVolume(t, p, first, staging+"-first")
			id, box := createVolume(t, p, "second", params("bb:1"))
			// One page left: enough for the record of the new overlay's
			// filesystem size, which NodeStage writes first, not for the
			// overlay.
			fillLeaving(t, p.d.home.Dir(), 4096)
			err := stageVolume(context.Background(), p, id, staging)
			wantStatus(t, "NodeStage", err, codes.ResourceExhausted, "no space left on device", box.DisksDir())
			assertNoDisk(t, box)
			if n := dirEntries(t, p.d.home.TempDir()); len(n) != 0 {
				t.Errorf("temp files left in %s: %v", p.d.home.TempDir(), n)
			}
			if n := dirEntries(t, box.DisksDir()); len(n) != 0 {
				t.Errorf("partial overlay left in %s: %v", box.DisksDir(), n)
			}
		}},
		{"box does not fit", func(t *testing.T, p *plugin, _ string) {
			fill(t, p.d.home.Dir())
			_, err := p.controller().CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "c", Parameters: params("bb:1"), VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			// Nothing is free, so the capacity check refuses the claim
			// before anything is written, even at this ratio.
			wantStatus(t, "CreateVolume", err, codes.ResourceExhausted, "exceeds the 0 bytes available", p.d.home.Dir())
			for _, dir := range []string{p.d.home.BoxesDir(), p.d.recordsDir()} {
				if n := dirEntries(t, dir); len(n) != 0 {
					t.Errorf("half-created volume left in %s: %v", dir, n)
				}
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			home := mountTmpfs(t, 8<<20)
			dir := t.TempDir()
			t.Cleanup(func() {
				assertNoMounts(t, dir)
				assertNoMounts(t, filepath.Join(home, "boxes"))
			})
			cfg := testConfig(dir)
			cfg.Home = home
			// Overcommit freely, so CreateVolume's capacity check lets
			// these calls reach the writes that cannot fit
			// (TestCapacityAccounting tests the check itself).
			cfg.OverprovisionRatio = 1e6
			p := startPlugin(t, dir, cfg)
			tc.run(t, p, filepath.Join(dir, "staging"))
		})
	}
}

// faultRegistry serves smallImage as bb:1, but lets fault answer a request first
// (returning true when it did).
type faultRegistry struct {
	*testregistry.Registry
	layer   v1.Hash
	mu      sync.Mutex
	fault   func(w http.ResponseWriter, r *http.Request, next http.Handler) bool
	release chan struct{} // closed at the end of the test; unblocks slow handlers
}

func newFaultRegistry(t *testing.T, opts ...testregistry.Option) *faultRegistry {
	t.Helper()
	img := smallImage(t, "fault")
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("small image: %d layers, %v", len(layers), err)
	}
	fr := &faultRegistry{release: make(chan struct{})}
	if fr.layer, err = layers[0].Digest(); err != nil {
		t.Fatal(err)
	}
	opts = append(opts, testregistry.WithMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fr.mu.Lock()
			f := fr.fault
			fr.mu.Unlock()
			if r.Method == http.MethodGet && f != nil && f(w, r, next) {
				return
			}
			next.ServeHTTP(w, r)
		})
	}))
	fr.Registry = testregistry.NewInProcess(t, opts...)
	t.Cleanup(func() { close(fr.release) })
	fr.Push(t, "bb:1", img)
	return fr
}

func (fr *faultRegistry) isLayer(r *http.Request) bool {
	return strings.HasSuffix(r.URL.Path, "/blobs/"+fr.layer.String())
}

// serveAltered answers with what the registry would have sent, changed by
// alter; the headers (Content-Length included) are the original ones.
func serveAltered(w http.ResponseWriter, r *http.Request, next http.Handler, alter func([]byte) []byte) {
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, r)
	for k, vs := range rec.Header() {
		w.Header()[k] = vs
	}
	body := rec.Body.Bytes()
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(rec.Code)
	_, _ = w.Write(alter(body))
}

func registryError(w http.ResponseWriter, code int, ecode, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`, ecode, msg)
}

// freePort returns a 127.0.0.1 address nothing listens on.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestFaultRegistry breaks the registry in the ways registries break and
// checks the code each failure gets where it surfaces: CreateVolume for
// what resolving a tag needs (manifest, config), NodeStage for layers.
// Nothing may be cached, and a failed CreateVolume creates no box.
func TestFaultRegistry(t *testing.T) {
	needRoot(t)
	const tag = "bb:1"
	// env is one case's world. setup may change params and set the
	// registry's fault; the returned func, if any, runs between a
	// successful CreateVolume and the NodeStage under test.
	type env struct {
		fr     *faultRegistry
		params map[string]string
	}
	onLayer := func(e *env, f func(w http.ResponseWriter, r *http.Request, next http.Handler)) {
		e.fr.setFault(func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
			if !e.fr.isLayer(r) {
				return false
			}
			f(w, r, next)
			return true
		})
	}
	cases := []struct {
		name  string
		opts  []testregistry.Option
		setup func(t *testing.T, e *env) func()
		stage bool // the call under test: NodeStage if set, else CreateVolume
		code  codes.Code
		msg   []string
	}{
		{name: "down at CreateVolume", setup: func(t *testing.T, e *env) func() {
			e.params[ParamImage] = freePort(t) + "/" + tag
			return nil
		}, code: codes.Unavailable, msg: []string{"unavailable", "connection refused"}},
		{name: "down at NodeStage", stage: true, setup: func(t *testing.T, e *env) func() {
			// A proxy stands for the registry host; closing it takes the
			// host down after CreateVolume pinned the image there.
			u, _ := url.Parse(e.fr.URL())
			proxy := httptest.NewServer(httputil.NewSingleHostReverseProxy(u))
			t.Cleanup(proxy.Close)
			e.params[ParamImage] = strings.TrimPrefix(proxy.URL, "http://") + "/" + tag
			return proxy.Close
		}, code: codes.Unavailable, msg: []string{"unavailable", "connection refused"}},
		{name: "drops connections at NodeStage", stage: true, setup: func(t *testing.T, e *env) func() {
			onLayer(e, func(w http.ResponseWriter, _ *http.Request, _ http.Handler) {
				c, _, err := http.NewResponseController(w).Hijack()
				if err == nil {
					c.Close()
				}
			})
			return nil
		}, code: codes.Unavailable, msg: []string{"unavailable", "EOF"}},
		{name: "401 at CreateVolume", opts: []testregistry.Option{testregistry.WithBasicAuth("u", "p")},
			code: codes.PermissionDenied, msg: []string{"unauthorized", "no credentials"}},
		{name: "401 on the layer at NodeStage", stage: true, setup: func(t *testing.T, e *env) func() {
			onLayer(e, func(w http.ResponseWriter, _ *http.Request, _ http.Handler) {
				registryError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
			})
			return nil
		}, code: codes.PermissionDenied, msg: []string{"unauthorized", "HTTP 401", "layer " + "sha256:"}},
		{name: "404 tag at CreateVolume", setup: func(t *testing.T, e *env) func() {
			e.params[ParamImage] = e.fr.Ref("bb:nope")
			return nil
		}, code: codes.NotFound, msg: []string{"not found", "bb:nope"}},
		{name: "404 layer at NodeStage", stage: true, setup: func(t *testing.T, e *env) func() {
			onLayer(e, func(w http.ResponseWriter, _ *http.Request, _ http.Handler) {
				registryError(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown to registry")
			})
			return nil
		}, code: codes.FailedPrecondition, msg: []string{"not found", "BLOB_UNKNOWN"}},
		{name: "layer digest mismatch at NodeStage", stage: true, setup: func(t *testing.T, e *env) func() {
			onLayer(e, func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				// Byte 4 is the gzip header's MTIME, which no decompressor
				// checks: the layer inflates fine and only its digest is off.
				serveAltered(w, r, next, func(b []byte) []byte { b[4] ^= 0xff; return b })
			})
			return nil
		}, code: codes.Unavailable, msg: []string{"sha256", "corrupt"}},
		{name: "truncated layer at NodeStage", stage: true, setup: func(t *testing.T, e *env) func() {
			onLayer(e, func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				rec := httptest.NewRecorder()
				next.ServeHTTP(rec, r)
				body := rec.Body.Bytes()
				// The full length is promised and half is sent: the server
				// then closes the connection, as a dying registry does.
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write(body[:len(body)/2])
			})
			return nil
		}, code: codes.Unavailable, msg: []string{"unexpected EOF", "truncated"}},
		{name: "oversized manifest at CreateVolume", setup: func(t *testing.T, e *env) func() {
			e.fr.setFault(func(w http.ResponseWriter, r *http.Request, _ http.Handler) bool {
				if !strings.Contains(r.URL.Path, "/manifests/") {
					return false
				}
				body := append([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","x":"`), bytes.Repeat([]byte("a"), 5<<20)...)
				body = append(body, `"}`...)
				w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				_, _ = w.Write(body)
				return true
			})
			return nil
		}, code: codes.FailedPrecondition, msg: []string{"too large", "limit"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := &env{fr: newFaultRegistry(t, tc.opts...)}
			e.params = map[string]string{ParamImage: e.fr.Ref(tag), ParamPlainHTTP: "true"}
			var beforeStage func()
			if tc.setup != nil {
				beforeStage = tc.setup(t, e)
			}
			dir := t.TempDir()
			p := startPlugin(t, dir, fastRetries(testConfig(dir)))
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			req := &csi.CreateVolumeRequest{Name: "v", Parameters: e.params, VolumeCapabilities: []*csi.VolumeCapability{rwo}}
			v, err := p.controller().CreateVolume(ctx, req)
			if !tc.stage {
				wantStatus(t, "CreateVolume", err, tc.code, tc.msg...)
				if n := dirEntries(t, p.d.home.BoxesDir()); len(n) != 0 {
					t.Errorf("failed CreateVolume left %v in %s", n, p.d.home.BoxesDir())
				}
				assertNothingCached(t, p.d.home)
				return
			}
			if err != nil {
				t.Fatalf("CreateVolume: %v", err)
			}
			if beforeStage != nil {
				beforeStage()
			}
			id := v.GetVolume().GetVolumeId()
			err = stageVolume(ctx, p, id, filepath.Join(dir, "staging"))
			wantStatus(t, "NodeStage", err, tc.code, tc.msg...)
			assertNothingCached(t, p.d.home)
			box, _ := p.d.home.Box(id)
			assertNoDisk(t, box)
		})
	}
}

func (fr *faultRegistry) setFault(f func(w http.ResponseWriter, r *http.Request, next http.Handler) bool) {
	fr.mu.Lock()
	defer fr.mu.Unlock()
	fr.fault = f
}

// TestFaultRegistrySlow stalls the registry past the caller's deadline.
// A CreateVolume that ran out of time created nothing and says Aborted
// (a gRPC client may see its own DeadlineExceeded first). A NodeStage
// whose build is waiting on a layer says Aborted with the build's
// progress, leaves the build running, and its retry joins it.
func TestFaultRegistrySlow(t *testing.T) {
	needRoot(t)
	fr := newFaultRegistry(t)
	params := map[string]string{ParamImage: fr.Ref("bb:1"), ParamPlainHTTP: "true"}
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	ctx := context.Background()

	stall := func(match func(*http.Request) bool) chan struct{} {
		unblock := make(chan struct{})
		fr.setFault(func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
			if !match(r) {
				return false
			}
			select {
			case <-unblock:
			case <-fr.release:
			}
			next.ServeHTTP(w, r)
			return true
		})
		return unblock
	}

	t.Run("CreateVolume", func(t *testing.T) {
		unblock := stall(func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/manifests/") })
		defer close(unblock)
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		req := &csi.CreateVolumeRequest{Name: "slow", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}}
		_, err := p.d.CreateVolume(short, req)
		wantStatus(t, "CreateVolume (in process)", err, codes.Aborted, "deadline exceeded", "slow")
		short2, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel2()
		_, err = p.controller().CreateVolume(short2, req)
		// The client's timer and the plugin's Aborted answer race each
		// other: either may reach the client first, and both say "retry".
		if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.Aborted {
			t.Errorf("CreateVolume (gRPC client): %v, want DeadlineExceeded or Aborted", err)
		}
		if n := dirEntries(t, p.d.home.BoxesDir()); len(n) != 0 {
			t.Errorf("CreateVolume that ran out of time left %v", n)
		}
	})

	t.Run("NodeStage", func(t *testing.T) {
		fr.setFault(nil)
		id, box := createVolume(t, p, "v", params)
		unblock := stall(fr.isLayer)
		staging := filepath.Join(dir, "staging")
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		_, err := p.d.NodeStageVolume(short, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo})
		// The answer says what is happening, and how far it got: the layer
		// is stalled before its first byte.
		wantStatus(t, "NodeStage (in process)", err, codes.Aborted, "building the base for "+fr.Ref("bb:1"), "0 of ", "layer 1 of 1", "next retry joins it")
		t.Logf("NodeStage while the layer is stalled: %v", err)
		assertNoDisk(t, box)
		if n := dirEntries(t, p.d.home.Images().DiskImagesDir()); len(n) != 0 {
			t.Errorf("a base was installed while its layer was still stalled: %v", n)
		}
		close(unblock)
		if err := stageVolume(ctx, p, id, staging); err != nil {
			t.Fatalf("retried stage: %v", err)
		}
		defer unstageVolume(t, p, id, staging)
		if n := fr.BlobGETs(fr.layer); n != 1 {
			t.Errorf("layer fetched %d times, want 1: the retry must join the build", n)
		}
	})
}

// qemuCheck runs qemu-img check and returns its exit status: 0 clean,
// 2 corruptions, 3 leaks only.
func qemuCheck(t *testing.T, qemuImg, path string) int {
	t.Helper()
	out, err := exec.Command(qemuImg, "check", "-f", "qcow2", path).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		t.Logf("qemu-img check %s: %s", path, out)
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

type fileID struct {
	ino   uint64
	size  int64
	mtime unix.Timespec
}

func statID(t *testing.T, p string) fileID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return fileID{st.Ino, st.Size, st.Mtim}
}

// TestFaultBaseDeleted removes the base from under a box. While the box
// still links it, losing the cache file is harmless: that is what the
// link is for. Once the link is gone too, the seed rule holds: the
// overlay (with the guest's writes) is kept, NodeStage refuses naming the
// missing backing, and health reports the volume inaccessible.
func TestFaultBaseDeleted(t *testing.T) {
	needRoot(t)
	_, qemuIO := needQemu(t)
	params := smallImageParams(t)
	cases := []struct {
		name       string
		removeLink bool
		code       codes.Code
	}{
		{"cache file only", false, codes.OK},
		{"cache file and box link", true, codes.FailedPrecondition},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := startPlugin(t, dir, testConfig(dir))
			ctx := context.Background()
			id, box := createVolume(t, p, "v", params)
			staging := filepath.Join(dir, "staging")
			if err := stageVolume(ctx, p, id, staging); err != nil {
				t.Fatal(err)
			}
			qemu(t, qemuIO, "-f", "qcow2", "-c", "write -P 0x77 0 64k", box.GuestRootfsDiskPath())
			// The base is bind-mounted on itself while staged (unlink would
			// say EBUSY), so take the box down as a node reboot would.
			unstageVolume(t, p, id, staging)
			before := statID(t, box.GuestRootfsDiskPath())
			beforeSum := fileSum(t, box.GuestRootfsDiskPath())
			cached := cachedBases(t, p.d.home)
			if len(cached) != 1 {
				t.Fatalf("cache holds %v, want one base", cached)
			}
			if err := os.Remove(filepath.Join(p.d.home.Images().DiskImagesDir(), cached[0])); err != nil {
				t.Fatal(err)
			}
			if tc.removeLink {
				if err := os.Remove(box.BasePath()); err != nil {
					t.Fatal(err)
				}
			}

			err := stageVolume(ctx, p, id, staging)
			health, herr := p.node().NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
			if herr != nil {
				t.Fatal(herr)
			}
			entries := health.GetVolumeHealth().GetHealthStatuses()
			if tc.code == codes.OK {
				if err != nil {
					t.Fatalf("stage with the box's own link intact: %v", err)
				}
				unstageVolume(t, p, id, staging)
				if len(entries) != 0 {
					t.Errorf("health with the link intact: %v, want none", entries)
				}
			} else {
				wantStatus(t, "NodeStage", err, tc.code, "missing backing file", box.GuestRootfsDiskPath(), box.BackingName())
				var found bool
				for _, h := range entries {
					if h.GetStatus() == csi.VolumeHealthErrorType_INACCESSIBLE && h.GetReason() == "BaseMissing" && strings.Contains(h.GetMessage(), box.BasePath()) {
						found = true
					}
				}
				if !found {
					t.Errorf("health %v lacks INACCESSIBLE/BaseMissing naming %s", entries, box.BasePath())
				}
				if _, err := os.Lstat(box.BasePath()); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("a refused stage recreated the base link: %v", err)
				}
				if n := cachedBases(t, p.d.home); len(n) != 0 {
					t.Errorf("a refused stage rebuilt the base: %v", n)
				}
			}
			if after := statID(t, box.GuestRootfsDiskPath()); after != before || fileSum(t, box.GuestRootfsDiskPath()) != beforeSum {
				t.Errorf("overlay changed: %+v, was %+v", after, before)
			}
		})
	}
}

// TestFaultTornOverlay cuts the overlay short, as a crash in the middle of
// a write can. A cut inside a data cluster leaves a valid header, so the
// overlay is reused untouched (the guest's filesystem deals with its own
// torn write, as after any crash). A cut that reaches the header or its
// tables makes the overlay corrupt. The seed rule discarded it; the rule
// now is that no user data is deleted to recover. An overlay too short to
// hold any cluster is recreated, but one that may hold the guest's writes
// is kept byte for byte, and NodeStage refuses it, naming the repair.
func TestFaultTornOverlay(t *testing.T) {
	needRoot(t)
	qemuImg, qemuIO := needQemu(t)
	params := smallImageParams(t)
	cases := []struct {
		name    string
		cut     func(t *testing.T, overlay string, size int64) int64
		outcome string // reused, recreated or refused
	}{
		{"inside the header", func(*testing.T, string, int64) int64 { return 100 }, "recreated"},
		{"inside the L1 table", func(t *testing.T, overlay string, _ int64) int64 {
			h, err := qcow2.ReadHeader(overlay)
			if err != nil {
				t.Fatal(err)
			}
			return int64(h.L1TableOffset) + 4
		}, "refused"},
		{"inside a data cluster", func(_ *testing.T, _ string, size int64) int64 { return size - 1000 }, "reused"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := startPlugin(t, dir, testConfig(dir))
			ctx := context.Background()
			id, box := createVolume(t, p, "v", params)
			staging := filepath.Join(dir, "staging")
			if err := stageVolume(ctx, p, id, staging); err != nil {
				t.Fatal(err)
			}
			overlay := box.GuestRootfsDiskPath()
			qemu(t, qemuIO, "-f", "qcow2", "-c", "write -P 0x42 1M 64k", overlay)
			unstageVolume(t, p, id, staging)
			fi, err := os.Stat(overlay)
			if err != nil {
				t.Fatal(err)
			}
			cut := tc.cut(t, overlay, fi.Size())
			if cut <= 0 || cut >= fi.Size() {
				t.Fatalf("cut at %d of a %d-byte overlay", cut, fi.Size())
			}
			if err := os.Truncate(overlay, cut); err != nil {
				t.Fatal(err)
			}
			torn := statID(t, overlay)
			tornSum := fileSum(t, overlay)

			err = stageVolume(ctx, p, id, staging)
			if tc.outcome == "refused" {
				wantStatus(t, "stage of a corrupt overlay that may hold data", err, codes.FailedPrecondition, "qemu-img check -r all", overlay)
				if got := statID(t, overlay); got != torn || fileSum(t, overlay) != tornSum {
					t.Fatalf("the refused overlay was changed: %+v, was %+v", got, torn)
				}
				unstageVolume(t, p, id, staging)
				return
			}
			if err != nil {
				t.Fatalf("stage after the torn write: %v", err)
			}
			defer unstageVolume(t, p, id, staging)
			got := statID(t, overlay)
			if tc.outcome == "reused" {
				if got != torn {
					t.Fatalf("overlay with a valid header was touched: %+v, was %+v", got, torn)
				}
				return
			}
			// The inode number may be reused at once, so judge by the whole
			// identity, the check and the content.
			if got == torn {
				t.Fatalf("corrupt overlay was left as it was: %+v", got)
			}
			if c := qemuCheck(t, qemuImg, overlay); c != 0 {
				t.Errorf("recreated overlay fails qemu-img check (exit %d)", c)
			}
			// Fresh over the base: the guest's write is gone, as the rule
			// for a disposable overlay says.
			out, err := exec.Command(qemuIO, "-f", "qcow2", "-r", "-c", "read -P 0x42 1M 64k", overlay).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "Pattern verification failed") {
				t.Errorf("the recreated overlay still holds the guest's write (%v): %s", err, out)
			}
		})
	}
}
