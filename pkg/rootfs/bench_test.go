package rootfs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	ocilayout "github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/boxlite-csi/boxlite-csi/internal/scratch"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// Benchmark image: 128 MiB of text-like content in 4000 files over 4
// layers, the shape of a small distro image.
const (
	benchLayers = 4
	benchFiles  = 4000
	benchBytes  = 128 << 20
)

// benchMemLimit is a soft memory limit (GOMEMLIMIT) for the builder
// child, as a deployment sets one from the container's memory limit:
// without it the Go heap may grow to twice its live size between
// collections, which is most of the difference in peak RSS.
const benchMemLimit = "48MiB"

// BenchmarkColdBuild compares, in one run, a cold base build through our
// streaming builder with the classic pipeline (blobs on disk, tar -x each
// layer, mkfs.ext4 -d). Both read the same image from an OCI layout on
// disk and run as child processes, so each side's peak RSS is measured
// the same way (the largest child's ru_maxrss).
func BenchmarkColdBuild(b *testing.B) {
	dir := scratch.Dir(b)
	img := testimage.Random(b, 42, benchLayers, benchFiles, benchBytes)
	oci := filepath.Join(dir, "oci")
	p, err := ocilayout.Write(oci, empty.Index)
	if err != nil {
		b.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		b.Fatal(err)
	}
	size := uncompressedSize(b, img)

	b.Run("builder=boxlite", func(b *testing.B) {
		b.SetBytes(size)
		var rss int64
		for i := 0; b.Loop(); i++ {
			out := filepath.Join(dir, "base-"+strconv.Itoa(i)+".ext4")
			rss = max(rss, runChild(b, exec.Command(os.Args[0], "-test.run=^$"), "BOXLITE_BENCH_BUILD="+oci+","+out, "GOMEMLIMIT="+benchMemLimit))
			os.Remove(out)
		}
		b.ReportMetric(float64(rss)/(1<<20), "peak-RSS-MiB")
	})
	b.Run("builder=classic", func(b *testing.B) {
		needTool(b, "mkfs.ext4")
		b.SetBytes(size)
		layers, err := img.Layers()
		if err != nil {
			b.Fatal(err)
		}
		var rss int64
		for i := 0; b.Loop(); i++ {
			work := filepath.Join(dir, "classic-"+strconv.Itoa(i))
			tree := filepath.Join(work, "tree")
			if err := os.MkdirAll(tree, 0o755); err != nil {
				b.Fatal(err)
			}
			// Blobs to disk, as a pull does, then extract each in order.
			for j, l := range layers {
				blob := filepath.Join(work, fmt.Sprintf("layer-%d.tar.gz", j))
				d, _ := l.Digest()
				src, err := os.Open(filepath.Join(oci, "blobs", d.Algorithm, d.Hex))
				if err != nil {
					b.Fatal(err)
				}
				rss = max(rss, runChild(b, exec.Command("cp", src.Name(), blob)))
				src.Close()
				rss = max(rss, runChild(b, exec.Command("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xzf", blob, "-C", tree)))
			}
			out := filepath.Join(work, "base.ext4")
			blocks := (size*11/10 + DefaultHeadroom) / 4096
			blocks = max(blocks, DefaultMinSize/4096)
			rss = max(rss, runChild(b, exec.Command("mkfs.ext4", "-t", "ext4", "-b", "4096", "-d", tree, "-m", "0",
				"-E", "root_owner=0:0", "-F", "-q", out, strconv.FormatInt(blocks, 10))))
			b.StopTimer()
			os.RemoveAll(work)
			b.StartTimer()
		}
		b.ReportMetric(float64(rss)/(1<<20), "peak-RSS-MiB")
	})
}

// chartMemLimit is GOMEMLIMIT as the chart sets it by default: 80 % of
// the plugin container's 512Mi memory limit (values.yaml
// goMemLimitPercent, resources.limits.memory).
const chartMemLimit = "429496729"

// BenchmarkColdBuildFileLimit measures a build's peak RSS for an image at
// the default --image-max-files: one layer of empty files, 64 to a
// directory, with as many entries as the limit allows. Per-entry memory
// (inodes, names, directory entries) dominates such a build, so this is
// the number to hold against the chart's memory limit. The child runs
// under the chart's GOMEMLIMIT, one build alone and as many at once as
// --max-concurrent-builds allows by default.
func BenchmarkColdBuildFileLimit(b *testing.B) {
	dir := scratch.Dir(b)
	// Random puts 64 files in each data/dNNNN directory under data/.
	files := int((ext4.DefaultMaxFiles - 1) * 64 / 65)
	img := testimage.Random(b, 7, 1, files, 0)
	oci := filepath.Join(dir, "oci")
	p, err := ocilayout.Write(oci, empty.Index)
	if err != nil {
		b.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		b.Fatal(err)
	}
	for _, builds := range []int{1, DefaultMaxConcurrentBuilds} {
		b.Run("builds="+strconv.Itoa(builds), func(b *testing.B) {
			var rss int64
			for i := 0; b.Loop(); i++ {
				spec := oci
				for j := range builds {
					spec += "," + filepath.Join(dir, fmt.Sprintf("base-%d-%d.ext4", i, j))
				}
				rss = max(rss, runChild(b, exec.Command(os.Args[0], "-test.run=^$"), "BOXLITE_BENCH_BUILD="+spec, "GOMEMLIMIT="+chartMemLimit))
				for _, out := range strings.Split(spec, ",")[1:] {
					os.Remove(out)
				}
			}
			b.ReportMetric(float64(files), "files")
			b.ReportMetric(float64(rss)/(1<<20), "peak-RSS-MiB")
		})
	}
}

func uncompressedSize(b *testing.B, img v1.Image) int64 {
	layers, err := img.Layers()
	if err != nil {
		b.Fatal(err)
	}
	var n int64
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 1<<20)
		for {
			k, err := rc.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		rc.Close()
	}
	return n
}

// runChild runs cmd with extra environment and returns its peak RSS.
//
// ru_maxrss cannot be used directly: Go starts children with vfork, and
// Linux carries the parent's high-water mark (this benchmark holds the
// image in memory) into the child's at exec. Our own child reports its
// VmHWM; other commands run under GNU time, whose small address space is
// all that leaks into theirs.
func runChild(b *testing.B, cmd *exec.Cmd, env ...string) int64 {
	b.Helper()
	own := cmd.Path == os.Args[0]
	if !own {
		gnuTime, err := exec.LookPath("time")
		if p := "/usr/bin/time"; err != nil || gnuTime != p {
			if _, err := os.Stat(p); err != nil {
				b.Skip("GNU time not installed (apt-get install time): cannot measure the peers' peak RSS")
			}
			gnuTime = p
		}
		cmd = exec.Command(gnuTime, append([]string{"-f", "maxrss-kib %M", cmd.Path}, cmd.Args[1:]...)...)
	}
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "maxrss-kib "); ok {
			kib, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err == nil {
				return kib << 10
			}
		}
	}
	b.Fatalf("%s did not report its peak RSS:\n%s", cmd, out)
	return 0
}

// peakRSS reports this process's own high-water mark, in the format
// runChild reads.
func peakRSS() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return "maxrss-kib " + strings.TrimSuffix(strings.TrimSpace(v), " kB")
		}
	}
	return ""
}

// benchBuildChild is the child half of BenchmarkColdBuild and
// BenchmarkColdBuildFileLimit: build a base from an OCI layout dir into
// each output file, all at once, exactly as the plugin would.
func benchBuildChild(spec string) error {
	parts := strings.Split(spec, ",")
	if len(parts) < 2 {
		return fmt.Errorf("want <oci dir>,<output>[,<output>...], got %q", spec)
	}
	ref, err := source.Parse("oci:" + parts[0])
	if err != nil {
		return err
	}
	ctx := context.Background()
	img, err := source.Resolve(ctx, ref, source.Options{})
	if err != nil {
		return err
	}
	errs := make(chan error, len(parts)-1)
	for _, out := range parts[1:] {
		go func() {
			f, err := os.Create(out)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			if err := (&Ext4Builder{}).Build(ctx, img.V1, f); err != nil {
				errs <- err
				return
			}
			errs <- f.Sync()
		}()
	}
	for range parts[1:] {
		if err := <-errs; err != nil {
			return err
		}
	}
	fmt.Println(peakRSS())
	return nil
}

// BenchmarkWarmBox measures what a warm node does per new box, excluding
// mounts: look the base up in the cache, then create the box (directories,
// base link, durable overlay). The base is a real ext4 base of the busybox
// image. claim=base makes a disk of the base's size, the overlay an empty
// one; claim=20GiB also plans the filesystem's growth and stores its
// metadata blocks in the overlay.
func BenchmarkWarmBox(b *testing.B) {
	c, base := realBaseIn(b, scratch.Dir(b))
	for _, claim := range []struct {
		name string
		size uint64
	}{{"base", 0}, {"20GiB", 20 << 30}} {
		b.Run("claim="+claim.name, func(b *testing.B) {
			start := time.Now()
			for i := 0; b.Loop(); i++ {
				box, err := c.cfg.Home.Box("bench-" + claim.name + "-" + strconv.Itoa(i) + "-" + strconv.FormatInt(start.UnixNano(), 36))
				if err != nil {
					b.Fatal(err)
				}
				d, err := PrepareBox(context.Background(), box, func(context.Context) (Base, error) {
					got, ok, err := c.Lookup(base.Key)
					if err != nil || !ok {
						return Base{}, fmt.Errorf("warm lookup missed: %v", err)
					}
					return got, nil
				}, claim.size)
				if err != nil || d.Outcome != Created || d.FilesystemSize < claim.size/100*95 {
					b.Fatal(d, err)
				}
			}
		})
	}
}
