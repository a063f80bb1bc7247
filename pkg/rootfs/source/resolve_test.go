package source

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
)

// isolated returns options that do not read the host's docker config.
func isolated(t *testing.T, o Options) Options {
	t.Helper()
	if o.DockerConfigDir == "" {
		o.DockerConfigDir = t.TempDir()
	}
	return o
}

func resolve(t *testing.T, ref string, o Options) (*Image, error) {
	t.Helper()
	r, err := Parse(ref)
	if err != nil {
		t.Fatalf("Parse(%q): %v", ref, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return Resolve(ctx, r, isolated(t, o))
}

func mustResolve(t *testing.T, ref string, o Options) *Image {
	t.Helper()
	img, err := resolve(t, ref, o)
	if err != nil {
		t.Fatalf("Resolve(%q): %v", ref, err)
	}
	return img
}

func digestOfImage(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// readLayers reads every layer of img whole and returns their diff IDs.
func readLayers(t *testing.T, img v1.Image) []v1.Hash {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []v1.Hash
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		h, _, err := v1.SHA256(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
	return out
}

func diffIDs(t *testing.T, img v1.Image) []v1.Hash {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	return cf.RootFS.DiffIDs
}

func hostPlatform() string {
	if runtime.GOARCH == "arm64" {
		return "linux/arm64/v8"
	}
	return "linux/" + runtime.GOARCH
}

func otherArch() string {
	if runtime.GOARCH == "s390x" {
		return "ppc64le"
	}
	return "s390x"
}

func TestResolveTagOnceThenByDigest(t *testing.T) {
	reg := testregistry.NewInProcess(t)
	img1 := testimage.Random(t, 1, 2, 20, 20000)
	img2 := testimage.Random(t, 2, 3, 20, 20000)
	d1, d2 := digestOfImage(t, img1), digestOfImage(t, img2)
	reg.Push(t, "app:stable", img1)
	reg.Reset()

	o := Options{PlainHTTP: true}
	got1 := mustResolve(t, reg.Ref("app:stable"), o)
	if got1.Digest != d1 || got1.IndexDigest != (v1.Hash{}) {
		t.Fatalf("digest %s index %s, want %s", got1.Digest, got1.IndexDigest, d1)
	}
	if want := reg.Host() + "/app@" + d1.String(); got1.Pinned != want {
		t.Errorf("Pinned %q, want %q", got1.Pinned, want)
	}
	if got1.MediaType != types.OCIManifestSchema1 || got1.Platform.OS != "linux" || got1.Platform.Architecture != runtime.GOARCH {
		t.Errorf("media type %s platform %+v", got1.MediaType, got1.Platform)
	}
	if n := reg.ManifestGETs(); n != 1 {
		t.Errorf("%d manifest GETs, want 1: %v", n, reg.Requests())
	}
	for _, r := range reg.Requests() {
		if strings.Contains(r, "/manifests/") && !strings.Contains(r, "/manifests/stable") {
			t.Errorf("unexpected manifest request %s", r)
		}
	}

	// The tag moves; the resolved image does not.
	reg.Push(t, "app:stable", img2)
	reg.Reset()
	if !reflect.DeepEqual(readLayers(t, got1.V1), diffIDs(t, img1)) {
		t.Error("layers of the first image changed after the tag moved")
	}
	for _, r := range reg.Requests() {
		if strings.Contains(r, "/manifests/") {
			t.Errorf("reading layers fetched a manifest: %s", r)
		}
	}
	m, _ := img1.Manifest()
	for _, l := range m.Layers {
		if n := reg.BlobGETs(l.Digest); n != 1 {
			t.Errorf("layer %s fetched %d times", l.Digest, n)
		}
	}
	if n := reg.BlobGETs(m.Config.Digest); n != 0 {
		t.Errorf("config fetched %d more times after Resolve", n)
	}

	again := mustResolve(t, got1.Pinned, o)
	if again.Digest != d1 || !again.Ref.IsDigest() {
		t.Errorf("pinned resolves to %s", again.Digest)
	}
	if !reflect.DeepEqual(readLayers(t, again.V1), diffIDs(t, img1)) {
		t.Error("pinned content differs")
	}
	moved := mustResolve(t, reg.Ref("app:stable"), o)
	if moved.Digest != d2 {
		t.Errorf("tag resolves to %s, want %s", moved.Digest, d2)
	}
}

func TestResolveIndex(t *testing.T) {
	reg := testregistry.NewInProcess(t)
	host := testimage.Random(t, 10, 1, 5, 5000)
	other := testimage.Random(t, 11, 1, 5, 5000)
	idx := testimage.Index(t, map[string]v1.Image{hostPlatform(): host, "linux/" + otherArch(): other})
	reg.PushIndex(t, "multi:1", idx)
	im, _ := idx.IndexManifest()
	want := map[string]v1.Hash{}
	for _, d := range im.Manifests {
		want[d.Platform.Architecture] = d.Digest
	}
	idxDigest, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}

	o := Options{PlainHTTP: true}
	got := mustResolve(t, reg.Ref("multi:1"), o)
	if got.Digest != want[runtime.GOARCH] || got.IndexDigest != idxDigest {
		t.Errorf("default platform: %s (index %s), want %s (index %s)", got.Digest, got.IndexDigest, want[runtime.GOARCH], idxDigest)
	}
	if got.Platform.Architecture != runtime.GOARCH || !strings.HasSuffix(got.Pinned, "@"+got.Digest.String()) {
		t.Errorf("platform %+v pinned %s", got.Platform, got.Pinned)
	}
	if !reflect.DeepEqual(readLayers(t, got.V1), diffIDs(t, got.V1)) {
		t.Error("layers do not match diff ids")
	}

	o.Platform = &v1.Platform{OS: "linux", Architecture: otherArch()}
	got = mustResolve(t, reg.Ref("multi:1"), o)
	if got.Digest != want[otherArch()] {
		t.Errorf("explicit platform: %s, want %s", got.Digest, want[otherArch()])
	}

	// Only foreign platforms.
	foreign := testimage.Index(t, map[string]v1.Image{"linux/arm/v7": other, "windows/amd64": other, "linux/" + otherArch(): other})
	reg.PushIndex(t, "foreign:1", foreign)
	_, err = resolve(t, reg.Ref("foreign:1"), Options{PlainHTTP: true, Platform: &v1.Platform{OS: "linux", Architecture: "riscv64"}})
	var pe *PlatformNotFoundError
	if !errors.As(err, &pe) {
		t.Fatalf("err = %v, want *PlatformNotFoundError", err)
	}
	if pe.Want != "linux/riscv64" || !reflect.DeepEqual(pe.Offered, []string{"linux/arm/v7", "linux/" + otherArch(), "windows/amd64"}) {
		t.Errorf("want %q offered %q", pe.Want, pe.Offered)
	}
	msg := err.Error()
	for _, s := range []string{"no linux/riscv64 image in index", "it offers linux/arm/v7, linux/" + otherArch() + ", windows/amd64", reg.Ref("foreign:1")} {
		if !strings.Contains(msg, s) {
			t.Errorf("%q does not say %q", msg, s)
		}
	}
	if IsNotFound(err) || IsUnavailable(err) || IsUnauthorized(err) {
		t.Errorf("misclassified: %v", err)
	}

	// A lone image for another platform.
	reg.Push(t, "lone:1", testimage.WithPlatform(t, other, "linux/"+otherArch()))
	_, err = resolve(t, reg.Ref("lone:1"), Options{PlainHTTP: true})
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "is built for linux/"+otherArch()) {
		t.Errorf("lone image of another platform: %v", err)
	}
}

func TestPlatformMatching(t *testing.T) {
	for _, tc := range []struct {
		want, have string
		ok         bool
	}{
		{"linux/arm64", "linux/arm64/v8", true},
		{"linux/arm64/v8", "linux/arm64", true},
		{"linux/arm64", "linux/arm64/v9", false},
		{"linux/amd64", "linux/amd64/v3", true},
		{"linux/amd64/v3", "linux/amd64", false},
		{"linux/arm/v7", "linux/arm/v6", false},
		{"linux/arm", "linux/arm/v6", true},
		{"linux/amd64", "linux/x86_64", true},
		{"linux/amd64", "windows/amd64", false},
	} {
		w, _ := v1.ParsePlatform(tc.want)
		h, _ := v1.ParsePlatform(tc.have)
		if got := platformMatches(*w, *h); got != tc.ok {
			t.Errorf("platformMatches(%s, %s) = %v", tc.want, tc.have, got)
		}
	}
}

func TestResolveErrors(t *testing.T) {
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "exists:1", testimage.Random(t, 1, 1, 2, 100))

	t.Run("not found", func(t *testing.T) {
		for _, ref := range []string{reg.Ref("nosuchrepo:1"), reg.Ref("exists:2"), reg.Ref("exists@sha256:" + strings.Repeat("a", 64))} {
			_, err := resolve(t, ref, Options{PlainHTTP: true})
			if !IsNotFound(err) || IsUnavailable(err) || IsUnauthorized(err) {
				t.Errorf("%s: %v: want only IsNotFound", ref, err)
			}
			if err != nil && !strings.Contains(err.Error(), ref) {
				t.Errorf("%q does not name the reference", err)
			}
		}
	})

	t.Run("registry down", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		_, err = resolve(t, addr+"/x:1", Options{PlainHTTP: true})
		if !IsUnavailable(err) || IsNotFound(err) {
			t.Fatalf("%v: want IsUnavailable", err)
		}
		if !strings.Contains(err.Error(), "registry "+addr+" unavailable") {
			t.Errorf("%q does not name the registry", err)
		}
	})

	t.Run("5xx", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusNotImplemented)
		}))
		defer srv.Close()
		_, err := resolve(t, srv.Listener.Addr().String()+"/x:1", Options{PlainHTTP: true})
		if !IsUnavailable(err) {
			t.Fatalf("%v: want IsUnavailable", err)
		}
	})

	t.Run("plain HTTP refused without the option", func(t *testing.T) {
		reg.Reset()
		_, err := resolve(t, reg.Ref("exists:1"), Options{})
		if !IsUnavailable(err) {
			t.Fatalf("%v: want IsUnavailable", err)
		}
		if !strings.Contains(err.Error(), "answered HTTPS with plain HTTP") || !strings.Contains(err.Error(), "Options.PlainHTTP") || !strings.Contains(err.Error(), reg.Host()) {
			t.Errorf("unclear: %v", err)
		}
		t.Log(err)
		for _, r := range reg.Requests() {
			if strings.Contains(r, "/manifests/") {
				t.Errorf("a manifest was fetched over plain HTTP: %s", r)
			}
		}
	})

	t.Run("manifest too large", func(t *testing.T) {
		big := int64(5 << 20)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !strings.Contains(r.URL.Path, "/manifests/") {
				w.WriteHeader(http.StatusOK)
				return
			}
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
			if strings.Contains(r.URL.Path, "/sized/") {
				w.Header().Set("Content-Length", fmt.Sprint(big))
			}
			chunk := make([]byte, 64<<10)
			for i := int64(0); i < big; i += int64(len(chunk)) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
				w.(http.Flusher).Flush()
			}
		}))
		defer srv.Close()
		for _, repo := range []string{"sized", "chunked"} {
			_, err := resolve(t, srv.Listener.Addr().String()+"/"+repo+"/x:1", Options{PlainHTTP: true})
			var te *ManifestTooLargeError
			if !errors.As(err, &te) || te.Limit != DefaultMaxManifestBytes {
				t.Fatalf("%s: %v: want *ManifestTooLargeError", repo, err)
			}
			if !strings.Contains(err.Error(), "manifest is too large") || !strings.Contains(err.Error(), "MaxManifestBytes") {
				t.Errorf("unclear: %v", err)
			}
			if repo == "sized" && te.Size != big {
				t.Errorf("size %d", te.Size)
			}
		}
		// And a real registry with a tiny limit.
		_, err := resolve(t, reg.Ref("exists:1"), Options{PlainHTTP: true, MaxManifestBytes: 100})
		var te *ManifestTooLargeError
		if !errors.As(err, &te) {
			t.Errorf("tiny limit: %v", err)
		}
	})

	t.Run("zero ref", func(t *testing.T) {
		_, err := Resolve(context.Background(), Ref{}, Options{})
		if !IsInvalidArgument(err) {
			t.Errorf("%v", err)
		}
	})
}

func TestResolveCredentials(t *testing.T) {
	reg := testregistry.NewInProcess(t, testregistry.WithBasicAuth("alice", "s3cret"))
	want := digestOfImage(t, testimage.Random(t, 5, 1, 3, 300))
	reg.Push(t, "private/app:1", testimage.Random(t, 5, 1, 3, 300))
	ref := reg.Ref("private/app:1")

	secret := func(user, pass string) []byte {
		return []byte(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.Host(), b64(user+":"+pass)))
	}
	nodeDir := func(user, pass string) string {
		dir := t.TempDir()
		cfg := fmt.Sprintf(`{"auths":{"http://%s/v1/":{"username":%q,"password":%q}}}`, reg.Host(), user, pass)
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	for _, tc := range []struct {
		name    string
		opts    Options
		ok      bool
		mention []string
	}{
		{name: "secret", opts: Options{DockerConfigJSON: secret("alice", "s3cret")}, ok: true},
		{name: "node config", opts: Options{DockerConfigDir: nodeDir("alice", "s3cret")}, ok: true},
		{name: "secret over node config", opts: Options{DockerConfigJSON: secret("alice", "s3cret"), DockerConfigDir: nodeDir("alice", "wrongpw")}, ok: true},
		{name: "node config when the secret is for another host", opts: Options{
			DockerConfigJSON: []byte(`{"auths":{"other.example.com":{"username":"x","password":"y"}}}`),
			DockerConfigDir:  nodeDir("alice", "s3cret")}, ok: true},
		{name: "secret wins even when wrong", opts: Options{DockerConfigJSON: secret("alice", "wrongpw"), DockerConfigDir: nodeDir("alice", "s3cret")},
			mention: []string{"user \"alice\" from pull secret", "HTTP 401"}},
		{name: "missing", opts: Options{},
			mention: []string{"no credentials for it were found", "config.json"}},
		{name: "missing, secret for another host", opts: Options{DockerConfigJSON: []byte(`{"auths":{"other.example.com":{"username":"x","password":"y"}}}`)},
			mention: []string{"no credentials for it were found", "pull secret"}},
		{name: "wrong user", opts: Options{DockerConfigJSON: secret("mallory", "s3cret")},
			mention: []string{"user \"mallory\""}},
		{name: "wrong in node config", opts: Options{DockerConfigDir: nodeDir("alice", "nopepw")},
			mention: []string{"config.json", "user \"alice\""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.PlainHTTP = true
			img, err := resolve(t, ref, tc.opts)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				if img.Digest != want {
					t.Errorf("digest %s want %s", img.Digest, want)
				}
				readLayers(t, img.V1)
				return
			}
			if !IsUnauthorized(err) || IsNotFound(err) || IsUnavailable(err) {
				t.Fatalf("%v: want only IsUnauthorized", err)
			}
			msg := err.Error()
			for _, s := range append(tc.mention, "unauthorized", "registry "+reg.Host(), ref) {
				if !strings.Contains(msg, s) {
					t.Errorf("%q does not say %q", msg, s)
				}
			}
			for _, s := range []string{"s3cret", "wrongpw", "nopepw"} {
				if strings.Contains(msg, s) {
					t.Errorf("%q leaks a password", msg)
				}
			}
		})
	}

	t.Run("malformed secret", func(t *testing.T) {
		_, err := resolve(t, ref, Options{PlainHTTP: true, DockerConfigJSON: []byte(`{"auths":{"h":{"password":"s3cret"`)})
		if !IsInvalidArgument(err) || strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), ref) {
			t.Errorf("%v", err)
		}
	})
	t.Run("malformed node config", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"auths":`), 0o600)
		_, err := resolve(t, ref, Options{PlainHTTP: true, DockerConfigDir: dir})
		var de *InvalidDockerConfigError
		if !errors.As(err, &de) || IsInvalidArgument(err) || !strings.Contains(err.Error(), dir) {
			t.Errorf("%v", err)
		}
	})
	t.Run("credential helper", func(t *testing.T) {
		bin := t.TempDir()
		helper := "#!/bin/sh\nread server\necho '{\"ServerURL\":\"'$server'\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}'\n"
		if err := os.WriteFile(filepath.Join(bin, "docker-credential-testhelper"), []byte(helper), 0o755); err != nil {
			t.Fatal(err)
		}
		t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "config.json"), []byte(fmt.Sprintf(`{"credHelpers":{%q:"testhelper"}}`, reg.Host())), 0o600)
		img, err := resolve(t, ref, Options{PlainHTTP: true, DockerConfigDir: dir})
		if err != nil || img.Digest != want {
			t.Fatalf("%v", err)
		}
	})
}

func TestResolveTLS(t *testing.T) {
	reg := testregistry.NewInProcess(t, testregistry.WithTLS())
	img := testimage.Random(t, 6, 1, 3, 300)
	reg.Push(t, "tls/app:1", img)
	ref := reg.Ref("tls/app:1")

	got := mustResolve(t, ref, Options{RootCAs: reg.CertPool()})
	if got.Digest != digestOfImage(t, img) {
		t.Errorf("digest %s", got.Digest)
	}
	readLayers(t, got.V1)

	// PlainHTTP allows HTTP; it does not force it on a TLS registry.
	mustResolve(t, ref, Options{RootCAs: reg.CertPool(), PlainHTTP: true})
	mustResolve(t, ref, Options{InsecureSkipTLSVerify: true})
	// A caller-supplied transport is used as is (it trusts the test CA).
	mustResolve(t, ref, Options{Transport: reg.Transport()})

	_, err := resolve(t, ref, Options{})
	if !IsUnavailable(err) || !strings.Contains(err.Error(), "TLS certificate is not trusted") || !strings.Contains(err.Error(), "RootCAs") {
		t.Errorf("untrusted certificate: %v", err)
	}

	// The extra CA does not make the certificate good for another name.
	if err := verifyChain(nil, "127.0.0.1", reg.CertPool()); err == nil {
		t.Error("empty chain verified")
	}
}

func TestDebianRegistry(t *testing.T) {
	t.Run("auth+tls", func(t *testing.T) {
		d := testregistry.StartDebian(t, testregistry.DebianOptions{User: "bob", Password: "hunter2", TLS: true})
		img := testimage.Busybox(t)
		d.Push(t, "library/busybox:1", img)
		ref := d.Ref("library/busybox:1")
		creds := func(user, pass string) []byte {
			return []byte(fmt.Sprintf(`{"auths":{"https://%s":{"username":%q,"password":%q}}}`, d.Host(), user, pass))
		}

		got := mustResolve(t, ref, Options{RootCAs: d.CertPool(), DockerConfigJSON: creds("bob", "hunter2")})
		if got.Digest != digestOfImage(t, img) {
			t.Errorf("digest %s", got.Digest)
		}
		if !reflect.DeepEqual(readLayers(t, got.V1), diffIDs(t, img)) {
			t.Error("layers differ")
		}
		cfg, err := got.Config()
		if err != nil || cfg.WorkingDir != "/root" {
			t.Errorf("config %+v %v", cfg, err)
		}

		for name, o := range map[string]Options{
			"wrong":   {RootCAs: d.CertPool(), DockerConfigJSON: creds("bob", "letmein")},
			"missing": {RootCAs: d.CertPool()},
		} {
			_, err := resolve(t, ref, o)
			if !IsUnauthorized(err) || !strings.Contains(err.Error(), "registry "+d.Host()) || !strings.Contains(err.Error(), "HTTP 401") {
				t.Errorf("%s credentials: %v", name, err)
			}
			t.Logf("%s credentials: %v", name, err)
		}

		_, err = resolve(t, ref, Options{DockerConfigJSON: creds("bob", "hunter2")})
		if !IsUnavailable(err) || !strings.Contains(err.Error(), "certificate") || !strings.Contains(err.Error(), "RootCAs") {
			t.Errorf("untrusted: %v", err)
		}
		t.Logf("untrusted: %v", err)
	})

	t.Run("plain", func(t *testing.T) {
		d := testregistry.StartDebian(t, testregistry.DebianOptions{})
		img := testimage.Random(t, 8, 2, 10, 10000)
		idx := testimage.Index(t, map[string]v1.Image{hostPlatform(): img, "linux/" + otherArch(): img})
		d.PushIndex(t, "multi:latest", idx)
		got := mustResolve(t, d.Ref("multi"), Options{PlainHTTP: true})
		if got.Platform.Architecture != runtime.GOARCH || got.IndexDigest.Hex == "" {
			t.Errorf("%+v", got)
		}
		readLayers(t, got.V1)

		_, err := resolve(t, d.Ref("multi"), Options{})
		if !IsUnavailable(err) || !strings.Contains(err.Error(), "PlainHTTP") {
			t.Errorf("plain HTTP without the option: %v", err)
		}
		_, err = resolve(t, d.Ref("nope:1"), Options{PlainHTTP: true})
		if !IsNotFound(err) {
			t.Errorf("missing: %v", err)
		}
	})
}

func TestConfig(t *testing.T) {
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "busybox:1", testimage.Busybox(t))
	img := mustResolve(t, reg.Ref("busybox:1"), Options{PlainHTTP: true})
	cfg, err := img.Config()
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Env: []EnvVar{
			{"PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			{"GREETING", "hello=world"},
			{"EMPTY", ""},
		},
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{"echo $GREETING"},
		WorkingDir: "/root",
		User:       "0:0",
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got %+v\nwant %+v", cfg, want)
	}
	b, _ := json.Marshal(cfg)
	if !strings.Contains(string(b), `"workingDir":"/root"`) || !strings.Contains(string(b), `{"name":"EMPTY","value":""}`) {
		t.Errorf("json %s", b)
	}
}
