package ext4

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// testTime is a fixed timestamp with a nanosecond part, so that round trips
// of the extra time fields are visible.
func testTime() time.Time { return time.Unix(1700000000, 123456789) }

// tentry is one tar entry of a synthetic layer. data produces the content
// of regular files (nil: empty) and can be called more than once.
type tentry struct {
	hdr  tar.Header
	data func() io.Reader
}

func dirE(name string, mode int64) tentry {
	return tentry{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode, ModTime: testTime()}}
}

func fileE(name string, mode int64, content []byte) tentry {
	return tentry{
		hdr:  tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode, Size: int64(len(content)), ModTime: testTime()},
		data: func() io.Reader { return bytes.NewReader(content) },
	}
}

func genFileE(name string, size int64, gen func() io.Reader) tentry {
	return tentry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: testTime()}, data: gen}
}

func symlinkE(name, target string) tentry {
	return tentry{hdr: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777, ModTime: testTime()}}
}

func linkE(name, target string) tentry {
	return tentry{hdr: tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target, ModTime: testTime()}}
}

func devE(name string, typ byte, major, minor int64) tentry {
	return tentry{hdr: tar.Header{Name: name, Typeflag: typ, Mode: 0o660, Devmajor: major, Devminor: minor, ModTime: testTime()}}
}

// with returns e modified by f; handy for owners, xattrs and times.
func (e tentry) with(f func(h *tar.Header)) tentry {
	f(&e.hdr)
	return e
}

// tarStream renders entries as a tar stream, produced on the fly so that
// large synthetic files never sit in memory.
func tarStream(entries []tentry) *io.PipeReader {
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		for _, e := range entries {
			hdr := e.hdr
			hdr.Format = tar.FormatPAX // nanosecond times and xattrs
			if err := tw.WriteHeader(&hdr); err != nil {
				pw.CloseWithError(err)
				return
			}
			if e.data != nil {
				if _, err := io.Copy(tw, e.data()); err != nil {
					pw.CloseWithError(err)
					return
				}
			}
		}
		pw.CloseWithError(tw.Close())
	}()
	return pr
}

// buildImage builds an image from layers into a new temporary file.
func buildImage(t testing.TB, opts Options, layers ...[]tentry) (string, Stats, error) {
	t.Helper()
	streams := make([]io.Reader, len(layers))
	for i, l := range layers {
		r := tarStream(l)
		defer r.Close() // stops the generator of a layer not read to its end
		streams[i] = r
	}
	return buildImageFrom(t, opts, streams...)
}

// buildImageFrom builds an image from layer streams into a new temporary
// file.
func buildImageFrom(t testing.TB, opts Options, layers ...io.Reader) (string, Stats, error) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "rootfs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := NewWriter(f, opts)
	if err != nil {
		return img, Stats{}, err
	}
	ctx := context.Background()
	for _, r := range layers {
		if err := b.ApplyLayer(ctx, r); err != nil {
			return img, Stats{}, err
		}
	}
	st, err := b.Finish(ctx)
	return img, st, err
}

func mustBuild(t testing.TB, opts Options, layers ...[]tentry) (string, Stats) {
	t.Helper()
	img, st, err := buildImage(t, opts, layers...)
	if err != nil {
		t.Fatalf("building image: %v", err)
	}
	return img, st
}

func needTool(t testing.TB, name string) string {
	t.Helper()
	return testenv.RequireTool(t, name, "apt-get install e2fsprogs")
}

// fsck runs a forced, read-only e2fsck and fails the test unless it finds
// nothing at all to fix (exit code 0). It gives e2fsck two minutes: on a
// badly broken image it can spin far longer than the whole test may take.
func fsck(t testing.TB, img string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, needTool(t, "e2fsck"), "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v (%v)\n%.4000s", img, err, ctx.Err(), out)
	}
}

// mountImage loop-mounts img (opts: "ro" or "rw") and unmounts it at the
// end of the test, or when the returned function is called.
func mountImage(t testing.TB, img, opts string) (dir string, unmount func()) {
	t.Helper()
	testenv.RequireRoot(t, "it loop-mounts the image")
	dir = t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop,"+opts, img, dir).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", img, err, out)
	}
	mounted := true
	unmount = func() {
		if !mounted {
			return
		}
		mounted = false
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", dir, err, out)
		}
	}
	t.Cleanup(unmount)
	return dir, unmount
}

// randomContent returns a generator of size deterministic pseudo-random
// bytes.
func randomContent(seed uint64, size int64) func() io.Reader {
	return func() io.Reader {
		return io.LimitReader(&rngReader{r: rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})}, size)
	}
}

type rngReader struct{ r *rand.ChaCha8 }

func (r *rngReader) Read(p []byte) (int, error) { return r.r.Read(p) }

func sha256Of(r io.Reader) string {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		panic(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// xattrsOf lists a file's extended attributes (not for symlinks).
func xattrsOf(path string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := syscall.Listxattr(path, buf)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := syscall.Getxattr(path, name, v)
		if err != nil {
			return nil, err
		}
		out[name] = string(v[:m])
	}
	return out, nil
}

// dumpe2fsHeader returns the "Key: value" lines of dumpe2fs -h.
func dumpe2fsHeader(t testing.TB, img string) map[string]string {
	t.Helper()
	out, err := exec.Command(needTool(t, "dumpe2fs"), "-h", img).Output()
	if err != nil {
		t.Fatalf("dumpe2fs -h: %v", err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return m
}

func asEntryError(t testing.TB, err error) *EntryError {
	t.Helper()
	var ee *EntryError
	if !errors.As(err, &ee) {
		t.Fatalf("got %v, want an *EntryError", err)
	}
	return ee
}
