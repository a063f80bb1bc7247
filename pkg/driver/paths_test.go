package driver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCheckPath(t *testing.T) {
	for _, tc := range []struct {
		p       string
		wantErr string
	}{
		{"/var/lib/kubelet/pods/x/volumes/v", ""},
		{"/", ""},
		{"", "is required"},
		{"relative/path", "absolute, clean"},
		{"/a/../b", "absolute, clean"},
		{"/a/./b", "absolute, clean"},
		{"/a/b/", "absolute, clean"},
		{"/a\x00b", "contains NUL"},
		{"/" + strings.Repeat("a", maxPathLen), "at most 4096 allowed"},
	} {
		err := checkPath("target path", tc.p)
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("checkPath(%q) = %v, want nil", tc.p, err)
			}
			continue
		}
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("checkPath(%q) = %v, want InvalidArgument containing %q", tc.p, err, tc.wantErr)
		}
	}
}

// TestCheckMountPathSymlink needs no root: a user can plant the link.
func TestCheckMountPathSymlink(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real")
	if err := os.Mkdir(real, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := checkMountPath("target path", filepath.Join(real, "not-yet", "there")); err != nil {
		t.Errorf("a path with missing plain components was refused: %v", err)
	}
	err := checkMountPath("target path", filepath.Join(dir, "link", "sub"))
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "is a symbolic link") {
		t.Errorf("a path through a symbolic link gave %v, want InvalidArgument naming the link", err)
	}
}
