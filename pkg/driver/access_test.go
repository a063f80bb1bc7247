package driver

import (
	"context"
	"encoding/base64"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// cachedBases lists the base disks in the node cache, without the records
// kept beside them.
func cachedBases(t *testing.T, home layout.Home) []string {
	t.Helper()
	var bases []string
	for _, n := range dirEntries(t, home.Images().DiskImagesDir()) {
		if strings.HasSuffix(n, ".ext4") {
			bases = append(bases, n)
		}
	}
	return bases
}

// tenantRegistry serves repositories under a/ to alice only, under b/ to
// bob only, and under pub/ to anyone. It can be cut off like the registry
// of an air-gapped node; every request still reaches its log, so a test
// can tell that none was made.
type tenantRegistry struct {
	*testregistry.Registry
	guarded atomic.Bool // access enforced (off while the test pushes)
	down    atomic.Bool // every request fails, as with no route to it
}

var tenantUsers = map[string][2]string{"a": {"alice", "alice-pw"}, "b": {"bob", "bob-pw"}}

func newTenantRegistry(t *testing.T) *tenantRegistry {
	t.Helper()
	tr := &tenantRegistry{}
	tr.Registry = testregistry.NewInProcess(t, testregistry.WithMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if tr.down.Load() {
				registryError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "the node is air-gapped")
				return
			}
			top, _, repo := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/")
			if want, private := tenantUsers[top]; tr.guarded.Load() && repo && private {
				u, pw, ok := r.BasicAuth()
				switch {
				case !ok:
					w.Header().Set("WWW-Authenticate", `Basic realm="tenants"`)
					registryError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
					return
				case u != want[0] || pw != want[1]:
					registryError(w, http.StatusForbidden, "DENIED", "no pull access to "+top+"/")
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	}))
	return tr
}

// secretFor is a pull secret holding user's credentials for the registry.
func (tr *tenantRegistry) secretFor(user string) map[string]string {
	for _, u := range tenantUsers {
		if u[0] == user {
			a := base64.StdEncoding.EncodeToString([]byte(u[0] + ":" + u[1]))
			return map[string]string{dockerConfigSecretKey: `{"auths":{"` + tr.Host() + `":{"auth":"` + a + `"}}}`}
		}
	}
	panic("no such user " + user)
}

// useNodeCredentials gives the node's docker config user's credentials.
func (tr *tenantRegistry) useNodeCredentials(t *testing.T, user string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(tr.secretFor(user)[dockerConfigSecretKey]), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
}

// configured is smallImage with an image config a volume record carries.
func configured(t *testing.T, tag string) v1.Image {
	t.Helper()
	img, err := mutate.Config(smallImage(t, tag), v1.Config{
		Env:        []string{"PATH=/bin", "TENANT=" + tag},
		Entrypoint: []string{"/bin/sh"},
		Cmd:        []string{"-c", "cat /etc/hostname"},
		WorkingDir: "/etc",
		User:       "1000",
	})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// scParams are StorageClass parameters for image.
func scParams(image, policy string) map[string]string {
	return map[string]string{ParamImage: image, ParamPlainHTTP: "true", ParamPullPolicy: policy}
}

// publishInline publishes an inline ephemeral volume of image; a refused
// one must leave no box, and a published one is unpublished again.
func publishInline(t *testing.T, p *plugin, vol, image, policy string, secrets map[string]string) error {
	t.Helper()
	target := filepath.Join(p.dir, "pods", vol)
	_, err := p.node().NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{
		VolumeId: vol, TargetPath: target, VolumeCapability: rwo, Secrets: secrets,
		VolumeContext: map[string]string{ephemeralKey: "true", ParamImage: image, ParamPlainHTTP: "true", ParamPullPolicy: policy},
	})
	if err != nil {
		if _, serr := os.Lstat(filepath.Join(p.home, "boxes", vol)); serr == nil {
			t.Errorf("refused inline volume %s left a box", vol)
		}
		return err
	}
	if _, err := p.node().NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target}); err != nil {
		t.Errorf("unpublish %s: %v", vol, err)
	}
	return nil
}

// baseInfo reads the record kept with the current builder's base of digest.
func baseInfo(t *testing.T, p *plugin, digest string) rootfs.BaseInfo {
	t.Helper()
	info, err := p.d.cache.Info(rootfs.Key{Digest: digest, Builder: p.d.builder.Version()})
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// TestAccessPrivateDigest: tenant A's private image is cached on the node
// (pulled with the node's credentials for A's StorageClass). Tenant B's
// inline volume naming its digest, with B's credentials or none, is
// refused whatever the pull policy; under Never nothing asks the registry,
// and even A's own credentials cannot be checked, so the base goes only to
// StorageClass volumes. A's volumes keep working, and public images,
// whether pulled with credentials or without, are shared under Never.
func TestAccessPrivateDigest(t *testing.T) {
	needRoot(t)
	tr := newTenantRegistry(t)
	private := tr.Push(t, "a/app:1", configured(t, "a"))
	public := tr.Push(t, "pub/tool:1", smallImage(t, "public"))
	publicInline := tr.Push(t, "pub/other:1", smallImage(t, "public-inline"))
	tr.guarded.Store(true)
	tr.useNodeCredentials(t, "alice")
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.AllowInlineInsecure = true // the registry speaks plain HTTP
	p := startPlugin(t, dir, cfg)
	ctx := testCtx(t)

	// Tenant A's claim, and a claim of a public image, through
	// StorageClasses, which pull with the node's credentials: both are
	// staged so that their bases are cached.
	staging := filepath.Join(dir, "staging")
	var idA string
	for name, image := range map[string]string{"a": tr.Ref("a/app:1"), "pub": tr.Ref("pub/tool:1")} {
		id, _ := createVolume(t, p, name, scParams(image, PullIfNotPresent))
		if err := stageVolume(ctx, p, id, staging); err != nil {
			t.Fatal(err)
		}
		unstageVolume(t, p, id, staging)
		if name == "a" {
			idA = id
		}
	}
	recA := mustManifest(t, p.d, mustBox(t, p, idA))
	if info := baseInfo(t, p, recA.Digest); info.Anonymous || !reflect.DeepEqual(info.Config, recA.Config) {
		t.Fatalf("A's private base is recorded as %+v; want not anonymous, with the record's config %+v", info, recA.Config)
	}
	// Credentials were sent for the public image too; the plugin found out
	// that it is public all the same.
	if info := baseInfo(t, p, strings.SplitN(public, "@", 2)[1]); !info.Anonymous {
		t.Fatalf("public base pulled with credentials is recorded as %+v, want anonymous", info)
	}
	// A public image that an inline volume pulled with no credentials.
	if err := publishInline(t, p, "csi-warm", publicInline, PullIfNotPresent, nil); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name    string
		image   string
		policy  string
		secrets map[string]string
		code    codes.Code
		msg     string
	}{
		{"B without a secret, IfNotPresent", private, PullIfNotPresent, nil, codes.PermissionDenied, "no credentials"},
		{"B with B's secret, IfNotPresent", private, PullIfNotPresent, tr.secretFor("bob"), codes.PermissionDenied, `user "bob"`},
		{"B without a secret, Never", private, PullNever, nil, codes.PermissionDenied, "pulled with credentials"},
		{"B with B's secret, Never", private, PullNever, tr.secretFor("bob"), codes.PermissionDenied, "pulled with credentials"},
		{"A with A's secret, Never", private, PullNever, tr.secretFor("alice"), codes.PermissionDenied, "use pullPolicy IfNotPresent with a pull secret"},
		{"A with A's secret, IfNotPresent", private, PullIfNotPresent, tr.secretFor("alice"), codes.OK, ""},
		{"public pulled with credentials, Never", public, PullNever, nil, codes.OK, ""},
		{"public pulled with credentials, Never, B's secret", public, PullNever, tr.secretFor("bob"), codes.OK, ""},
		{"public pulled anonymously, Never", publicInline, PullNever, nil, codes.OK, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr.Reset()
			err := publishInline(t, p, "csi-"+strings.NewReplacer(" ", "-", ",", "", "'", "").Replace(strings.ToLower(tc.name)), tc.image, tc.policy, tc.secrets)
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Fatalf("NodePublish = %v, want %v with %q", err, tc.code, tc.msg)
			}
			if err != nil && tc.code == codes.PermissionDenied && tc.policy == PullNever && !strings.Contains(err.Error(), "StorageClass") {
				t.Errorf("refusal %v does not say to use a StorageClass", err)
			}
			if n := tr.Requests(); tc.policy == PullNever && len(n) != 0 {
				t.Errorf("pullPolicy Never asked the registry: %v", n)
			}
		})
	}

	// A's claim still stages, and a new claim of A's through a StorageClass
	// under Never is made from the cache alone, with the same config.
	if err := stageVolume(ctx, p, idA, staging); err != nil {
		t.Errorf("tenant A's own volume: %v", err)
	}
	unstageVolume(t, p, idA, staging)
	tr.Reset()
	id, _ := createVolume(t, p, "a-never", scParams(private, PullNever))
	rec := mustManifest(t, p.d, mustBox(t, p, id))
	if rec.Digest != recA.Digest || rec.Pinned != private || !reflect.DeepEqual(rec.Config, recA.Config) {
		t.Errorf("Never record %+v, want digest %s, pinned %s and config %+v", rec, recA.Digest, private, recA.Config)
	}
	if err := stageVolume(ctx, p, id, staging); err != nil {
		t.Errorf("A's StorageClass volume under Never: %v", err)
	}
	unstageVolume(t, p, id, staging)
	if n := tr.Requests(); len(n) != 0 {
		t.Errorf("pullPolicy Never asked the registry: %v", n)
	}
}

// hostPlatform is this node's platform as an index names it.
func hostPlatform() string {
	if runtime.GOARCH == "arm64" {
		return "linux/arm64/v8"
	}
	return "linux/" + runtime.GOARCH
}

// TestAccessAirGapped: bases built while the node could reach its
// registry serve pullPolicy Never volumes once it cannot, through a
// restart, with no registry request at all: StorageClass volumes naming
// the image by its manifest or its index digest, and an inline volume of
// an image pulled anonymously. An image that is not cached is refused,
// naming it.
func TestAccessAirGapped(t *testing.T) {
	needRoot(t)
	tr := newTenantRegistry(t)
	idx := testimage.Index(t, map[string]v1.Image{hostPlatform(): configured(t, "airgap")})
	byIndex := tr.PushIndex(t, "pub/app:1", idx)
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("index: %v", err)
	}
	manifest := im.Manifests[0].Digest.String()
	byManifest := tr.Ref("pub/app@" + manifest)
	inline := tr.Push(t, "pub/inline:1", smallImage(t, "inline"))
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.AllowInlineInsecure = true
	p := startPlugin(t, dir, cfg)
	ctx := testCtx(t)

	// While connected: a StorageClass volume naming the index by digest,
	// and an inline volume, build the bases.
	staging := filepath.Join(dir, "staging")
	warm, _ := createVolume(t, p, "warm", scParams(byIndex, PullIfNotPresent))
	if err := stageVolume(ctx, p, warm, staging); err != nil {
		t.Fatal(err)
	}
	unstageVolume(t, p, warm, staging)
	want := mustManifest(t, p.d, mustBox(t, p, warm))
	if want.Digest != manifest {
		t.Fatalf("index resolved to %s, want %s", want.Digest, manifest)
	}
	if err := publishInline(t, p, "csi-warm", inline, PullIfNotPresent, nil); err != nil {
		t.Fatal(err)
	}

	p.stop()
	p = startPlugin(t, dir, cfg)
	tr.down.Store(true)
	tr.Reset()

	for _, tc := range []struct{ name, image string }{
		{"manifest digest", byManifest},
		{"index digest", byIndex},
	} {
		t.Run("StorageClass by "+tc.name, func(t *testing.T) {
			id, _ := createVolume(t, p, "never-"+strings.ReplaceAll(tc.name, " ", "-"), scParams(tc.image, PullNever))
			rec := mustManifest(t, p.d, mustBox(t, p, id))
			if rec.Digest != want.Digest || rec.Pinned != want.Pinned || !reflect.DeepEqual(rec.Config, want.Config) {
				t.Errorf("record %+v, want digest %s, pinned %s, config %+v", rec, want.Digest, want.Pinned, want.Config)
			}
			stg, target := filepath.Join(dir, "stg-"+id), filepath.Join(dir, "pods", id)
			if err := stageVolume(ctx, p, id, stg); err != nil {
				t.Fatalf("NodeStage: %v", err)
			}
			if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: stg, TargetPath: target, VolumeCapability: rwo}); err != nil {
				t.Fatalf("NodePublish: %v", err)
			}
			if _, err := os.Stat(filepath.Join(target, "box.json")); err != nil {
				t.Errorf("published volume: %v", err)
			}
			if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Error(err)
			}
			unstageVolume(t, p, id, stg)
		})
	}
	for _, tc := range []struct{ name, image string }{
		{"pulled by an inline volume", inline},
		{"pulled by a StorageClass, by index digest", byIndex},
	} {
		t.Run("inline, "+tc.name, func(t *testing.T) {
			if err := publishInline(t, p, "csi-never-"+strings.ReplaceAll(strings.ReplaceAll(tc.name, ",", ""), " ", "-"), tc.image, PullNever, nil); err != nil {
				t.Fatalf("NodePublish: %v", err)
			}
		})
	}
	t.Run("not cached", func(t *testing.T) {
		missing := tr.Ref("pub/app@sha256:" + strings.Repeat("0", 63) + "1")
		_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "missing", Parameters: scParams(missing, PullNever), VolumeCapabilities: []*csi.VolumeCapability{rwo}})
		wantStatus(t, "CreateVolume", err, codes.FailedPrecondition, missing, "no base", "pullPolicy is Never")
		err = publishInline(t, p, "csi-missing", missing, PullNever, nil)
		wantStatus(t, "inline NodePublish", err, codes.FailedPrecondition, missing, "no base", "pullPolicy is Never")
	})
	if n := tr.Requests(); len(n) != 0 {
		t.Errorf("the air-gapped node made %d registry requests: %v", len(n), n)
	}
}

// TestAccessDamagedBaseRecord: a cached base whose record is missing (as
// for a base of an earlier release) or damaged cannot be handed out under
// pullPolicy Never, which says why and what to do; nothing crashes or
// hangs, start-up included. IfNotPresent still works, and rewrites the
// record from its resolve (as not anonymous: it fetched no layers), after
// which StorageClass volumes under Never work again.
func TestAccessDamagedBaseRecord(t *testing.T) {
	needRoot(t)
	tr := newTenantRegistry(t)
	pinned := tr.Push(t, "pub/app:1", configured(t, "damaged"))
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.AllowInlineInsecure = true
	p := startPlugin(t, dir, cfg)
	ctx := testCtx(t)
	staging := filepath.Join(dir, "staging")
	warm, _ := createVolume(t, p, "warm", scParams(tr.Ref("pub/app:1"), PullIfNotPresent))
	if err := stageVolume(ctx, p, warm, staging); err != nil {
		t.Fatal(err)
	}
	unstageVolume(t, p, warm, staging)
	want := mustManifest(t, p.d, mustBox(t, p, warm))
	key := rootfs.Key{Digest: want.Digest, Builder: p.d.builder.Version()}
	infoPath := p.d.cache.InfoPath(key)

	write := func(b []byte) func(t *testing.T) {
		return func(t *testing.T) {
			if err := os.WriteFile(infoPath, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tc := range []struct {
		name       string
		damage     func(t *testing.T)
		msg        string
		repairable bool
	}{
		{"missing, as from an earlier release", func(*testing.T) {}, "no record of how it was pulled", true},
		{"garbage", write([]byte("\x00not json")), "unusable", true},
		{"about another base", write([]byte(`{"version":1,"digest":"sha256:` + strings.Repeat("1", 64) + `","builder":"e1","anonymous":true}`)), "describes base", true},
		{"oversized", write([]byte(strings.Repeat(" ", 2<<20))), "larger than", true},
		{"a symbolic link", func(t *testing.T) {
			if err := os.Symlink("/etc/passwd", infoPath); err != nil {
				t.Fatal(err)
			}
		}, "symbolic link", true},
		{"a FIFO", func(t *testing.T) {
			if err := syscall.Mkfifo(infoPath, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "not a regular file", true},
		{"a directory", func(t *testing.T) {
			if err := os.MkdirAll(filepath.Join(infoPath, "x"), 0o755); err != nil {
				t.Fatal(err)
			}
		}, "not a regular file", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.RemoveAll(infoPath); err != nil {
				t.Fatal(err)
			}
			tc.damage(t)
			// Start-up with the damaged record.
			p.stop()
			p = startPlugin(t, dir, cfg)
			name := strings.NewReplacer(" ", "-", ",", "").Replace(tc.name)

			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "never-" + name, Parameters: scParams(pinned, PullNever), VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			wantStatus(t, "CreateVolume under Never", err, codes.FailedPrecondition, pinned, want.Digest, infoPath, tc.msg, "pullPolicy is Never", "pullPolicy IfNotPresent writes the record")
			err = publishInline(t, p, "csi-never-"+name, pinned, PullNever, nil)
			wantStatus(t, "inline NodePublish under Never", err, codes.FailedPrecondition, infoPath)

			id, _ := createVolume(t, p, "ifnotpresent-"+name, scParams(pinned, PullIfNotPresent))
			if err := stageVolume(ctx, p, id, staging); err != nil {
				t.Fatalf("NodeStage under IfNotPresent: %v", err)
			}
			unstageVolume(t, p, id, staging)

			_, err = p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "never-again-" + name, Parameters: scParams(pinned, PullNever), VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			if !tc.repairable {
				wantStatus(t, "CreateVolume under Never, record not repairable", err, codes.FailedPrecondition, infoPath)
				return
			}
			if err != nil {
				t.Fatalf("CreateVolume under Never after IfNotPresent rewrote the record: %v", err)
			}
			info, ierr := p.d.cache.Info(key)
			if ierr != nil || info.Anonymous || !reflect.DeepEqual(info.Config, want.Config) {
				t.Fatalf("rewritten record %+v, %v; want not anonymous with config %+v", info, ierr, want.Config)
			}
			err = publishInline(t, p, "csi-never-again-"+name, pinned, PullNever, nil)
			wantStatus(t, "inline NodePublish under Never after the rewrite", err, codes.PermissionDenied, "pulled with credentials")
		})
	}
	// Each case's plugin stopped with it; one more start-up, over the
	// last case's record, serves.
	p = startPlugin(t, dir, cfg)
	if _, err := p.identity().Probe(ctx, &csi.ProbeRequest{}); err != nil {
		t.Errorf("Probe after all that: %v", err)
	}
}
