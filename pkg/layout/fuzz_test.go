package layout

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func FuzzValidateVolumeID(f *testing.F) {
	for _, tc := range volumeIDCases {
		f.Add(tc.id)
	}
	h := NewHome("/var/lib/boxlite-csi", Config{BindMountSupported: true})
	boxes := h.BoxesDir()
	f.Fuzz(func(t *testing.T, id string) {
		err := ValidateVolumeID(id)
		b, boxErr := h.Box(id, WithIsolatedMounts())
		if err != nil {
			var ive *InvalidVolumeIDError
			if !errors.As(boxErr, &ive) || ive.ID != id {
				t.Fatalf("ValidateVolumeID rejected %q (%v) but Box returned %v", id, err, boxErr)
			}
			if msg := err.Error(); len(msg) > 400 {
				t.Fatalf("error message for %d-byte ID is %d bytes", len(id), len(msg))
			}
			return
		}
		if boxErr != nil {
			t.Fatalf("ValidateVolumeID accepted %q but Box failed: %v", id, boxErr)
		}
		root := b.Root()
		if root != boxes+"/"+id {
			t.Fatalf("Root(%q) = %q, want %q", id, root, boxes+"/"+id)
		}
		if filepath.Dir(root) != boxes || filepath.Base(root) != id {
			t.Fatalf("Root(%q) = %q is not a direct child of %s", id, root, boxes)
		}
		for _, p := range []string{b.BasePath(), b.GuestRootfsDiskPath(), b.MountsDir(), b.SocketPath()} {
			if !strings.HasPrefix(p, root+"/") {
				t.Fatalf("%q escapes %q", p, root)
			}
		}
	})
}
