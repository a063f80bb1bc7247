package ext4

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// benchCorpus returns realistic, compressible file content: Go sources from
// GOROOT, or pseudo-random words if they are not installed.
func benchCorpus(limit int) []byte {
	var corpus bytes.Buffer
	filepath.WalkDir(filepath.Join(runtime.GOROOT(), "src"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || corpus.Len() >= limit {
			return fs.SkipAll
		}
		if strings.HasSuffix(p, ".go") {
			if data, err := os.ReadFile(p); err == nil {
				corpus.Write(data)
			}
		}
		return nil
	})
	r := rand.New(rand.NewPCG(1, 2))
	words := []string{"func", "return", "if", "err", "nil", "for", "range", "package", "import", "struct", "{", "}", "\n"}
	for corpus.Len() < limit {
		corpus.WriteString(words[r.IntN(len(words))] + " ")
	}
	return corpus.Bytes()
}

// benchTree renders one synthetic layer of about totalBytes in nfiles files
// (a few large ones, many small ones, nested directories, some symlinks) as
// a tar in memory. It returns the tar and the content bytes.
func benchTree(tb testing.TB, nfiles int, totalBytes int64) ([]byte, int64) {
	tb.Helper()
	corpus := benchCorpus(16 << 20)
	r := rand.New(rand.NewPCG(3, 4))
	sizes := make([]int64, nfiles)
	var sum int64
	for i := range sizes {
		if i%20 == 0 {
			sizes[i] = 256<<10 + r.Int64N(2<<20) // the occasional library
		} else {
			sizes[i] = 200 + r.Int64N(24<<10)
		}
		sum += sizes[i]
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	var content int64
	mtime := time.Unix(1700000000, 0)
	for d := range 64 {
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("usr/d%02d/", d), Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime})
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("usr/d%02d/sub/", d), Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime})
	}
	for i, size := range sizes {
		size = size * totalBytes / sum
		name := fmt.Sprintf("usr/d%02d/sub/file%05d.go", i%64, i)
		if i%3 == 0 {
			name = fmt.Sprintf("usr/d%02d/file%05d.go", i%64, i)
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: mtime}); err != nil {
			tb.Fatal(err)
		}
		for left := size; left > 0; {
			off := r.IntN(len(corpus) - 1)
			n := min(left, int64(len(corpus)-off))
			tw.Write(corpus[off : off+int(n)])
			left -= n
		}
		content += size
		if i%50 == 0 {
			tw.WriteHeader(&tar.Header{Name: name + ".lnk", Typeflag: tar.TypeSymlink, Linkname: filepath.Base(name), Mode: 0o777, ModTime: mtime})
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes(), content
}

const (
	benchFiles    = 3000
	benchBytes    = 100 << 20
	benchHeadroom = 64 << 20
)

func buildFromTar(tb testing.TB, tarball []byte, img string) Stats {
	f, err := os.Create(img)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	b, err := NewWriter(f, Options{Headroom: benchHeadroom})
	if err != nil {
		tb.Fatal(err)
	}
	if err := b.ApplyLayer(context.Background(), bytes.NewReader(tarball)); err != nil {
		tb.Fatal(err)
	}
	st, err := b.Finish(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return st
}

// BenchmarkBuild measures the streaming writer on ~100 MB in 3000 files.
func BenchmarkBuild(b *testing.B) {
	tarball, content := benchTree(b, benchFiles, benchBytes)
	dir := b.TempDir()
	b.SetBytes(content)
	b.ResetTimer()
	for i := range b.N {
		img := filepath.Join(dir, strconv.Itoa(i)+".img")
		buildFromTar(b, tarball, img)
		b.StopTimer()
		os.Remove(img)
		b.StartTimer()
	}
}

// BenchmarkMkfsExtract measures the classic pipeline on the same tree:
// tar -x into a directory, then mkfs.ext4 -d, for a filesystem of the size
// the writer produces. The tree is extracted to the test's temporary
// directory (disk) and, when /dev/shm exists, to tmpfs, which takes the
// extraction's file-creation cost on the disk filesystem out of the picture.
func BenchmarkMkfsExtract(b *testing.B) {
	mkfs := needTool(b, "mkfs.ext4")
	tarBin := needTool(b, "tar")
	tarball, content := benchTree(b, benchFiles, benchBytes)
	imgDir := b.TempDir()
	size := buildFromTar(b, tarball, filepath.Join(imgDir, "probe.img")).ImageBytes
	os.Remove(filepath.Join(imgDir, "probe.img"))
	treeDirs := map[string]string{"extract=disk": imgDir}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		shm, err := os.MkdirTemp("/dev/shm", "ext4bench")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(shm)
		treeDirs["extract=tmpfs"] = shm
	}
	for _, name := range []string{"extract=disk", "extract=tmpfs"} {
		treeDir, ok := treeDirs[name]
		if !ok {
			continue
		}
		b.Run(name, func(b *testing.B) {
			b.SetBytes(content)
			for i := range b.N {
				tree := filepath.Join(treeDir, "tree"+strconv.Itoa(i))
				img := filepath.Join(imgDir, strconv.Itoa(i)+".img")
				if err := os.Mkdir(tree, 0o755); err != nil {
					b.Fatal(err)
				}
				x := exec.Command(tarBin, "-x", "--numeric-owner", "-C", tree)
				x.Stdin = bytes.NewReader(tarball)
				if out, err := x.CombinedOutput(); err != nil {
					b.Fatalf("tar -x: %v\n%s", err, out)
				}
				out, err := exec.Command(mkfs, "-q", "-F", "-b", "4096", "-m", "0", "-E", "root_owner=0:0",
					"-d", tree, img, strconv.FormatInt(size/blockSize, 10)).CombinedOutput()
				if err != nil {
					b.Fatalf("mkfs.ext4 -d: %v\n%s", err, out)
				}
				b.StopTimer()
				os.RemoveAll(tree)
				os.Remove(img)
				b.StartTimer()
			}
		})
	}
}
