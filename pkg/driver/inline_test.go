package driver

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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
