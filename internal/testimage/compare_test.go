package testimage

import (
	"strings"
	"testing"
	"time"
)

func TestDiffCatchesEachField(t *testing.T) {
	base := Entry{Type: TypeFile, Mode: 0o644, UID: 1, GID: 1, Size: 3, SHA256: "aa", Nlink: 1, ModTime: time.Unix(5, 7), Xattrs: map[string][]byte{"user.a": []byte("1")}}
	cases := []struct {
		name   string
		mutate func(e *Entry)
		want   string
	}{
		{"type", func(e *Entry) { e.Type = TypeFIFO }, "type"},
		{"mode", func(e *Entry) { e.Mode = 0o4644 }, "mode"},
		{"owner", func(e *Entry) { e.UID = 1000 }, "owner"},
		{"content", func(e *Entry) { e.SHA256 = "bb" }, "sha256"},
		{"link count", func(e *Entry) { e.Nlink = 2 }, "nlink"},
		{"xattr value", func(e *Entry) { e.Xattrs = map[string][]byte{"user.a": []byte("2")} }, "xattrs"},
		{"mtime nanoseconds", func(e *Entry) { e.ModTime = time.Unix(5, 8) }, "mtime"},
	}
	for _, tc := range cases {
		got := base
		tc.mutate(&got)
		d := Diff(Tree{"/f": base}, Tree{"/f": got})
		if len(d) != 1 || !strings.Contains(d[0], tc.want) {
			t.Errorf("%s: diffs %q, want one about %s", tc.name, d, tc.want)
		}
	}
	if d := Diff(Tree{"/f": base}, Tree{"/g": base}); len(d) != 2 {
		t.Errorf("missing and unexpected paths: %q", d)
	}
	if d := Diff(Tree{"/f": base}, Tree{"/f": base}); len(d) != 0 {
		t.Errorf("identical trees differ: %q", d)
	}
}
