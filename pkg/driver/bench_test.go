package driver

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/scratch"
	"golang.org/x/sys/unix"
)

// BenchmarkWarmStagePublish measures what kubelet waits for when a pod
// starts on a warm node: NodeStageVolume then NodePublishVolume of a new
// volume whose base is cached, through the real gRPC socket, at several
// concurrencies. The floor is one bare `mount --bind` per volume at the
// same concurrency. Reported: p50 and p99 per volume, and volumes per
// second. Run with a fixed count, e.g. -benchtime=400x.
func BenchmarkWarmStagePublish(b *testing.B) {
	needRoot(b)
	quietKlog(b)
	dir := scratch.Dir(b)
	params, _ := testImage(b)
	// claim=20GiB volumes also have their filesystem grown at stage.
	for _, c := range []struct {
		conc  int
		claim int64
		name  string
	}{{1, 0, ""}, {8, 0, ""}, {32, 0, ""}, {1, 20 << 30, "claim=20GiB/"}} {
		conc := c.conc
		b.Run(fmt.Sprintf("op=stage+publish/%sconc=%d", c.name, conc), func(b *testing.B) {
			run := b.TempDir()
			cfg := testConfig(run)
			cfg.Home = filepath.Join(dir, fmt.Sprintf("home-%d-%d", conc, b.N))
			// Hundreds of 256 MiB claims on a 2 GiB scratch filesystem:
			// overcommit, since this measures staging, not accounting.
			cfg.OverprovisionRatio = 1e6
			p := startPlugin(b, run, cfg)
			ctx := context.Background()
			ids := make([]string, b.N+1)
			for i := range ids {
				v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
					Name: fmt.Sprintf("v%d", i), Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
					CapacityRange: &csi.CapacityRange{RequiredBytes: c.claim},
				})
				if err != nil {
					b.Fatal(err)
				}
				ids[i] = v.GetVolume().GetVolumeId()
			}
			stagePublish := func(i int) error {
				staging, target := filepath.Join(run, "s", ids[i]), filepath.Join(run, "t", ids[i])
				if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: ids[i], StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
					return err
				}
				_, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: ids[i], StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo})
				return err
			}
			// Warm the cache: the first stage builds the base.
			if err := stagePublish(b.N); err != nil {
				b.Fatal(err)
			}
			measure(b, conc, stagePublish)
			b.StopTimer()
			for i := range ids {
				p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: ids[i], TargetPath: filepath.Join(run, "t", ids[i])})
				p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: ids[i], StagingTargetPath: filepath.Join(run, "s", ids[i])})
				p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: ids[i]})
			}
		})
		b.Run(fmt.Sprintf("op=mount-bind/conc=%d", conc), func(b *testing.B) {
			run := b.TempDir()
			src := filepath.Join(run, "src")
			if err := os.Mkdir(src, 0o755); err != nil {
				b.Fatal(err)
			}
			targets := make([]string, b.N)
			for i := range targets {
				targets[i] = filepath.Join(run, fmt.Sprint(i))
				if err := os.Mkdir(targets[i], 0o755); err != nil {
					b.Fatal(err)
				}
			}
			measure(b, conc, func(i int) error {
				out, err := exec.Command("mount", "--bind", src, targets[i]).CombinedOutput()
				if err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			})
			b.StopTimer()
			for _, t := range targets {
				syscallUnmount(t)
			}
		})
	}
}

// quietKlog keeps per-call logs out of the benchmark's result lines.
func quietKlog(b *testing.B) {
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	b.Cleanup(func() { klog.LogToStderr(true) })
}

// measure runs op for 0..b.N-1 on conc workers and reports latency
// percentiles and throughput.
func measure(b *testing.B, conc int, op func(i int) error) {
	lat := make([]time.Duration, b.N)
	next := make(chan int)
	var wg sync.WaitGroup
	errs := make(chan error, conc)
	b.ResetTimer()
	start := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				t0 := time.Now()
				if err := op(i); err != nil {
					errs <- err
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	for i := 0; i < b.N; i++ {
		select {
		case next <- i:
		case err := <-errs:
			b.Fatal(err)
		}
	}
	close(next)
	wg.Wait()
	elapsed := time.Since(start)
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "volumes/s")
}

// BenchmarkStartup measures what a node waits for after a plugin restart:
// New (start-up recovery over every box) until the CSI socket serves, with
// 1,000 boxes on the node. One in ten is damaged as a hostile pod or a
// crash leaves it: a FIFO for box.json, a half-deleted box, a box with no
// record and garbage in box.json, a stale temp file. Reported: ms per
// start-up.
func BenchmarkStartup(b *testing.B) {
	needRoot(b)
	quietKlog(b)
	const boxes = 1000
	params, _ := testImage(b)
	run := b.TempDir()
	cfg := testConfig(run)
	cfg.Home = filepath.Join(scratch.Dir(b), "home-startup")
	p := startPlugin(b, run, cfg)
	ctx := context.Background()
	for i := range boxes {
		v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: fmt.Sprintf("v%d", i), Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		})
		if err != nil {
			b.Fatal(err)
		}
		box, err := p.d.home.Box(v.GetVolume().GetVolumeId())
		if err != nil {
			b.Fatal(err)
		}
		switch i % 40 {
		case 0:
			os.Remove(box.ManifestPath())
			if err := unix.Mkfifo(box.ManifestPath(), 0o644); err != nil {
				b.Fatal(err)
			}
		case 10:
			os.Remove(p.d.recordPath(box.ID()))
			os.WriteFile(box.ManifestPath(), []byte("{garbage"), 0o644)
		case 20:
			os.WriteFile(filepath.Join(box.Root(), ".box.json.tmp123"), []byte("x"), 0o644)
		case 30:
			os.MkdirAll(filepath.Join(p.d.home.BoxesDir(), "."+box.ID()+".deleting", "disks"), 0o755)
		}
	}
	p.stop()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		run := b.TempDir()
		c := cfg
		c.Endpoint = "unix://" + filepath.Join(run, "csi.sock")
		b.StartTimer()
		p := startPlugin(b, run, c)
		b.StopTimer()
		p.stop()
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/startup")
}

// BenchmarkSnapshot measures a snapshot of an unpublished volume (the
// freeze of its overlay into a layer and the snapshot's links) and a
// restore (CreateVolume from the snapshot and its first NodeStage),
// against the copy of the overlay a copying driver makes (read, write,
// fsync), for overlays with 1 MiB, 100 MiB and 1 GiB allocated. The goal
// is a cost that does not grow with the overlay. The setup writes the
// guest data with qemu-io outside the timer. On the home's own
// filesystem (the root disk), since 1 GiB overlays and their copies do
// not fit the 2 GiB scratch filesystem. Run with e.g. -benchtime=5x.
func BenchmarkSnapshot(b *testing.B) {
	needRoot(b)
	quietKlog(b)
	params, _ := testImage(b)
	for _, alloc := range []int64{1 << 20, 100 << 20, 1 << 30} {
		name := fmt.Sprintf("alloc=%dMiB", alloc>>20)
		// A volume with alloc bytes written into its overlay, unstaged.
		written := func(b *testing.B, p *plugin, vol string) *volumeSteps {
			b.Helper()
			v := &volumeSteps{p: p, staging: filepath.Join(p.dir, "s", vol), target: filepath.Join(p.dir, "t", vol)}
			resp, err := p.controller().CreateVolume(context.Background(), &csi.CreateVolumeRequest{
				Name: vol, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30},
			})
			if err != nil {
				b.Fatal(err)
			}
			v.id = resp.GetVolume().GetVolumeId()
			ctx := context.Background()
			if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: rwo}); err != nil {
				b.Fatal(err)
			}
			overlay := filepath.Join(v.staging, "disks/guest-rootfs.qcow2")
			if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x5a 0 %d", alloc), overlay).CombinedOutput(); err != nil {
				b.Fatalf("qemu-io: %v\n%s", err, out)
			}
			if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
				b.Fatal(err)
			}
			return v
		}
		b.Run(name+"/op=snapshot", func(b *testing.B) {
			run := b.TempDir()
			p := startPlugin(b, run, testConfig(run))
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				v := written(b, p, fmt.Sprint("v", i))
				b.StartTimer()
				if _, err := p.controller().CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: fmt.Sprint("s", i), SourceVolumeId: v.id}); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/op=restore", func(b *testing.B) {
			run := b.TempDir()
			p := startPlugin(b, run, testConfig(run))
			v := written(b, p, "src")
			s, err := p.controller().CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: v.id})
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				resp, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
					Name: fmt.Sprint("r", i), Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
					CapacityRange:       &csi.CapacityRange{RequiredBytes: 2 << 30},
					VolumeContentSource: fromSnapshot(s.GetSnapshot().GetSnapshotId()),
				})
				if err != nil {
					b.Fatal(err)
				}
				staging := filepath.Join(run, "rs", fmt.Sprint(i))
				if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: resp.GetVolume().GetVolumeId(), StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: resp.GetVolume().GetVolumeId(), StagingTargetPath: staging})
				b.StartTimer()
			}
		})
		b.Run(name+"/op=copy", func(b *testing.B) {
			run := b.TempDir()
			p := startPlugin(b, run, testConfig(run))
			v := written(b, p, "src")
			box, _ := p.d.home.Box(v.id)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := copyDurably(box.GuestRootfsDiskPath(), filepath.Join(run, "copy.qcow2")); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				os.Remove(filepath.Join(run, "copy.qcow2"))
				b.StartTimer()
			}
		})
	}
}

// copyDurably copies src to a new file dst and fsyncs it, as a driver
// that snapshots by copying must.
func copyDurably(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	return out.Sync()
}
