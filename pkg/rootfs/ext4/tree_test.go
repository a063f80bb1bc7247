package ext4

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestSplitPath(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    string
		wantErr bool
	}{
		{in: "a/b/c", want: "a/b/c"},
		{in: "./a/b/", want: "a/b"},
		{in: "/a//b/./c", want: "a/b/c"},
		{in: "./", want: ""},
		{in: "/", want: ""},
		{in: "a/../b", want: "b"},
		{in: "a/b/../../c", want: "c"},
		{in: "../escape", wantErr: true},
		{in: "a/../../escape", wantErr: true},
		{in: "/../etc/passwd", wantErr: true},
		{in: strings.Repeat("x", 256), wantErr: true},
	} {
		got, err := splitPath(tc.in)
		if (err != nil) != tc.wantErr {
			t.Errorf("splitPath(%q) error = %v, want error %v", tc.in, err, tc.wantErr)
			continue
		}
		if !tc.wantErr && strings.Join(got, "/") != tc.want {
			t.Errorf("splitPath(%q) = %q, want %q", tc.in, strings.Join(got, "/"), tc.want)
		}
	}
}

// applyLayers runs layers through a Writer without finishing it.
func applyLayers(t *testing.T, layers ...[]tentry) (*Writer, error) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	b, err := NewWriter(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		r := tarStream(l)
		if err := b.ApplyLayer(context.Background(), r); err != nil {
			io.Copy(io.Discard, r)
			return b, err
		}
	}
	return b, nil
}

// listTree renders the merged tree as sorted "path type" lines; regular
// files show their size and link count, symlinks their target.
func listTree(b *Writer) []string {
	var out []string
	t := b.tree
	var walk func(n nodeID, path string)
	walk = func(n nodeID, path string) {
		for c := t.node(n).first; c != 0; c = t.node(c).next {
			p := path + string(t.name(t.node(c)))
			if t.child(n, string(t.name(t.node(c)))) != c {
				p += " (not indexed)"
			}
			in := t.inodeOf(c)
			switch in.mode & sIFMT {
			case sIFDIR:
				out = append(out, p+"/")
				walk(c, p+"/")
			case sIFREG:
				out = append(out, fmt.Sprintf("%s size=%d links=%d", p, in.size, in.links))
			case sIFLNK:
				out = append(out, p+" -> "+t.target(in))
			default:
				out = append(out, p+" special")
			}
		}
	}
	walk(t.root, "")
	if n := len(out); t.index.count != n {
		out = append(out, fmt.Sprintf("index holds %d names, the tree %d", t.index.count, n))
	}
	slices.Sort(out)
	return out
}

func TestLayerSemantics(t *testing.T) {
	f := func(name string, size int) tentry { return fileE(name, 0o644, make([]byte, size)) }
	for _, tc := range []struct {
		name   string
		layers [][]tentry
		want   []string
	}{{
		name: "implicit parents",
		layers: [][]tentry{{
			f("a/b/c", 1),
		}},
		want: []string{"a/", "a/b/", "a/b/c size=1 links=1"},
	}, {
		name: "later layer replaces a file",
		layers: [][]tentry{
			{f("a", 1)},
			{f("a", 2)},
		},
		want: []string{"a size=2 links=1"},
	}, {
		name: "file replaces a directory and its subtree",
		layers: [][]tentry{
			{f("d/x", 1), f("d/y/z", 1)},
			{f("d", 3)},
		},
		want: []string{"d size=3 links=1"},
	}, {
		name: "directory replaces a file",
		layers: [][]tentry{
			{f("d", 1)},
			{dirE("d", 0o755), f("d/x", 1)},
		},
		want: []string{"d/", "d/x size=1 links=1"},
	}, {
		name: "directory over directory merges",
		layers: [][]tentry{
			{f("d/x", 1)},
			{dirE("d", 0o700), f("d/y", 1)},
		},
		want: []string{"d/", "d/x size=1 links=1", "d/y size=1 links=1"},
	}, {
		name: "whiteout removes a file and a subtree",
		layers: [][]tentry{
			{f("a/x", 1), f("a/y", 1), f("b/c/d", 1)},
			{f("a/.wh.x", 0), f(".wh.b", 0)},
		},
		want: []string{"a/", "a/y size=1 links=1"},
	}, {
		name: "whiteout of a missing name is a no-op",
		layers: [][]tentry{
			{f("a/x", 1)},
			{f("a/.wh.nothere", 0), f("b/.wh.nothere", 0)},
		},
		want: []string{"a/", "a/x size=1 links=1", "b/"},
	}, {
		name: "whiteout spares what the same layer adds",
		layers: [][]tentry{
			{f("a/x", 1)},
			{f("a/x", 2), f("a/.wh.x", 0)},
		},
		want: []string{"a/", "a/x size=2 links=1"},
	}, {
		name: "opaque marker first",
		layers: [][]tentry{
			{f("o/lower", 1), f("o/sub/lower", 1)},
			{f("o/.wh..wh..opq", 0), f("o/upper", 2), f("o/sub/upper", 2)},
		},
		want: []string{"o/", "o/sub/", "o/sub/upper size=2 links=1", "o/upper size=2 links=1"},
	}, {
		name: "opaque marker last",
		layers: [][]tentry{
			{f("o/lower", 1), f("o/sub/lower", 1), f("o/sub2/lower", 1)},
			{f("o/upper", 2), f("o/sub/upper", 2), f("o/.wh..wh..opq", 0)},
		},
		want: []string{"o/", "o/sub/", "o/sub/upper size=2 links=1", "o/upper size=2 links=1"},
	}, {
		name: "opaque directory only hides lower layers",
		layers: [][]tentry{
			{f("o/l0", 1)},
			{f("o/l1", 1)},
			{f("o/.wh..wh..opq", 0), f("o/l2", 1)},
		},
		want: []string{"o/", "o/l2 size=1 links=1"},
	}, {
		name: "aufs metadata whiteouts are ignored",
		layers: [][]tentry{
			{f("a", 1)},
			{f(".wh..wh.plnk/1.2", 1), f(".wh..wh.aufs", 0)},
		},
		want: []string{"a size=1 links=1"},
	}, {
		name: "hard links share the inode",
		layers: [][]tentry{
			{f("bin/ls", 5), linkE("bin/dir", "bin/ls")},
			{linkE("bin/vdir", "/bin/ls")},
		},
		want: []string{"bin/", "bin/dir size=5 links=3", "bin/ls size=5 links=3", "bin/vdir size=5 links=3"},
	}, {
		name: "hard link survives whiteout of its target",
		layers: [][]tentry{
			{f("a", 5), linkE("b", "a")},
			{f(".wh.a", 0)},
		},
		want: []string{"b size=5 links=1"},
	}, {
		name: "hard link replacing the directory holding its target",
		layers: [][]tentry{
			{f("d/t", 5)},
			{linkE("d", "d/t")},
		},
		want: []string{"d size=5 links=1"},
	}, {
		name: "parents resolve through symlinks inside the root",
		layers: [][]tentry{
			{dirE("usr/lib", 0o755), symlinkE("lib", "usr/lib"), symlinkE("abs", "/usr"), symlinkE("up", "../../usr")},
			{f("lib/libc.so", 1), f("abs/lib/x", 1), f("up/y", 1)},
		},
		want: []string{
			"abs -> /usr", "lib -> usr/lib", "up -> ../../usr", "usr/", "usr/lib/",
			"usr/lib/libc.so size=1 links=1", "usr/lib/x size=1 links=1", "usr/y size=1 links=1",
		},
	}, {
		name: "entry replaces a symlink instead of following it",
		layers: [][]tentry{
			{f("target", 1), symlinkE("l", "target")},
			{f("l", 2)},
		},
		want: []string{"l size=2 links=1", "target size=1 links=1"},
	}, {
		name: "root entry updates the root",
		layers: [][]tentry{
			{dirE("./", 0o700), f("./x", 1)},
		},
		want: []string{"x size=1 links=1"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := applyLayers(t, tc.layers...)
			if err != nil {
				t.Fatal(err)
			}
			if got := listTree(b); !slices.Equal(got, tc.want) {
				t.Errorf("tree:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(tc.want, "\n  "))
			}
		})
	}
}

func TestLayerErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		layers   [][]tentry
		wantPath string
		wantMsg  string
	}{{
		name:     "escape",
		layers:   [][]tentry{{fileE("../escape", 0o644, nil)}},
		wantPath: "../escape",
		wantMsg:  "escapes the root",
	}, {
		name:     "escape in the middle",
		layers:   [][]tentry{{fileE("a/../../escape", 0o644, nil)}},
		wantPath: "a/../../escape",
		wantMsg:  "escapes the root",
	}, {
		name:     "hard link to a missing target",
		layers:   [][]tentry{{linkE("bin/sh", "bin/bash")}},
		wantPath: "bin/sh",
		wantMsg:  `"bin/bash" does not exist`,
	}, {
		name:     "hard link to a directory",
		layers:   [][]tentry{{dirE("d", 0o755), linkE("l", "d")}},
		wantPath: "l",
		wantMsg:  "is a directory",
	}, {
		name:     "hard link target escapes",
		layers:   [][]tentry{{linkE("l", "../../etc/shadow")}},
		wantPath: "l",
		wantMsg:  "escapes the root",
	}, {
		name:     "parent is a file",
		layers:   [][]tentry{{fileE("f", 0o644, nil), fileE("f/x", 0o644, nil)}},
		wantPath: "f/x",
		wantMsg:  "not a directory",
	}, {
		name:     "symlink loop",
		layers:   [][]tentry{{symlinkE("a", "b"), symlinkE("b", "a"), fileE("a/x", 0o644, nil)}},
		wantPath: "a/x",
		wantMsg:  "too many levels",
	}, {
		name:     "root replaced by a file",
		layers:   [][]tentry{{fileE(".", 0o644, nil)}},
		wantPath: ".",
		wantMsg:  "root",
	}, {
		name:     "empty symlink",
		layers:   [][]tentry{{symlinkE("l", "")}},
		wantPath: "l",
		wantMsg:  "symlink target",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := applyLayers(t, tc.layers...)
			ee := asEntryError(t, err)
			if ee.Path != tc.wantPath || !strings.Contains(err.Error(), tc.wantMsg) || !strings.Contains(err.Error(), tc.wantPath) {
				t.Errorf("got %v (path %q), want path %q and %q in the message", err, ee.Path, tc.wantPath, tc.wantMsg)
			}
			if _, err2 := b.Finish(context.Background()); !errors.Is(err2, err) {
				t.Errorf("Finish after a failed layer returned %v, want the sticky %v", err2, err)
			}
		})
	}
}

func TestLimits(t *testing.T) {
	huge := tentry{hdr: tar.Header{Name: "sparse", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1 << 40, ModTime: testTime()}}
	for _, tc := range []struct {
		name   string
		opts   Options
		layers [][]tentry
		limit  Limit
	}{{
		name:   "1 TiB file claim",
		layers: [][]tentry{{huge}},
		limit:  LimitFileSize,
	}, {
		name:   "total bytes over layers",
		opts:   Options{MaxTotalBytes: 20000},
		layers: [][]tentry{{fileE("a", 0o644, make([]byte, 12000))}, {fileE("a", 0o644, make([]byte, 12000))}},
		limit:  LimitTotalBytes,
	}, {
		name:   "file count",
		opts:   Options{MaxFiles: 100},
		layers: [][]tentry{manyFiles("d", 101)},
		limit:  LimitFiles,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := buildImage(t, tc.opts, tc.layers...)
			var le *LimitError
			if !errors.As(err, &le) || le.Limit != tc.limit {
				t.Fatalf("got %v, want a *LimitError for %s", err, tc.limit)
			}
			asEntryError(t, err)
		})
	}
}

// zeros is an endless stream of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func zeroBody(n int64) func() io.Reader {
	return func() io.Reader { return io.LimitReader(zeros{}, n) }
}

// TestLayerBytesCount checks that every byte of a layer stream counts
// toward MaxTotalBytes, also the bytes that never become file content.
// The 1 GiB bodies are generated as they are read.
func TestLayerBytesCount(t *testing.T) {
	const (
		limit = 8 << 20
		huge  = 1 << 30
	)
	odd := tentry{hdr: tar.Header{Name: "odd", Typeflag: 'Z', Size: huge, ModTime: testTime()}, data: zeroBody(huge)}
	for _, tc := range []struct {
		name   string
		layers []func() io.Reader
	}{{
		name:   "1 GiB whiteout body",
		layers: []func() io.Reader{layerOf(fileE("a", 0o644, []byte("a")), genFileE(".wh.b", huge, zeroBody(huge)))},
	}, {
		name: "1 GiB after the tar end",
		layers: []func() io.Reader{func() io.Reader {
			return io.MultiReader(tarStream([]tentry{fileE("a", 0o644, []byte("a"))}), io.LimitReader(zeros{}, huge))
		}},
	}, {
		name:   "1 GiB AUFS bookkeeping entry",
		layers: []func() io.Reader{layerOf(genFileE(".wh..wh.plnk/1.2", huge, zeroBody(huge)))},
	}, {
		name:   "1 GiB entry of a type an image cannot hold",
		layers: []func() io.Reader{layerOf(odd)},
	}, {
		name: "whiteout bodies over two layers",
		layers: []func() io.Reader{
			layerOf(genFileE(".wh.a", limit*3/4, zeroBody(limit*3/4))),
			layerOf(genFileE(".wh.b", limit*3/4, zeroBody(limit*3/4))),
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "img"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			w, err := NewWriter(f, Options{MaxTotalBytes: limit})
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range tc.layers {
				r := l()
				err = w.ApplyLayer(context.Background(), r)
				if c, ok := r.(io.Closer); ok {
					c.Close() // stops the generator
				}
				if err != nil {
					break
				}
			}
			var le *LimitError
			if !errors.As(err, &le) || le.Limit != LimitTotalBytes || le.Max != limit {
				t.Fatalf("got %v, want a *LimitError for %s", err, LimitTotalBytes)
			}
			if w.readBytes > limit+1 {
				t.Errorf("read %d bytes past the limit", w.readBytes-limit)
			}
		})
	}
}

// TestLayerBytesLimitIsExact checks the boundary: a layer stream of
// exactly MaxTotalBytes bytes applies, one byte more does not.
func TestLayerBytesLimitIsExact(t *testing.T) {
	stream, err := io.ReadAll(tarStream([]tentry{fileE("a", 0o644, []byte("abc")), dirE("d", 0o755)}))
	if err != nil {
		t.Fatal(err)
	}
	for _, limit := range []int64{int64(len(stream)), int64(len(stream)) - 1} {
		_, st, err := buildImageFrom(t, Options{MaxTotalBytes: limit}, bytes.NewReader(stream))
		if ok := limit >= int64(len(stream)); ok != (err == nil) {
			t.Fatalf("%d-byte stream under MaxTotalBytes %d: %v", len(stream), limit, err)
		}
		if err == nil && st.LayerBytes != int64(len(stream)) {
			t.Errorf("Stats.LayerBytes = %d, want %d", st.LayerBytes, len(stream))
		}
	}
}

// TestChildIndex checks the tree's name index against a map through many
// random adds and removes, which exercise its growth and the back shifts
// of deletion.
func TestChildIndex(t *testing.T) {
	tr := newTree(timestamp{}, nil)
	type key struct {
		dir  nodeID
		name string
	}
	model := map[key]nodeID{}
	dirs := []nodeID{tr.root}
	for i := range 8 {
		in := tr.newInode(tr.implicitDir(), nil)
		id, err := tr.add(tr.root, fmt.Sprintf("dir%d", i), in)
		if err != nil {
			t.Fatal(err)
		}
		model[key{tr.root, fmt.Sprintf("dir%d", i)}] = id
		dirs = append(dirs, id)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	const ops = 60000
	for i := range ops {
		k := key{dirs[1+rng.IntN(len(dirs)-1)], fmt.Sprintf("f%d", rng.IntN(3000))}
		if id, ok := model[k]; ok && rng.IntN(3) > 0 {
			tr.remove(id)
			delete(model, k)
		} else if !ok {
			id, err := tr.add(k.dir, k.name, tr.newInode(inode{mode: sIFREG | 0o644}, nil))
			if err != nil {
				t.Fatal(err)
			}
			model[k] = id
		}
		if i%2000 == 0 || i == ops-1 {
			for k, id := range model {
				if got := tr.child(k.dir, k.name); got != id {
					t.Fatalf("op %d: %s in %d is %d, want %d", i, k.name, k.dir, got, id)
				}
			}
			if tr.index.count != len(model) {
				t.Fatalf("op %d: index holds %d names, want %d", i, tr.index.count, len(model))
			}
		}
	}
	for _, d := range dirs[1:] {
		n := 0
		for c := tr.node(d).first; c != 0; c = tr.node(c).next {
			if model[key{d, string(tr.name(tr.node(c)))}] != c {
				t.Fatalf("directory %d lists %q, which is gone", d, tr.name(tr.node(c)))
			}
			n++
		}
		want := 0
		for k := range model {
			if k.dir == d {
				want++
			}
		}
		if n != want {
			t.Fatalf("directory %d lists %d children, want %d", d, n, want)
		}
	}
}

// TestImplicitDirsCount checks that directories an entry implies count
// toward MaxFiles: each costs memory like an entry, and one entry may
// imply thousands.
func TestImplicitDirsCount(t *testing.T) {
	deep := strings.Repeat("d/", 50) + "f"
	_, _, err := buildImage(t, Options{MaxFiles: 20}, []tentry{fileE(deep, 0o644, nil)})
	var le *LimitError
	if !errors.As(err, &le) || le.Limit != LimitFiles {
		t.Fatalf("got %v, want a *LimitError for %s", err, LimitFiles)
	}
	if _, _, err := buildImage(t, Options{MaxFiles: 51}, []tentry{fileE(deep, 0o644, nil)}); err != nil {
		t.Fatalf("50 implied directories and one entry under MaxFiles 51: %v", err)
	}
}

// layerOf returns a generator of the tar stream of entries.
func layerOf(entries ...tentry) func() io.Reader {
	return func() io.Reader { return tarStream(entries) }
}

func manyFiles(dir string, n int) []tentry {
	var es []tentry
	for i := range n {
		es = append(es, fileE(fmt.Sprintf("%s/file-with-a-longish-name-%05d", dir, i), 0o644, nil))
	}
	return es
}

func TestACLToDisk(t *testing.T) {
	// user::rw- user:1000:r-- group::r-- mask::r-- other::---
	vfs := []byte{
		2, 0, 0, 0,
		1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff,
		2, 0, 4, 0, 0xe8, 3, 0, 0,
		4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
		0x10, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
		0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
	}
	want := []byte{
		1, 0, 0, 0,
		1, 0, 6, 0,
		2, 0, 4, 0, 0xe8, 3, 0, 0,
		4, 0, 4, 0,
		0x10, 0, 4, 0,
		0x20, 0, 0, 0,
	}
	got, err := aclToDisk(vfs)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("aclToDisk = %v, %v; want %v", got, err, want)
	}
	if _, err := aclToDisk(vfs[:7]); err == nil {
		t.Error("truncated ACL accepted")
	}
}

func TestExtentTreeShape(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want []int
	}{
		{0, nil}, {4, nil}, {5, []int{1}}, {340, []int{1}}, {1360, []int{4}},
		{1361, []int{5, 1}}, {340 * 340 * 4, []int{340 * 4, 4}}, {340*340*4 + 1, []int{340*4 + 1, 5, 1}},
	} {
		if got := treeShape(tc.n); !slices.Equal(got, tc.want) {
			t.Errorf("treeShape(%d) = %v, want %v", tc.n, got, tc.want)
		}
	}
}

func TestCursorSkipsBackupAreas(t *testing.T) {
	c := cursor{next: 10, skip: 10}
	var got []run
	for total := uint64(0); total < 3*blocksPerGroup; {
		s, n := c.take(5000)
		got = append(got, run{s, n})
		total += n
	}
	for _, r := range got {
		for blk := r.start; blk < r.start+r.n; blk++ {
			if g := blk / blocksPerGroup; isBackupGroup(g) && blk%blocksPerGroup < c.skip {
				t.Fatalf("run %+v covers backup area block %d", r, blk)
			}
		}
	}
	if want := []uint64{0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125}; !slices.Equal(backupGroupsBelow(126), want) {
		t.Errorf("backup groups = %v, want %v", backupGroupsBelow(126), want)
	}
}

func backupGroupsBelow(n uint64) []uint64 {
	var gs []uint64
	for g := range n {
		if isBackupGroup(g) {
			gs = append(gs, g)
		}
	}
	return gs
}

func TestTarXattrs(t *testing.T) {
	hdr := &tar.Header{PAXRecords: map[string]string{
		"SCHILY.xattr.user.a":                 "1",
		"SCHILY.xattr.security.capability":    "cap",
		"LIBARCHIVE.xattr.user.b%20c":         "Mg==", // "2"
		"LIBARCHIVE.xattr.user.a":             "eA==", // SCHILY wins
		"SCHILY.xattr.com.apple.quarantine":   "q",    // no such namespace on Linux
		"SCHILY.xattr.system.nfs4_acl":        "n",
		"SCHILY.xattr.trusted.overlay.opaque": "y",
		"path":                                "ignored",
	}}
	xs, skipped, err := tarXattrs(hdr)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, x := range xs {
		got = append(got, fmt.Sprintf("%d:%s=%s", x.index, x.name, x.value))
	}
	want := []string{"1:a=1", "1:b c=2", "4:overlay.opaque=y", "6:capability=cap"}
	if !slices.Equal(got, want) || skipped != 2 {
		t.Errorf("got %q (%d skipped), want %q (2 skipped)", got, skipped, want)
	}
	hdr.PAXRecords["LIBARCHIVE.xattr.user.bad"] = "!!"
	if _, _, err := tarXattrs(hdr); err == nil {
		t.Error("bad base64 accepted")
	}
}
