package hardening

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	ocilayout "github.com/google/go-containerregistry/pkg/v1/layout"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
)

// TestCrashCampaign kills a real plugin process with SIGKILL at random
// points of volume lifecycles, cold (the base is built during
// NodeStageVolume) and warm, restarts it on the same home, and checks
// after every restart what a crash must never break:
//
//   - nothing partial at a final path: every cached or linked base passes
//     e2fsck -fn and is 0444, every overlay passes qemu-img check;
//   - no temp files once the restarted plugin is Ready;
//   - the mount table under the test holds exactly what kubelet's
//     requests need (the interrupted call counts as done or not done),
//     nothing stacked, every base mount read-only;
//   - every overlay written before the crash still holds its bytes;
//   - re-issuing the interrupted call (as kubelet retries it) succeeds and
//     the lifecycle then runs to the end.
//
// Two bystander volumes stay published through the whole campaign, so
// every crash also happens next to live volumes that must not notice.
func TestCrashCampaign(t *testing.T) {
	qemuImg, qemuIO := needRootAndQemu(t)
	seed := *crashSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("crash campaign: %d runs, seed %d (reproduce with -crash.seed=%d -crash.runs=%d)", *crashRuns, seed, seed, *crashRuns)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	dir := t.TempDir()
	// Registered after TempDir, so it runs before the directory is removed
	// (and after the plugin is killed, which newProc registers later).
	t.Cleanup(func() { unmountAll(t, dir) })

	// About 100-400 ms of cold build on the 2-core CI machine: long enough
	// that a random kill lands inside the build, short enough for 100 runs
	// in about a minute.
	genStart := time.Now()
	img := testimage.Random(t, int64(seed%1000), 2, 1000, 8<<20)
	oci := filepath.Join(dir, "oci")
	lp, err := ocilayout.Write(oci, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img); err != nil {
		t.Fatal(err)
	}

	t.Logf("image generated and written in %v", time.Since(genStart).Round(time.Millisecond))
	c := &campaign{
		t:      t,
		rng:    rand.New(rand.NewPCG(seed, 0xc0ffee)),
		dir:    dir,
		home:   filepath.Join(dir, "home"),
		qemuIO: qemuIO,
		params: map[string]string{"image": "oci:" + oci},
		state:  map[*volume]step{},
	}
	c.disk = newDiskChecker(c.home, qemuImg)
	// Eviction is off: the campaign removes bases itself to get cold runs,
	// and an eviction pass would make "which base is cached" random.
	c.p = newProc(t, dir, "--base-min-size=8Mi", "--base-headroom=4Mi", "--eviction-interval=0")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin log tail:\n%s", c.p.logTail(16<<10))
		}
	})
	if err := c.p.start(ctx); err != nil {
		t.Fatal(err)
	}

	// Bystanders, and the durations the kill delays are drawn from: the
	// first bystander's stage builds the base (cold), the rest is warm.
	for i := range 2 {
		v := c.newVolume(fmt.Sprintf("bystander-%d", i))
		for s := stepCreate; s <= stepPublish; s++ {
			start := time.Now()
			c.mustDo(ctx, v, s)
			c.observe(s, i == 0 && s == stepStage, time.Since(start))
			if s == stepStage {
				c.mustMark(ctx, v)
			}
		}
	}
	calib := c.newVolume("calibration")
	for s := stepCreate; s < stepDone; s++ {
		start := time.Now()
		c.mustDo(ctx, calib, s)
		c.observe(s, false, time.Since(start))
	}
	t.Logf("calibration: cold stage %v, warm %v", c.coldStage.Round(time.Millisecond), c.warm)

	runsStart := time.Now()
	for run := range *crashRuns {
		if t.Failed() {
			break
		}
		c.crashRun(ctx, run)
	}

	t.Logf("%d runs in %v", *crashRuns, time.Since(runsStart).Round(time.Millisecond))
	// Read every surviving marker once more, unchanged overlays included:
	// the skip in verify must not be what kept a loss from being seen.
	for v := range c.state {
		v.markerVersion = fileVersion{}
	}
	c.verify(ctx, nil, 0, false)
	// Tear the bystanders down after everything they lived through.
	for v, s := range c.state {
		for ; s < stepDone; s++ {
			c.mustDo(ctx, v, s)
		}
	}
	c.verify(ctx, nil, 0, false)
	if err := c.p.stop(); err != nil {
		t.Error(err)
	}
	if errs := checkMounts(newMountExpectation(), dir); len(errs) > 0 {
		t.Errorf("after the campaign: %v", errors.Join(errs...))
	}

	st := c.stats
	t.Logf("crash campaign: %d runs (%d cold), %d plugin starts, %d kills: %d interrupted a call (%d during a base build, %d during %s), %d after the call had returned",
		*crashRuns, st.cold, c.p.starts, st.kills, st.interrupted, st.midBuild, st.byStep[stepStage], stepStage, st.kills-st.interrupted)
	for s := stepCreate; s < stepDone; s++ {
		t.Logf("  kills during %-20s %3d (then re-issued %d times)", s, st.byStep[s], st.retries[s])
	}
	if *crashRuns >= 20 && st.midBuild == 0 {
		t.Errorf("no kill landed inside a base build in %d runs: the campaign did not test what it claims (seed %d)", *crashRuns, seed)
	}
}

type campaign struct {
	t      *testing.T
	rng    *rand.Rand
	dir    string
	home   string
	qemuIO string
	params map[string]string
	p      *proc
	disk   *diskChecker
	// state is the next step of every volume the campaign keeps alive.
	state map[*volume]step

	coldStage time.Duration
	warm      [stepDone]time.Duration
	markers   int
	stats     struct {
		cold, kills, interrupted, midBuild int
		byStep, retries                    [stepDone]int
	}
}

func (c *campaign) newVolume(name string) *volume {
	return &volume{
		name:     name,
		params:   c.params,
		capacity: 64 << 20,
		staging:  filepath.Join(c.dir, "kubelet", "plugins", "staging", name),
		target:   filepath.Join(c.dir, "kubelet", "pods", name, "volumes", "box"),
	}
}

func (c *campaign) observe(s step, cold bool, d time.Duration) {
	if cold {
		c.coldStage = d
	} else {
		c.warm[s] = max(c.warm[s], d)
	}
}

// mustDo runs step s of v to success, retrying what kubelet retries, and
// records v's new state.
func (c *campaign) mustDo(ctx context.Context, v *volume, s step) int {
	c.t.Helper()
	retries, err := untilOK(ctx, abortedOrDown, func(ctx context.Context) error { return c.p.call(ctx, v, s) })
	if err != nil {
		c.t.Fatalf("%s %s: %v", s, v.name, err)
	}
	c.advance(v, s)
	return retries
}

func (c *campaign) advance(v *volume, s step) {
	if s == stepCreate && v.box == "" {
		v.box = filepath.Join(c.home, "boxes", v.id)
		v.overlayPath = filepath.Join(v.box, "disks", "guest-rootfs.qcow2")
	}
	if s+1 == stepDone {
		delete(c.state, v)
		if _, err := os.Lstat(v.box); !errors.Is(err, os.ErrNotExist) {
			c.t.Errorf("box %s of deleted volume %s still exists: %v", v.box, v.name, err)
		}
		return
	}
	c.state[v] = s + 1
}

// mustMark writes a fresh pattern into a staged volume's overlay through
// the staging path, as the guest of a pod would.
func (c *campaign) mustMark(ctx context.Context, v *volume) {
	c.t.Helper()
	c.markers++
	v.marker = byte(0x10 + c.markers%0xe0)
	v.markerOffset = int64(c.rng.IntN(16)) << 20
	if err := writeMarker(ctx, c.qemuIO, filepath.Join(v.staging, "disks", "guest-rootfs.qcow2"), v.marker, v.markerOffset); err != nil {
		c.t.Fatal(err)
	}
}

// crashRun drives one new volume through its whole lifecycle and kills
// the plugin once, during (or right after) one of its calls.
func (c *campaign) crashRun(ctx context.Context, run int) {
	c.t.Helper()
	// Every fourth run, and some others, start cold: removing the cached
	// base is what eviction does, and boxes keep their own links.
	cold := run%4 == 0 || c.rng.Float64() < 0.15
	if cold {
		c.stats.cold++
		bases, _ := filepath.Glob(filepath.Join(c.home, "images", "disk-images", "*.ext4"))
		for _, b := range bases {
			if err := os.Remove(b); err != nil {
				c.t.Fatal(err)
			}
		}
	}
	crashAt := step(c.rng.IntN(int(stepDone)))
	if cold && c.rng.Float64() < 0.7 {
		crashAt = stepStage
	}
	// The kill lands anywhere from before the request arrives to about the
	// reply, so it hits every stretch of the call: for a cold stage the
	// image read, the build, the install, the overlay and the mounts; one
	// run in ten kills as the request is sent.
	span := c.warm[crashAt]
	if cold && crashAt == stepStage {
		span = c.coldStage
	}
	delay := time.Duration(c.rng.Int64N(int64(span) + 1))
	if c.rng.IntN(10) == 0 {
		delay = 0
	}

	v := c.newVolume(fmt.Sprintf("crash-%03d", run))
	for s := stepCreate; s < stepDone; s++ {
		if s == crashAt {
			c.crashDuring(ctx, v, s, delay)
		} else {
			c.mustDo(ctx, v, s)
		}
		if c.t.Failed() {
			c.t.Logf("run %d failed: %s of %s killed after %v (cold %v)", run, crashAt, v.name, delay, cold)
			return
		}
		if s == stepStage {
			c.mustMark(ctx, v)
		}
	}
}

// crashDuring issues step s of v, SIGKILLs the plugin after delay, starts
// it again, checks every invariant, and then retries s until it succeeds.
func (c *campaign) crashDuring(ctx context.Context, v *volume, s step, delay time.Duration) {
	c.t.Helper()
	p, conn := c.p, c.p.conn
	// The call runs on its own copy of v: the kill races with the reply,
	// and only the retry below may record the ID.
	shadow := *v
	errc := make(chan error, 1)
	go func() { errc <- callOn(ctx, conn, &shadow, s) }()
	time.Sleep(delay)
	p.kill()
	err := <-errc
	c.stats.kills++
	c.stats.byStep[s]++
	if err == nil {
		// The call returned before the kill: it happened.
		if s == stepCreate {
			v.id, v.volumeContext = shadow.id, shadow.volumeContext
		}
		c.advance(v, s)
	} else {
		if code := status.Code(err); code != codes.Unavailable && code != codes.Canceled {
			c.t.Errorf("%s %s failed with %v before the kill, not because of it", s, v.name, err)
			return
		}
		c.stats.interrupted++
	}
	outcome := "after the reply"
	if err != nil {
		outcome = "interrupted"
	}
	ents, _ := os.ReadDir(filepath.Join(c.home, "tmp"))
	for _, e := range ents {
		if strings.Contains(e.Name(), ".ext4.") {
			c.stats.midBuild++
			outcome += ", inside a base build"
			break
		}
	}
	c.t.Logf("%s: killed %v into %s: %s", v.name, delay.Round(time.Microsecond), s, outcome)

	if err := p.start(ctx); err != nil {
		c.t.Fatal(err)
	}
	c.verify(ctx, v, s, err != nil)
	if err == nil || c.t.Failed() {
		return
	}
	retries := c.mustDo(ctx, v, s)
	c.stats.retries[s] += retries + 1
	// The retry must have finished the job: exactly the mounts the new
	// state needs, every base read-only again.
	e := newMountExpectation()
	for w, ws := range c.state {
		e.expect(w, ws)
	}
	if errs := checkMounts(e, c.dir); len(errs) > 0 {
		c.t.Errorf("after the retried %s: %v", s, errors.Join(errs...))
	}
}

// verify checks the invariants against what the campaign asked for. If
// interrupted, v's call s may or may not have happened.
func (c *campaign) verify(ctx context.Context, v *volume, s step, interrupted bool) {
	c.t.Helper()
	var errs []error
	errs = append(errs, c.disk.check(ctx)...)
	e := newMountExpectation()
	for w, ws := range c.state {
		if w != v || !interrupted {
			e.expect(w, ws)
		}
	}
	if v != nil && interrupted && v.box != "" {
		e.expectEither(v, s, s+1)
	}
	errs = append(errs, checkMounts(e, c.dir)...)
	for w, ws := range c.state {
		// A box must exist from CreateVolume's reply until DeleteVolume's
		// call; an interrupted delete may have removed it.
		if w.marker == 0 || ws <= stepCreate || (w == v && interrupted && s == stepDelete) {
			continue
		}
		// An overlay not written since its marker last read back holds the
		// same bytes; reading it again would only cost a qemu-io run.
		if ver, err := statVersion(w.overlayPath); err == nil && ver == w.markerVersion {
			continue
		}
		if err := readMarker(ctx, c.qemuIO, w.overlayPath, w.marker, w.markerOffset); err != nil {
			errs = append(errs, fmt.Errorf("volume %s lost the bytes written before the crash: %w", w.name, err))
		} else {
			w.markerVersion, _ = statVersion(w.overlayPath)
		}
	}
	if len(errs) > 0 {
		c.t.Errorf("after killing the plugin during %s: %v", s, errors.Join(errs...))
	}
}
