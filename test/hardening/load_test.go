package hardening

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
)

const loadImages = 5

// TestLoad runs many full lifecycles (Create, Stage, Publish, Unpublish,
// Unstage, Delete) concurrently against one plugin process, over five
// images served by a registry, with a cache that holds about two and a
// half bases and evicts every 100 ms after a short grace. Lifecycles take
// their image in blocks, so old images go idle while new ones are built
// and eviction has real work during the run.
//
// It asserts: no error but retried Abortions; afterwards no mount, box or
// temp file left, and no file descriptors that grow with the volumes
// served; a staged box always finds its base still in the cache (the
// same inode, linked at least twice), checked right after each stage and
// again before each unstage, and by a sampler that never sees a box link
// a base the cache no longer has; every base a box linked passes e2fsck;
// bases were evicted during the run (else the checks caught nothing); and
// once the volumes are gone, eviction brings the cache under its maximum.
// It reports throughput and p50/p99 latencies per call and per lifecycle.
//
// A broken reference check in eviction (nlink and box scan ignored) fails
// it: tried by mutating pkg/rootfs/evict.go in a scratch copy.
func TestLoad(t *testing.T) {
	qemuImg, _ := needRootAndQemu(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	t.Cleanup(func() { unmountAll(t, dir) })
	home := filepath.Join(dir, "home")

	reg := startRegistry(t)
	var params [loadImages]map[string]string
	for i := range loadImages {
		// Distinct seeds give distinct digests, so five bases.
		img := testimage.Random(t, int64(100+i), 1, 300, 2<<20)
		reg.Push(t, fmt.Sprintf("load%d:1", i), img)
		params[i] = map[string]string{"image": reg.Ref(fmt.Sprintf("load%d:1", i)), "plainHTTP": "true"}
	}
	baseFlags := []string{"--base-min-size=4Mi", "--base-headroom=2Mi"}

	// One base's real footprint sets the cache maximum: a little above two
	// bases, so five images cannot all stay cached.
	p := newProc(t, dir, append(baseFlags, "--eviction-interval=0")...)
	if err := p.start(ctx); err != nil {
		t.Fatal(err)
	}
	calib := &volume{name: "calibration", params: params[0], staging: filepath.Join(dir, "staging", "calibration"), target: filepath.Join(dir, "pods", "calibration")}
	for _, s := range []step{stepCreate, stepStage, stepUnstage, stepDelete} {
		if _, err := untilOK(ctx, aborted, func(ctx context.Context) error { return p.call(ctx, calib, s) }); err != nil {
			t.Fatalf("calibration %s: %v", s, err)
		}
	}
	baseBytes, _, err := cacheUsage(home)
	if err != nil || baseBytes == 0 {
		t.Fatalf("calibration: cache holds %d bytes (%v)", baseBytes, err)
	}
	if err := p.stop(); err != nil {
		t.Fatal(err)
	}
	maxBytes := baseBytes * 5 / 2
	grace := 300 * time.Millisecond
	p = newProc(t, dir, append(baseFlags, fmt.Sprintf("--cache-max-size=%d", maxBytes),
		"--cache-grace="+grace.String(), "--eviction-interval=100ms")...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin log tail:\n%s", p.logTail(16<<10))
		}
	})
	if err := p.start(ctx); err != nil {
		t.Fatal(err)
	}
	fdsBefore, err := p.openFDs()
	if err != nil {
		t.Fatal(err)
	}
	cpuBefore, err := p.cpuTime()
	if err != nil {
		t.Fatal(err)
	}

	l := &loadRun{home: home, qemuImg: qemuImg, passed: map[fileVersion]bool{}, flagged: map[string]bool{}}
	samplerCtx, stopSampler := context.WithCancel(ctx)
	samplerDone := make(chan struct{})
	go func() { defer close(samplerDone); l.sample(samplerCtx, maxBytes) }()

	// Images come in blocks of 20 lifecycles and cycle, so about three
	// images are in flight at once (more than the cache maximum holds),
	// idle images get evicted, and returning ones are built again.
	n, conc := *loadLifecycles, max(*loadConcurrency, 1)
	const block = 20
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		v := &volume{
			name:    fmt.Sprintf("load-%04d", i),
			params:  params[(i/block)%loadImages],
			staging: filepath.Join(dir, "kubelet", "plugins", "staging", fmt.Sprintf("load-%04d", i)),
			target:  filepath.Join(dir, "kubelet", "pods", fmt.Sprintf("load-%04d", i), "volumes", "box"),
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			// A pod keeps its volume for a while; holding some longer than
			// the grace makes their bases referenced but not recently used,
			// which only the reference check protects from eviction.
			var hold time.Duration
			if *loadHold {
				hold = time.Duration(rand.New(rand.NewPCG(uint64(i), 0x10ad)).Int64N(int64(2 * grace)))
			}
			l.lifecycle(ctx, p, v, hold, i%10 == 0)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	stopSampler()
	<-samplerDone
	fdsAfter, err := p.openFDs()
	if err != nil {
		t.Fatal(err)
	}
	cpuAfter, err := p.cpuTime()
	if err != nil {
		t.Fatal(err)
	}
	evictedDuring := countInFile(filepath.Join(dir, "plugin.log"), "Evicted base disk")

	for i, err := range l.errs {
		if i == 20 {
			t.Errorf("... and %d more errors", len(l.errs)-i)
			break
		}
		t.Error(err)
	}
	l.report(t, n, conc, elapsed)
	// The plugin's own CPU per lifecycle does not depend on what else
	// shares the machine, unlike the latencies above.
	t.Logf("plugin CPU: %v for %d lifecycles, %v each (%.0f%% of one core over the run)",
		(cpuAfter - cpuBefore).Round(10*time.Millisecond), n, ((cpuAfter - cpuBefore) / time.Duration(n)).Round(10*time.Microsecond),
		100*(cpuAfter-cpuBefore).Seconds()/elapsed.Seconds())

	// What the plugin holds open must not grow with the number of volumes
	// it has served: a pooled registry connection per host is fine, a
	// socket per CreateVolume is not.
	t.Logf("plugin file descriptors: %d before the run, %d after it", fdsBefore, fdsAfter)
	if fdsAfter > fdsBefore+64 {
		t.Errorf("the plugin holds %d file descriptors after %d lifecycles, %d before them: it keeps something open per volume (a registry connection per CreateVolume would do this)", fdsAfter, n, fdsBefore)
	}

	// Nothing may be left: every lifecycle ended with a delete.
	if ms, err := testenv.MountsUnder(dir); err != nil || len(ms) > 0 {
		var pts []string
		for _, m := range ms {
			pts = append(pts, m.MountPoint)
		}
		t.Errorf("leaked mounts after %d lifecycles: %v (%v)", n, pts, err)
	}
	for _, sub := range []string{"boxes", "tmp"} {
		if ents, err := os.ReadDir(filepath.Join(home, sub)); err != nil || len(ents) > 0 {
			t.Errorf("%s/ not empty after every volume was deleted: %v (%v)", sub, names(ents), err)
		}
	}

	// With no box left every base is evictable once its grace has passed,
	// so the cache must come back under its maximum.
	deadline := time.Now().Add(grace + 30*time.Second)
	for {
		bytes, _, err := cacheUsage(home)
		if err != nil {
			t.Fatal(err)
		}
		if bytes <= maxBytes {
			t.Logf("cache after the run: %d bytes, maximum %d", bytes, maxBytes)
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("cache still holds %d bytes, over its maximum %d, with no box left", bytes, maxBytes)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := p.stop(); err != nil {
		t.Error(err)
	}
	logPath := filepath.Join(dir, "plugin.log")
	evicted, built := countInFile(logPath, "Evicted base disk"), countInFile(logPath, "Installed base disk")
	t.Logf("cache: one base %d bytes, maximum %d; largest sample %d bytes (%d of %d samples over the maximum); %d bases built; %d evicted during the run, %d after it",
		baseBytes, maxBytes, l.maxSeen, l.overMax, l.samples, built, evictedDuring, evicted-evictedDuring)
	// Without evictions during the run the reference checks above would
	// have had nothing to catch. More images than the maximum holds must
	// have made some, unless every lifecycle ran at once (then every image
	// stays referenced until the end, and the end-of-run check above
	// covers eviction).
	if used := min((n+block-1)/block, loadImages); evictedDuring == 0 && conc < n && int64(used)*baseBytes > maxBytes {
		t.Errorf("no base was evicted during the run: %d images cycling through a cache of %d bytes must evict", used, maxBytes)
	}
}

// registry is what the load test needs of either test registry.
type registry interface {
	Push(t testing.TB, repoAndTag string, img v1.Image) string
	Ref(repoAndTag string) string
}

// startRegistry prefers Debian's docker-registry: a separate process, so
// serving 200 pulls does not compete with the lifecycles inside this
// race-instrumented test binary. The in-process registry stands in where
// the package is not installed.
func startRegistry(t *testing.T) registry {
	if _, err := os.Stat(testregistry.DebianBinary); err == nil {
		return testregistry.StartDebian(t, testregistry.DebianOptions{})
	}
	t.Logf("%s not installed (apt-get install docker-registry); using the in-process registry", testregistry.DebianBinary)
	return testregistry.NewInProcess(t)
}

// loadRun collects what the lifecycles and the sampler observe.
type loadRun struct {
	home    string
	qemuImg string

	mu        sync.Mutex
	errs      []error
	lat       [stepDone][]time.Duration
	total     []time.Duration
	retries   [stepDone]int
	passed    map[fileVersion]bool
	flagged   map[string]bool // boxes the sampler already reported; only it touches this
	maxSeen   int64
	overMax   int
	samples   int
	linkCheck int
}

func (l *loadRun) fail(err error) {
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

func (l *loadRun) lifecycle(ctx context.Context, p *proc, v *volume, hold time.Duration, checkOverlay bool) {
	var csiTime time.Duration
	for s := stepCreate; s < stepDone; s++ {
		if s == stepUnpublish {
			time.Sleep(hold)
		}
		if s == stepUnstage {
			// Still staged: the base must still be the cached one.
			if err := l.checkLinked(ctx, v); err != nil {
				l.fail(fmt.Errorf("%s before unstage: %w", v.name, err))
			}
		}
		t0 := time.Now()
		retries, err := untilOK(ctx, aborted, func(ctx context.Context) error { return p.call(ctx, v, s) })
		d := time.Since(t0)
		csiTime += d
		l.mu.Lock()
		l.lat[s] = append(l.lat[s], d)
		l.retries[s] += retries
		l.mu.Unlock()
		if err != nil {
			l.fail(fmt.Errorf("%s %s: %w", s, v.name, err))
			return
		}
		if s == stepCreate {
			v.box = filepath.Join(l.home, "boxes", v.id)
		}
		if s == stepStage {
			if err := l.checkLinked(ctx, v); err != nil {
				l.fail(fmt.Errorf("%s after stage: %w", v.name, err))
			}
			if checkOverlay {
				if _, err := run(ctx, l.qemuImg, "check", "-f", "qcow2", filepath.Join(v.staging, "disks", "guest-rootfs.qcow2")); err != nil {
					l.fail(fmt.Errorf("%s: %w", v.name, err))
				}
			}
		}
	}
	l.mu.Lock()
	l.total = append(l.total, csiTime)
	l.mu.Unlock()
}

// checkLinked asserts that the staged box's base is the cache's base for
// its digest: the same inode, linked by the cache and the box at least.
// Eviction removing it while the box links it would leave the box with
// the only link (or the cache with a rebuilt base under another inode).
func (l *loadRun) checkLinked(ctx context.Context, v *volume) error {
	link := filepath.Join(v.box, "base", "rootfs.ext4")
	fi, err := os.Stat(link)
	if err != nil {
		return fmt.Errorf("staged box has no base: %w", err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	digest := strings.Replace(v.volumeContext["digest"], ":", "-", 1)
	cached, _ := filepath.Glob(filepath.Join(l.home, "images", "disk-images", digest+".*.ext4"))
	if len(cached) != 1 {
		return fmt.Errorf("the cache has %d bases for %s (%v) while a staged box links one", len(cached), digest, cached)
	}
	cfi, err := os.Stat(cached[0])
	if err != nil {
		return fmt.Errorf("the base of a staged box was evicted: %w", err)
	}
	if !os.SameFile(fi, cfi) {
		return fmt.Errorf("staged box links inode %d but the cache holds %s as inode %d: its base was evicted and rebuilt while linked", st.Ino, cached[0], cfi.Sys().(*syscall.Stat_t).Ino)
	}
	if st.Nlink < 2 {
		return fmt.Errorf("base %s has %d links while a staged box links it", cached[0], st.Nlink)
	}
	ver := versionOf(fi)
	l.mu.Lock()
	l.linkCheck++
	known := l.passed[ver]
	l.mu.Unlock()
	if !known {
		if _, err := run(ctx, "e2fsck", "-fn", link); err != nil {
			return fmt.Errorf("base of a staged box is not a complete file system: %w", err)
		}
		l.mu.Lock()
		l.passed[ver] = true
		l.mu.Unlock()
	}
	return nil
}

// cacheUsage is what the cached bases occupy (allocated, as eviction
// counts it) and their inodes.
func cacheUsage(home string) (int64, map[uint64]string, error) {
	dir := filepath.Join(home, "images", "disk-images")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, nil, fmt.Errorf("list cache: %w", err)
	}
	var total int64
	inodes := map[uint64]string{}
	for _, e := range ents {
		// Each base has its record beside it; only the disks count.
		if !strings.HasSuffix(e.Name(), ".ext4") {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(dir, e.Name()), &st); err != nil {
			continue // evicted between the listing and the stat
		}
		total += st.Blocks * 512
		inodes[st.Ino] = e.Name()
	}
	return total, inodes, nil
}

// boxLinks maps each box to the inode its base link has.
func boxLinks(home string) map[string]uint64 {
	out := map[string]uint64{}
	ents, _ := os.ReadDir(filepath.Join(home, "boxes"))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(home, "boxes", e.Name(), "base", "rootfs.ext4"), &st) == nil {
			out[e.Name()] = st.Ino
		}
	}
	return out
}

// sample watches the cache while the lifecycles run. A box that links the
// same base before and after a look at the cache linked it throughout, so
// the cache must have held that base then: nothing can link a base whose
// cache entry is gone, and eviction must not remove one a box links.
func (l *loadRun) sample(ctx context.Context, maxBytes int64) {
	for ctx.Err() == nil {
		before := boxLinks(l.home)
		bytes, inodes, err := cacheUsage(l.home)
		if err != nil {
			l.fail(err)
			return
		}
		after := boxLinks(l.home)
		for box, ino := range before {
			if after[box] == ino && !l.flagged[box] {
				if _, ok := inodes[ino]; !ok {
					l.flagged[box] = true
					l.fail(fmt.Errorf("box %s linked base inode %d throughout, but the cache no longer held it: a linked base was evicted", box, ino))
				}
			}
		}
		l.mu.Lock()
		l.samples++
		l.maxSeen = max(l.maxSeen, bytes)
		if bytes > maxBytes {
			l.overMax++
		}
		l.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (l *loadRun) report(t *testing.T, n, conc int, elapsed time.Duration) {
	t.Helper()
	t.Logf("load: %d lifecycles over %d images, concurrency %d, in %v: %.1f lifecycles/s; %d base-link checks",
		n, loadImages, conc, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), l.linkCheck)
	t.Logf("  %-20s %6s %10s %10s %10s %8s", "call", "count", "p50", "p99", "max", "Aborted")
	for s := stepCreate; s < stepDone; s++ {
		p50, p99, mx := percentiles(l.lat[s])
		t.Logf("  %-20s %6d %10v %10v %10v %8d", s, len(l.lat[s]), p50, p99, mx, l.retries[s])
	}
	p50, p99, mx := percentiles(l.total)
	t.Logf("  %-20s %6d %10v %10v %10v   (the six calls, without the pod's hold)", "whole lifecycle", len(l.total), p50, p99, mx)
}

func countInFile(p, s string) int {
	b, _ := os.ReadFile(p)
	return strings.Count(string(b), s)
}

// percentiles returns the nearest-rank p50 and p99 and the maximum.
func percentiles(ds []time.Duration) (p50, p99, mx time.Duration) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p float64) time.Duration {
		i := int(p*float64(len(s))+0.999999) - 1
		return s[min(max(i, 0), len(s)-1)].Round(10 * time.Microsecond)
	}
	return rank(0.50), rank(0.99), s[len(s)-1].Round(10 * time.Microsecond)
}
