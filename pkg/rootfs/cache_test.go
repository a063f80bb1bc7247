package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

func testKey(n int) Key {
	return Key{Digest: fmt.Sprintf("sha256:%064x", n), Builder: "t1"}
}

func newCache(t testing.TB, home string) *Cache {
	t.Helper()
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(home, layout.Config{})})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// countingBuild writes content and counts how often it ran.
func countingBuild(n *atomic.Int32, content string) BuildFunc {
	return plainBuild(func(ctx context.Context, out *os.File) error {
		n.Add(1)
		_, err := out.WriteString(content)
		return err
	})
}

// assertNoTemps fails if tmp/ holds anything: failed and finished builds
// must leave nothing behind.
func assertNoTemps(t *testing.T, c *Cache) {
	t.Helper()
	ents, err := os.ReadDir(c.cfg.Home.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Fatalf("tmp/ holds %d entries, first %s", len(ents), ents[0].Name())
	}
}

func TestKeyValidate(t *testing.T) {
	cases := []struct {
		key Key
		ok  bool
	}{
		{Key{testDigest, "e1"}, true},
		{Key{"sha256:" + strings.Repeat("A", 64), "e1"}, false},
		{Key{"sha256:abc", "e1"}, false},
		{Key{"sha512:" + strings.Repeat("a", 64), "e1"}, false},
		{Key{"sha256:../../../../etc/passwd" + strings.Repeat("a", 36), "e1"}, false},
		{Key{testDigest, ""}, false},
		{Key{testDigest, "v1/../x"}, false},
		{Key{testDigest, "V1"}, false},
	}
	for _, tc := range cases {
		err := tc.key.Validate()
		if (err == nil) != tc.ok {
			t.Errorf("%+v: err = %v, want ok=%v", tc.key, err, tc.ok)
		}
		if tc.ok {
			k, ok := parseFileName(tc.key.FileName())
			if !ok || k != tc.key {
				t.Errorf("%s does not parse back to %+v", tc.key.FileName(), tc.key)
			}
		}
	}
}

func TestEnsureBuildsOnceAndInstallsReadOnly(t *testing.T) {
	c := newCache(t, t.TempDir())
	var builds atomic.Int32
	k := testKey(1)
	b, err := c.Ensure(context.Background(), k, countingBuild(&builds, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	if b.Path != filepath.Join(c.cfg.Home.Images().DiskImagesDir(), "sha256-"+strings.Repeat("0", 63)+"1.t1.ext4") || b.Size != 4 {
		t.Fatalf("base = %+v", b)
	}
	fi, err := os.Stat(b.Path)
	if err != nil || fi.Mode().Perm() != 0o444 {
		t.Fatalf("installed base mode %v, %v; want 0444", fi.Mode(), err)
	}
	again, err := c.Ensure(context.Background(), k, countingBuild(&builds, "other"))
	if err != nil || again != b || builds.Load() != 1 {
		t.Fatalf("second Ensure: %+v, %v, builds %d", again, err, builds.Load())
	}
	if got, _ := os.ReadFile(b.Path); string(got) != "disk" {
		t.Fatalf("base content %q: a base must never change once installed", got)
	}
	assertNoTemps(t, c)
}

func TestEnsureConcurrentColdCallersShareOneBuild(t *testing.T) {
	c := newCache(t, t.TempDir())
	var builds atomic.Int32
	release := make(chan struct{})
	build := func(ctx context.Context, out *os.File) error {
		builds.Add(1)
		<-release
		_, err := out.WriteString("disk")
		return err
	}
	const callers = 16
	var wg sync.WaitGroup
	paths := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, err := c.Ensure(context.Background(), testKey(2), plainBuild(build))
			paths[i], errs[i] = b.Path, err
		}()
	}
	// Let every caller reach the flight before the build may finish.
	for !c.Building(testKey(2)) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || paths[i] != paths[0] {
			t.Fatalf("caller %d: %q, %v", i, paths[i], errs[i])
		}
	}
	if n := builds.Load(); n != 1 {
		t.Fatalf("%d builds for one key, want 1", n)
	}
}

func TestFailedBuildIsNotCached(t *testing.T) {
	c := newCache(t, t.TempDir())
	k := testKey(3)
	_, err := c.Ensure(context.Background(), k, plainBuild(func(ctx context.Context, out *os.File) error {
		out.WriteString("half a disk")
		return errors.New("registry went away")
	}))
	if err == nil || !strings.Contains(err.Error(), "registry went away") || !strings.Contains(err.Error(), k.String()) {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(c.Path(k)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("failed build left a file at the final path: %v", err)
	}
	assertNoTemps(t, c)
	var builds atomic.Int32
	if _, err := c.Ensure(context.Background(), k, countingBuild(&builds, "disk")); err != nil || builds.Load() != 1 {
		t.Fatalf("retry after failure: %v, builds %d", err, builds.Load())
	}
}

func TestBuildOutlivesCallerContext(t *testing.T) {
	c := newCache(t, t.TempDir())
	k := testKey(4)
	var builds atomic.Int32
	release := make(chan struct{})
	build := func(ctx context.Context, out *os.File) error {
		builds.Add(1)
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
		_, err := out.WriteString("disk")
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Ensure(ctx, k, plainBuild(build))
	// The caller is answered by its deadline (a little before it, with
	// the build's progress), and the build goes on.
	if !errors.Is(err, ErrBuilding) || !strings.Contains(err.Error(), "continues in the background") {
		t.Fatalf("err = %v, want ErrBuilding by the caller's deadline", err)
	}
	if !c.Building(k) {
		t.Fatal("the build stopped with its first caller")
	}
	// A retry joins the same build rather than starting another.
	done := make(chan error)
	go func() {
		_, err := c.Ensure(context.Background(), k, plainBuild(build))
		done <- err
	}()
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := builds.Load(); n != 1 {
		t.Fatalf("%d builds, want 1", n)
	}
}

func TestTwoCachesOnOneHomeBuildOnce(t *testing.T) {
	// Two Cache values share nothing in memory, like two processes: only
	// the flock under locks/ keeps them from building twice.
	home := t.TempDir()
	a, b := newCache(t, home), newCache(t, home)
	var builds atomic.Int32
	build := func(ctx context.Context, out *os.File) error {
		builds.Add(1)
		time.Sleep(50 * time.Millisecond)
		_, err := out.WriteString("disk")
		return err
	}
	var wg sync.WaitGroup
	for _, c := range []*Cache{a, b, a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Ensure(context.Background(), testKey(5), plainBuild(build)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := builds.Load(); n != 1 {
		t.Fatalf("%d builds across two caches, want 1", n)
	}
}

func TestInvalidKeyBuildsNothing(t *testing.T) {
	c := newCache(t, t.TempDir())
	var builds atomic.Int32
	_, err := c.Ensure(context.Background(), Key{Digest: "sha256:../../x", Builder: "t1"}, countingBuild(&builds, "x"))
	if err == nil || builds.Load() != 0 {
		t.Fatalf("err = %v, builds %d", err, builds.Load())
	}
}

// TestMain also serves as the child process of two tests: the half of
// TestBuildKilledHalfway that starts a build and hangs until killed, and
// BenchmarkColdBuild's builder.
func TestMain(m *testing.M) {
	if spec := os.Getenv("BOXLITE_BENCH_BUILD"); spec != "" {
		if err := benchBuildChild(spec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		os.Exit(0)
	}
	if home := os.Getenv("BOXLITE_TEST_HANGING_BUILD_HOME"); home != "" {
		c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(home, layout.Config{})})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		_, err = c.Ensure(context.Background(), testKey(6), plainBuild(func(ctx context.Context, out *os.File) error {
			out.WriteString("half a disk")
			out.Sync()
			select {}
		}))
		fmt.Fprintln(os.Stderr, "hanging build returned:", err)
		os.Exit(4)
	}
	os.Exit(m.Run())
}

func TestBuildKilledHalfway(t *testing.T) {
	home := t.TempDir()
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), "BOXLITE_TEST_HANGING_BUILD_HOME="+home)
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Process.Kill()
	tmpDir := filepath.Join(home, "tmp")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if ents, _ := os.ReadDir(tmpDir); len(ents) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("child never started its build")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// While the child lives, a new cache must leave its temp file alone.
	c := newCache(t, home)
	if ents, _ := os.ReadDir(tmpDir); len(ents) != 1 {
		t.Fatalf("start-up removed a live build's temp file (%d entries)", len(ents))
	}

	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	if _, err := os.Stat(c.Path(testKey(6))); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("killed build left a file at the final path: %v", err)
	}
	// Start-up after the crash removes the orphan, and the next call builds.
	c = newCache(t, home)
	assertNoTemps(t, c)
	var builds atomic.Int32
	b, err := c.Ensure(context.Background(), testKey(6), countingBuild(&builds, "whole disk"))
	if err != nil || builds.Load() != 1 {
		t.Fatalf("Ensure after crash: %v, builds %d", err, builds.Load())
	}
	if got, _ := os.ReadFile(b.Path); string(got) != "whole disk" {
		t.Fatalf("base holds %q", got)
	}
}

// TestConcurrentBuildsAreLimited starts five builds under a limit of two:
// two run, the others wait (and say so in the log) until a slot is free,
// and every one of them completes.
func TestConcurrentBuildsAreLimited(t *testing.T) {
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{}), MaxConcurrentBuilds: 2})
	if err != nil {
		t.Fatal(err)
	}
	logger := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
	ctx := klog.NewContext(context.Background(), logger)
	var running, most atomic.Int32
	started := make(chan struct{}, 5)
	release := make(chan struct{})
	build := func(ctx context.Context, out *os.File) error {
		n := running.Add(1)
		defer running.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		started <- struct{}{}
		<-release
		_, err := out.WriteString("disk")
		return err
	}
	errs := make(chan error, 5)
	for i := range 5 {
		go func() {
			_, err := c.Ensure(ctx, testKey(100+i), plainBuild(build))
			errs <- err
		}()
	}
	<-started
	<-started
	// The other three say in the log that they wait, and do.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		logs := logger.GetSink().(ktesting.Underlier).GetBuffer().String()
		n := strings.Count(logs, "Waiting for a build slot")
		if n == 3 {
			break
		}
		if n > 3 || time.Now().After(deadline) {
			t.Fatalf("%d builds logged that they wait, want 3:\n%s", n, logs)
		}
	}
	select {
	case <-started:
		t.Fatal("a third build started while two were running")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	for range 5 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if m := most.Load(); m != 2 {
		t.Errorf("%d builds ran at once, want 2", m)
	}
}

// TestQueuedBuildHonoursItsTimeout queues a build behind one that holds
// the only slot: its caller gives up at once rather than waiting in the
// queue, the queued build fails when its own BuildTimeout ends, and the
// slot is not lost with it.
func TestQueuedBuildHonoursItsTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{}), MaxConcurrentBuilds: 1, BuildTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	started, release := make(chan struct{}), make(chan struct{})
	holder := make(chan error)
	go func() {
		// Holds the slot past its timeout, as a build stuck in a syscall would.
		_, err := c.Ensure(context.Background(), testKey(200), plainBuild(func(_ context.Context, out *os.File) error {
			close(started)
			<-release
			return nil
		}))
		holder <- err
	}()
	<-started

	var builds atomic.Int32
	k := testKey(201)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.Ensure(ctx, k, countingBuild(&builds, "disk")); !errors.Is(err, ErrBuilding) || !strings.Contains(err.Error(), "continues in the background") {
		t.Fatalf("caller: %v, want ErrBuilding by its own deadline", err)
	}
	if d := time.Since(start); d > timeout/2 {
		t.Errorf("caller gave up after %v: it waited in the queue", d)
	}
	if !c.Building(k) {
		t.Fatal("the queued build went away with its caller")
	}
	// Join the queued build and see its own verdict.
	_, err = c.Ensure(context.Background(), k, countingBuild(&builds, "disk"))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "build slots") {
		t.Fatalf("queued build: %v, want its BuildTimeout while waiting for a slot", err)
	}
	if c.Building(k) || builds.Load() != 0 {
		t.Fatalf("queued build still in flight (%v) or ran (%d)", c.Building(k), builds.Load())
	}
	close(release)
	if err := <-holder; err != nil {
		t.Fatal(err)
	}
	// The slots all came back: the next build runs at once.
	if _, err := c.Ensure(context.Background(), k, countingBuild(&builds, "disk")); err != nil || builds.Load() != 1 {
		t.Fatalf("build after the queue drained: %v, builds %d", err, builds.Load())
	}
	assertNoTemps(t, c)
}

func TestMaxConcurrentBuildsDefault(t *testing.T) {
	if c := newCache(t, t.TempDir()); cap(c.slots) != DefaultMaxConcurrentBuilds {
		t.Fatalf("%d build slots by default, want %d", cap(c.slots), DefaultMaxConcurrentBuilds)
	}
	if _, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{}), MaxConcurrentBuilds: -1}); err == nil {
		t.Fatal("a negative MaxConcurrentBuilds was accepted")
	}
}

// TestDeterministicFailureRemembered: a failure the caller calls
// deterministic is returned again without building until FailureTTL has
// passed; any other failure is built again at once.
func TestDeterministicFailureRemembered(t *testing.T) {
	errSame := errors.New("over the limits")
	c, err := NewCache(context.Background(), CacheConfig{
		Home:          layout.NewHome(t.TempDir(), layout.Config{}),
		Deterministic: func(err error) bool { return errors.Is(err, errSame) },
		FailureTTL:    200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	var builds atomic.Int32
	failWith := func(e error) BuildFunc {
		return plainBuild(func(context.Context, *os.File) error { builds.Add(1); return e })
	}
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		_, err := c.Ensure(ctx, testKey(3), failWith(errSame))
		var rem *RememberedError
		if !errors.Is(err, errSame) || (i > 0) != errors.As(err, &rem) {
			t.Fatalf("call %d: %v; want the failure, remembered after the first", i+1, err)
		}
	}
	if n := builds.Load(); n != 1 {
		t.Errorf("%d builds for a remembered failure, want 1", n)
	}
	time.Sleep(250 * time.Millisecond) // past FailureTTL
	if _, err := c.Ensure(ctx, testKey(3), failWith(errSame)); err == nil || builds.Load() != 2 {
		t.Errorf("after FailureTTL: %v, %d builds; want a new build", err, builds.Load())
	}
	other := errors.New("registry down")
	for i := 0; i < 2; i++ {
		c.Ensure(ctx, testKey(4), failWith(other))
	}
	if n := builds.Load(); n != 4 {
		t.Errorf("%d builds, want every other failure built again (4)", n)
	}
}
