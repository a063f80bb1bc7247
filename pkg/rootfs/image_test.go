package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// resolve pins ref in the test registry, as the driver does.
func resolve(t testing.TB, ctx context.Context, ref string) (*source.Image, error) {
	t.Helper()
	r, err := source.Parse(ref)
	if err != nil {
		t.Fatal(err)
	}
	return source.Resolve(ctx, r, source.Options{PlainHTTP: true})
}

// buildFrom is the BuildFunc the driver uses: resolve inside the build, so
// joined callers fetch nothing.
func buildFrom(t testing.TB, ref string, builds *atomic.Int32) BuildFunc {
	return plainBuild(func(ctx context.Context, out *os.File) error {
		if builds != nil {
			builds.Add(1)
		}
		img, err := resolve(t, ctx, ref)
		if err != nil {
			return err
		}
		return (&Ext4Builder{}).Build(ctx, img.V1, out)
	})
}

func needTool(t testing.TB, name string) string {
	t.Helper()
	return testenv.RequireTool(t, name, "apt-get install e2fsprogs")
}

func TestBaseMatchesImageExport(t *testing.T) {
	e2fsck := needTool(t, "e2fsck")
	reg := testregistry.NewInProcess(t)
	rich := testimage.Rich(t)
	reg.Push(t, "rich:1", rich)
	ctx := context.Background()
	img, err := resolve(t, ctx, reg.Ref("rich:1"))
	if err != nil {
		t.Fatal(err)
	}
	c := newCache(t, t.TempDir())
	base, err := c.Ensure(ctx, Key{Digest: img.Digest.String(), Builder: Ext4BuilderVersion}, buildFrom(t, reg.Ref("rich:1"), nil))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(e2fsck, "-fn", base.Path).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	if base.Size < DefaultMinSize {
		t.Errorf("base is %d bytes, below upstream's 256 MiB minimum", base.Size)
	}
	if out, _ := exec.Command(needTool(t, "dumpe2fs"), "-h", base.Path).CombinedOutput(); !bytes.Contains(out, []byte("has_journal")) {
		t.Errorf("base has no journal:\n%s", out)
	}

	testenv.RequireRoot(t, "it loop-mounts the base and reads its tree back")
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop,ro", base.Path, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	defer exec.Command("umount", mnt).Run()
	got, err := testimage.FromDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	rc := mutate.Extract(img.V1)
	exported, err := testimage.FromTar(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]testimage.Tree{
		"the fixture's expected tree":   testimage.RichTree(),
		"crane export (mutate.Extract)": exported,
	} {
		if diffs := testimage.Diff(want, got); len(diffs) > 0 {
			t.Errorf("base differs from %s:\n  %s", name, strings.Join(diffs, "\n  "))
		}
	}
}

func TestConcurrentColdCallersPullEachBlobOnce(t *testing.T) {
	reg := testregistry.NewInProcess(t)
	img := testimage.Random(t, 1, 3, 60, 4<<20)
	reg.Push(t, "random:1", img)
	reg.Reset()
	ref := reg.Ref("random:1")
	pinned, err := resolve(t, context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	reg.Reset()

	c := newCache(t, t.TempDir())
	key := Key{Digest: pinned.Digest.String(), Builder: Ext4BuilderVersion}
	var builds atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := c.Ensure(context.Background(), key, buildFrom(t, pinned.Pinned, &builds))
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := builds.Load(); n != 1 {
		t.Fatalf("%d builds, want 1", n)
	}
	blobs := blobDigests(t, img)
	for _, d := range blobs {
		if n := reg.BlobGETs(d); n != 1 {
			t.Errorf("blob %s fetched %d times, want 1", d, n)
		}
	}
	if len(blobs) != 4 {
		t.Fatalf("expected 3 layers and a config, got %d blobs", len(blobs))
	}
}

func blobDigests(t *testing.T, img v1.Image) []v1.Hash {
	t.Helper()
	cfg, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	out := []v1.Hash{cfg}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

// TestTamperedLayerIsNotCached serves a layer whose bytes do not match its
// digest: the build fails naming the digest, and nothing is installed.
func TestTamperedLayerIsNotCached(t *testing.T) {
	img := testimage.Busybox(t)
	layers, _ := img.Layers()
	bad, _ := layers[0].Digest()
	for _, tc := range []struct {
		name     string
		corrupt  func([]byte) []byte
		harmless bool
	}{
		{name: "flipped byte", corrupt: func(b []byte) []byte { b[len(b)/2] ^= 0xff; return b }},
		{name: "truncated", corrupt: func(b []byte) []byte { return b[:len(b)/2] }},
		// The client reads exactly the descriptor's size, so bytes past it
		// are never read, and what is read hashes to the digest.
		{name: "padded", corrupt: func(b []byte) []byte { return append(b, 0, 0, 0, 0) }, harmless: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testregistry.NewInProcess(t, testregistry.WithMiddleware(func(next http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+bad.String()) {
						next.ServeHTTP(w, r)
						return
					}
					rec := &recorder{header: http.Header{}}
					next.ServeHTTP(rec, r)
					body := tc.corrupt(rec.body.Bytes())
					for k, v := range rec.header {
						if k != "Content-Length" {
							w.Header()[k] = v
						}
					}
					w.WriteHeader(rec.code)
					w.Write(body)
				})
			}))
			reg.Push(t, "bb:1", img)
			pinned, err := resolve(t, context.Background(), reg.Ref("bb:1"))
			if err != nil {
				t.Fatal(err)
			}
			c := newCache(t, t.TempDir())
			k := Key{Digest: pinned.Digest.String(), Builder: Ext4BuilderVersion}
			_, err = c.Ensure(context.Background(), k, buildFrom(t, pinned.Pinned, nil))
			if tc.harmless {
				if err != nil {
					t.Fatalf("trailing bytes past the blob's size failed the build: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), bad.String()) {
				t.Fatalf("err = %v, want a failure naming layer %s", err, bad)
			}
			if _, err := os.Stat(c.Path(k)); !os.IsNotExist(err) {
				t.Fatalf("a base was installed from a tampered layer: %v", err)
			}
			assertNoTemps(t, c)
		})
	}
}

type recorder struct {
	header http.Header
	body   bytes.Buffer
	code   int
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(code int)        { r.code = code }

// tarPart is a piece of a layer's uncompressed stream: tar bytes, or a run
// of zeros that is never held in memory.
type tarPart struct {
	tar   []byte
	zeros int64
}

// tarBytes renders entries (headers and small bodies) as tar bytes. With
// end set it closes the archive; without, the next part carries on the
// last entry's body.
func tarBytes(t *testing.T, end bool, entries ...tarEntry) tarPart {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		if err := tw.WriteHeader(&e.hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	// WriteHeader writes through, so without Close buf ends with the last
	// header, ready for its body.
	if end {
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return tarPart{tar: buf.Bytes()}
}

type tarEntry struct {
	hdr  tar.Header
	body []byte
}

// lazyLayer is a gzip layer of parts. Runs of zeros are repeated copies of
// one gzip member of 1 MiB of zeros (gzip is multistream), so a layer that
// inflates to gigabytes is a few hundred KiB and built in no time.
func lazyLayer(t *testing.T, parts ...tarPart) v1.Layer {
	t.Helper()
	member := func(b []byte) []byte {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(b)
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	const mib = 1 << 20
	zeroMiB := member(make([]byte, mib))
	var blob []byte
	for _, p := range parts {
		if len(p.tar) > 0 {
			blob = append(blob, member(p.tar)...)
		}
		for n := p.zeros; n > 0; n -= mib {
			if n < mib {
				blob = append(blob, member(make([]byte, n))...)
				break
			}
			blob = append(blob, zeroMiB...)
		}
	}
	return static.NewLayer(blob, types.OCILayer)
}

// layersImage is an image of nothing but its layers, all Build reads.
type layersImage struct {
	v1.Image
	layers []v1.Layer
}

func (i layersImage) Layers() ([]v1.Layer, error) { return i.layers, nil }

// TestDecompressedBytesCount checks that every byte the layers inflate to
// counts toward MaxTotalBytes, not only the sizes of the files the image
// ends up with: bodies of whiteouts and of skipped entries, and whatever
// follows the tar end marker. Each case inflates to over 1 GiB under a
// 16 MiB limit.
func TestDecompressedBytesCount(t *testing.T) {
	const (
		limit = 16 << 20
		huge  = 1 << 30
	)
	mtime := time.Unix(1700000000, 0)
	reg := func(name string, size int64) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: size, ModTime: mtime}}
	}
	small := reg("etc/hostname", 5)
	small.body = []byte("box\n\n")
	end := tarBytes(t, true)
	for _, tc := range []struct {
		name   string
		layers [][]tarPart
		ok     bool
	}{{
		name:   "1 GiB whiteout body",
		layers: [][]tarPart{{tarBytes(t, false, small, reg("etc/.wh.gone", huge)), {zeros: huge}, end}},
	}, {
		name:   "1 GiB after the tar end",
		layers: [][]tarPart{{tarBytes(t, true, small), {zeros: huge}}},
	}, {
		name:   "1 GiB AUFS bookkeeping entry (skipped)",
		layers: [][]tarPart{{tarBytes(t, false, small, reg(".wh..wh.plnk/1.2", huge)), {zeros: huge}, end}},
	}, {
		name: "1 GiB entry of a type an image cannot hold (skipped)",
		layers: [][]tarPart{{tarBytes(t, false, small, tarEntry{hdr: tar.Header{Typeflag: 'Z', Name: "odd", Size: huge, ModTime: mtime}}),
			{zeros: huge}, end}},
	}, {
		name: "whiteout bodies over two layers, each under the limit",
		layers: [][]tarPart{
			{tarBytes(t, false, reg(".wh.a", limit*3/4)), {zeros: limit * 3 / 4}, end},
			{tarBytes(t, false, reg(".wh.b", limit*3/4)), {zeros: limit * 3 / 4}, end},
		},
	}, {
		name:   "file sizes still count",
		layers: [][]tarPart{{tarBytes(t, false, reg("big", limit+1)), {zeros: limit + 1}, end}},
	}, {
		name:   "under the limit",
		layers: [][]tarPart{{tarBytes(t, false, small, reg(".wh.x", limit/2)), {zeros: limit / 2}, end}},
		ok:     true,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			var layers []v1.Layer
			for _, parts := range tc.layers {
				layers = append(layers, lazyLayer(t, parts...))
			}
			out, err := os.Create(filepath.Join(t.TempDir(), "base.ext4"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			b := &Ext4Builder{Options: ext4.Options{MaxTotalBytes: limit}}
			err = b.Build(context.Background(), layersImage{layers: layers}, out)
			if tc.ok {
				if err != nil {
					t.Fatalf("Build: %v", err)
				}
				return
			}
			var le *ext4.LimitError
			if !errors.As(err, &le) || le.Limit != ext4.LimitTotalBytes || le.Max != limit {
				t.Fatalf("Build: %v, want a %v LimitError of %d", err, ext4.LimitTotalBytes, limit)
			}
		})
	}
}
