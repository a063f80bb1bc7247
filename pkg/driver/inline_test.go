package driver

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestCheckInline: inline volume attributes, which any pod author writes,
// cannot name host paths or insecure registries unless the admin allowed
// them, and then only below the local image root, with no links.
func TestCheckInline(t *testing.T) {
	root := filepath.Join(t.TempDir(), "images")
	outside := filepath.Dir(root)
	for _, d := range []string{filepath.Join(root, "app"), filepath.Join(outside, "etc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "app.tar"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "etc"), filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(root, "fifo.tar"), 0o644); err != nil {
		t.Fatal(err)
	}
	closed := &Driver{}
	open := &Driver{cfg: Config{LocalImageRoot: root, AllowInlineInsecure: true}}
	for _, tc := range []struct {
		name    string
		d       *Driver
		p       volumeParams
		wantErr string
	}{
		{"registry image", closed, volumeParams{Image: "registry.example/app:1"}, ""},
		{"plain HTTP refused", closed, volumeParams{Image: "registry.example/app:1", PlainHTTP: true}, "--allow-inline-insecure-registries"},
		{"skip TLS verify refused", closed, volumeParams{Image: "registry.example/app:1", InsecureSkipTLSVerify: true}, "--allow-inline-insecure-registries"},
		{"plain HTTP allowed", open, volumeParams{Image: "registry.example/app:1", PlainHTTP: true}, ""},
		{"oci refused", closed, volumeParams{Image: "oci:/etc"}, "--local-image-root"},
		{"docker-archive refused", closed, volumeParams{Image: "docker-archive:/etc/shadow"}, "--local-image-root"},
		{"oci below the root", open, volumeParams{Image: "oci:" + filepath.Join(root, "app")}, ""},
		{"archive below the root", open, volumeParams{Image: "oci-archive:" + filepath.Join(root, "app.tar")}, ""},
		{"outside the root", open, volumeParams{Image: "oci:" + filepath.Join(outside, "etc")}, "outside the local image root"},
		{"climbing out", open, volumeParams{Image: "oci:" + root + "/../etc"}, "outside the local image root"},
		{"through a link", open, volumeParams{Image: "oci:" + filepath.Join(root, "link")}, "neither a directory nor a regular file"},
		{"below a link", open, volumeParams{Image: "oci-archive:" + filepath.Join(root, "link", "x.tar")}, "symbolic link"},
		{"a FIFO", open, volumeParams{Image: "oci-archive:" + filepath.Join(root, "fifo.tar")}, "neither a directory nor a regular file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.d.checkInline(tc.p)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("checkInline = %v, want nil", err)
				}
				return
			}
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("checkInline = %v, want PermissionDenied containing %q", err, tc.wantErr)
			}
		})
	}
}

// TestInlineCredentials: tenant A's private image is in the node cache,
// pulled with the node's credentials for A's claim. Tenant B's inline
// volume naming it, with no pull secret or a wrong one, is refused; with
// the right secret it works; and an admin may let inline volumes use the
// node's credentials.
func TestInlineCredentials(t *testing.T) {
	needRoot(t)
	reg := testregistry.NewInProcess(t, testregistry.WithBasicAuth("alice", "s3cret"))
	reg.Push(t, "private:1", smallImage(t, "private"))
	// The node's docker config holds A's credentials.
	dockerDir := t.TempDir()
	auth := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	if err := os.WriteFile(filepath.Join(dockerDir, "config.json"), []byte(`{"auths":{"`+reg.Host()+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dockerDir)
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.AllowInlineInsecure = true
	p := startPlugin(t, dir, cfg)
	ctx := testCtx(t)

	// Tenant A: a claim through the StorageClass, which uses the node's
	// credentials, and is staged so that the base is cached.
	params := map[string]string{ParamImage: reg.Ref("private:1"), ParamPlainHTTP: "true"}
	id, _ := createVolume(t, p, "a", params)
	if err := stageVolume(ctx, p, id, filepath.Join(dir, "staging-a")); err != nil {
		t.Fatal(err)
	}
	digest := mustManifest(t, p.d, mustBox(t, p, id)).Digest
	pinned := reg.Ref("private@" + digest)

	publish := func(p *plugin, vol string, secrets map[string]string) error {
		_, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
			VolumeId: vol, TargetPath: filepath.Join(dir, "pods", vol), VolumeCapability: rwo, Secrets: secrets,
			VolumeContext: map[string]string{ephemeralKey: "true", ParamImage: pinned, ParamPlainHTTP: "true"},
		})
		return err
	}
	secret := func(user, pass string) map[string]string {
		a := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
		return map[string]string{dockerConfigSecretKey: `{"auths":{"` + reg.Host() + `":{"auth":"` + a + `"}}}`}
	}
	for _, tc := range []struct {
		name    string
		secrets map[string]string
		code    codes.Code
	}{
		{"no pull secret", nil, codes.PermissionDenied},
		{"wrong pull secret", secret("bob", "guess"), codes.PermissionDenied},
		{"the right pull secret", secret("alice", "s3cret"), codes.OK},
	} {
		vol := "csi-" + strings.ReplaceAll(tc.name, " ", "-")
		err := publish(p, vol, tc.secrets)
		if status.Code(err) != tc.code {
			t.Errorf("%s: NodePublish = %v, want %v", tc.name, err, tc.code)
		}
		if err == nil {
			p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: filepath.Join(dir, "pods", vol)})
		} else if _, serr := os.Stat(filepath.Join(p.home, "boxes", vol)); serr == nil {
			t.Errorf("%s: a refused inline volume left a box", tc.name)
		}
	}

	// A's claim still works beside all this.
	unstageVolume(t, p, id, filepath.Join(dir, "staging-a"))
	if err := stageVolume(ctx, p, id, filepath.Join(dir, "staging-a")); err != nil {
		t.Errorf("tenant A's own volume: %v", err)
	}
	unstageVolume(t, p, id, filepath.Join(dir, "staging-a"))

	// The admin's opt-in: inline volumes may use the node's credentials.
	p.stop()
	cfg.InlineNodeCredentials = true
	p = startPlugin(t, dir, cfg)
	if err := publish(p, "csi-node-creds", nil); err != nil {
		t.Errorf("with --inline-node-credentials: %v", err)
	} else {
		p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-node-creds", TargetPath: filepath.Join(dir, "pods", "csi-node-creds")})
	}
}
