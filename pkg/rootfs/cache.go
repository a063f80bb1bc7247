package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// BuildFunc writes a complete base disk into out, which is an empty file
// under <home>/tmp, and returns what is to be recorded with the base (its
// Digest and Builder are filled in from the key). It must honour ctx.
type BuildFunc func(ctx context.Context, out *os.File) (BaseInfo, error)

// CacheConfig configures the node cache. Zero fields take the defaults
// named on each field.
type CacheConfig struct {
	Home layout.Home
	// BuildTimeout bounds a build, including the time it runs on after
	// every caller has given up waiting. Default 30 minutes.
	BuildTimeout time.Duration
	// HighWatermark is the fraction of the cache filesystem in use above
	// which eviction starts. Default 0.85.
	HighWatermark float64
	// LowWatermark is where eviction stops. Default 0.70.
	LowWatermark float64
	// MaxBytes, when set, also starts eviction once the bases together
	// occupy more than this many bytes; eviction then stops at
	// LowWatermark/HighWatermark of it.
	MaxBytes int64
	// Grace protects bases installed or used this recently. Default 5 min.
	Grace time.Duration
	// MaxConcurrentBuilds is the most base builds that run at once in this
	// process; further builds wait for one to end. A build holds its
	// image's merged tree in memory until it is written, so this bounds
	// the memory builds take together. Default DefaultMaxConcurrentBuilds.
	MaxConcurrentBuilds int
	// Observer, if set, hears about every build and eviction.
	Observer CacheObserver
	// Deterministic, when set, says which build failures would only
	// happen again: an image over the builder's limits, one for another
	// platform. Such a failure is remembered for FailureTTL and returned
	// to every caller in that time without pulling again. The memory is
	// per process and keyed by Key (digest and builder version), never by
	// tag; the builder's limits are fixed for a process's life, so that
	// is the key with the limits in it too.
	Deterministic func(error) bool
	// FailureTTL is how long a deterministic failure is remembered.
	// Default 10 minutes.
	FailureTTL time.Duration
	// AnswerMargin is how long before the caller's deadline Ensure stops
	// waiting for a build and answers with its progress
	// (*BuildingError), so that the caller can say how far the build got
	// instead of running out of time with nothing to show. Default 5 s.
	AnswerMargin time.Duration
}

// CacheObserver hears about builds (how long, and whether they installed a
// base) and evictions (the space each one released).
type CacheObserver interface {
	ObserveBuild(d time.Duration, err error)
	ObserveEviction(bytes int64)
}

// DefaultMaxConcurrentBuilds is CacheConfig.MaxConcurrentBuilds's
// default. A build at the default --image-max-files peaks near 240 MiB
// (BenchmarkColdBuildFileLimit), so two fit the chart's 512Mi limit.
const DefaultMaxConcurrentBuilds = 2

func (c *CacheConfig) setDefaults() error {
	if c.MaxConcurrentBuilds == 0 {
		c.MaxConcurrentBuilds = DefaultMaxConcurrentBuilds
	}
	if c.BuildTimeout == 0 {
		c.BuildTimeout = 30 * time.Minute
	}
	if c.HighWatermark == 0 {
		c.HighWatermark = 0.85
	}
	if c.LowWatermark == 0 {
		c.LowWatermark = 0.70
	}
	if c.Grace == 0 {
		c.Grace = 5 * time.Minute
	}
	if c.AnswerMargin == 0 {
		c.AnswerMargin = 5 * time.Second
	}
	if c.FailureTTL == 0 {
		c.FailureTTL = 10 * time.Minute
	}
	if !(c.LowWatermark > 0 && c.LowWatermark < c.HighWatermark && c.HighWatermark <= 1) {
		return fmt.Errorf("rootfs: watermarks must satisfy 0 < low (%v) < high (%v) <= 1", c.LowWatermark, c.HighWatermark)
	}
	if c.MaxBytes < 0 || c.BuildTimeout < 0 || c.Grace < 0 || c.MaxConcurrentBuilds < 0 {
		return errors.New("rootfs: MaxBytes, BuildTimeout, Grace and MaxConcurrentBuilds must not be negative")
	}
	return nil
}

// Base is an installed, immutable base disk.
type Base struct {
	Key  Key
	Path string
	Size int64
}

// Cache is the node-level base-disk cache. Its state is the disk-images
// directory itself; the only in-memory state is the set of builds in
// flight in this process.
type Cache struct {
	cfg CacheConfig

	mu      sync.Mutex
	flights map[Key]*flight
	// failed holds the deterministic failures remembered (Deterministic).
	failed map[Key]failure
	// slots holds a token for every build running; its capacity is
	// MaxConcurrentBuilds.
	slots chan struct{}
}

// flight is one build in progress; every caller for its key waits on done.
type flight struct {
	done     chan struct{}
	progress *BuildProgress
	base     Base
	err      error
}

// failure is a deterministic build failure being remembered.
type failure struct {
	err       error
	at, until time.Time
}

// RememberedError is a deterministic build failure returned again
// without building: it wraps the original, so it is classified as that
// was.
type RememberedError struct {
	Key       Key
	At, Until time.Time
	Err       error
}

func (e *RememberedError) Error() string {
	return fmt.Sprintf("%v (remembered from a build of %s at %s, which would fail the same way; it is tried again after %s)",
		e.Err, e.Key, e.At.UTC().Format(time.RFC3339), e.Until.UTC().Format(time.RFC3339))
}

func (e *RememberedError) Unwrap() error { return e.Err }

// NewCache prepares the home and removes temp files that no live builder
// owns: a build killed halfway leaves only a file in tmp/, never one at a
// final path.
func NewCache(ctx context.Context, cfg CacheConfig) (*Cache, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if err := cfg.Home.Prepare(); err != nil {
		return nil, err
	}
	c := &Cache{cfg: cfg, flights: map[Key]*flight{}, failed: map[Key]failure{}, slots: make(chan struct{}, cfg.MaxConcurrentBuilds)}
	if err := c.removeStaleTemps(ctx); err != nil {
		return nil, err
	}
	c.removeOrphanInfo(ctx)
	return c, nil
}

// Path is where the base for k lives once installed.
func (c *Cache) Path(k Key) string {
	return filepath.Join(c.cfg.Home.Images().DiskImagesDir(), k.FileName())
}

func (c *Cache) lockPath(k Key) string {
	return filepath.Join(c.cfg.Home.LocksDir(), k.lockName())
}

// Lookup returns the installed base for k without building it. A hit
// refreshes the base's access time, which eviction reads as last use.
func (c *Cache) Lookup(k Key) (Base, bool, error) {
	if err := k.Validate(); err != nil {
		return Base{}, false, err
	}
	return c.lookup(k)
}

func (c *Cache) lookup(k Key) (Base, bool, error) {
	p := c.Path(k)
	fi, err := os.Stat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return Base{}, false, nil
	}
	if err != nil {
		return Base{}, false, fmt.Errorf("rootfs: stat base %s: %w", p, err)
	}
	if !fi.Mode().IsRegular() {
		return Base{}, false, fmt.Errorf("rootfs: base %s is not a regular file (%s)", p, fi.Mode().Type())
	}
	// Best effort: a failed touch only makes the base look older to LRU.
	now := unix.NsecToTimespec(time.Now().UnixNano())
	_ = unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{now, {Nsec: unix.UTIME_OMIT}}, 0)
	return Base{Key: k, Path: p, Size: fi.Size()}, true, nil
}

// Ensure returns the installed base for k, building it with build if it is
// not cached. Exactly one build per key runs at a time: callers in this
// process join the build in flight, other processes wait on the key's
// flock and then find the installed file.
//
// The build does not belong to the caller: if ctx ends first, Ensure
// returns ctx's error and the build goes on (bounded by BuildTimeout), so
// a retry (kubelet gives up after about two minutes) joins it. A failed
// build installs nothing, and the next caller starts afresh. At most
// MaxConcurrentBuilds builds run at once; a build queued behind them
// waits within its own BuildTimeout, whoever is still waiting for it.
func (c *Cache) Ensure(ctx context.Context, k Key, build BuildFunc) (Base, error) {
	if err := k.Validate(); err != nil {
		return Base{}, err
	}
	if b, ok, err := c.lookup(k); err != nil || ok {
		return b, err
	}

	c.mu.Lock()
	if m, ok := c.failed[k]; ok {
		if time.Now().Before(m.until) {
			c.mu.Unlock()
			return Base{}, &RememberedError{Key: k, At: m.at, Until: m.until, Err: m.err}
		}
		delete(c.failed, k)
	}
	f, joined := c.flights[k]
	if !joined {
		f = &flight{done: make(chan struct{}), progress: newBuildProgress()}
		c.flights[k] = f
		// Keep ctx's values (the logger) but not its cancellation.
		bctx, cancel := context.WithTimeout(withProgress(context.WithoutCancel(ctx), f.progress), c.cfg.BuildTimeout)
		go func() {
			defer cancel()
			f.base, f.err = c.buildOnce(bctx, k, build)
			c.mu.Lock()
			delete(c.flights, k)
			if f.err != nil && c.cfg.Deterministic != nil && c.cfg.Deterministic(f.err) {
				now := time.Now()
				c.failed[k] = failure{err: f.err, at: now, until: now.Add(c.cfg.FailureTTL)}
			}
			c.mu.Unlock()
			close(f.done)
		}()
	}
	c.mu.Unlock()
	if joined {
		klog.FromContext(ctx).V(4).Info("Joining base build in flight", "key", k)
	}

	// Answer a little before the caller's deadline, with how far the
	// build got: a call that just runs out of time tells its user nothing.
	var early <-chan time.Time
	if at, ok := answerBy(ctx, c.cfg.AnswerMargin); ok {
		t := time.NewTimer(time.Until(at))
		defer t.Stop()
		early = t.C
	}
	select {
	case <-f.done:
		return f.base, f.err
	case <-early:
		return Base{}, &BuildingError{Key: k, Progress: f.progress.Snapshot()}
	case <-ctx.Done():
		return Base{}, &BuildingError{Key: k, Progress: f.progress.Snapshot(), Err: ctx.Err()}
	}
}

// Building reports whether a build for k is in flight in this process.
func (c *Cache) Building(k Key) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.flights[k]
	return ok
}

func (c *Cache) buildOnce(ctx context.Context, k Key, build BuildFunc) (Base, error) {
	log := klog.FromContext(ctx).WithValues("key", k)
	lock, err := acquireLock(ctx, c.lockPath(k))
	if err != nil {
		return Base{}, fmt.Errorf("rootfs: build base %s: %w", k, err)
	}
	defer lock.release()
	// Another process may have installed it while we waited for the lock.
	if b, ok, err := c.lookup(k); err != nil || ok {
		return b, err
	}

	release, err := c.acquireSlot(ctx, k)
	if err != nil {
		return Base{}, err
	}
	defer release()
	start := time.Now()
	b, err := c.install(ctx, k, build)
	if c.cfg.Observer != nil {
		c.cfg.Observer.ObserveBuild(time.Since(start), err)
	}
	if err == nil {
		log.Info("Installed base disk", "path", b.Path, "bytes", b.Size, "duration", time.Since(start))
	}
	return b, err
}

// acquireSlot waits until fewer than MaxConcurrentBuilds builds run, or
// until ctx (the build's own, bounded by BuildTimeout) ends. A build that
// has to wait says so in the log, and again when it starts.
func (c *Cache) acquireSlot(ctx context.Context, k Key) (release func(), err error) {
	release = func() { <-c.slots }
	select {
	case c.slots <- struct{}{}:
		return release, nil
	default:
	}
	log := klog.FromContext(ctx).WithValues("key", k)
	log.Info("Waiting for a build slot", "maxConcurrentBuilds", cap(c.slots))
	start := time.Now()
	select {
	case c.slots <- struct{}{}:
		log.Info("Got a build slot", "waited", time.Since(start))
		return release, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("rootfs: build base %s: waited %s for one of %d build slots: %w", k, time.Since(start).Round(time.Millisecond), cap(c.slots), ctx.Err())
	}
}

// install builds k's base into a temp file and moves it into place.
func (c *Cache) install(ctx context.Context, k Key, build BuildFunc) (Base, error) {
	log := klog.FromContext(ctx).WithValues("key", k)
	final := c.Path(k)
	tmp, err := os.CreateTemp(c.cfg.Home.TempDir(), k.FileName()+".*.tmp")
	if err != nil {
		return Base{}, fmt.Errorf("rootfs: build base %s: %w", k, err)
	}
	installed := false
	defer func() {
		if !installed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	log.Info("Building base disk", "tmp", tmp.Name())
	info, err := build(ctx, tmp)
	if err != nil {
		return Base{}, fmt.Errorf("rootfs: build base %s: %w", k, err)
	}
	// Read-only to every user: the base is shared by all boxes and must
	// never change once installed.
	if err := tmp.Chmod(0o444); err != nil {
		return Base{}, fmt.Errorf("rootfs: chmod %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return Base{}, fmt.Errorf("rootfs: fsync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return Base{}, fmt.Errorf("rootfs: close %s: %w", tmp.Name(), err)
	}
	// The record goes in first, so that no crash leaves a base without
	// one; a record without its base is removed at start-up.
	if err := c.writeInfo(k, info); err != nil {
		return Base{}, err
	}
	// RENAME_NOREPLACE: even a bug elsewhere must not swap the bytes under
	// overlays that already back onto an installed base.
	if err := unix.Renameat2(unix.AT_FDCWD, tmp.Name(), unix.AT_FDCWD, final, unix.RENAME_NOREPLACE); err != nil {
		if !errors.Is(err, unix.EEXIST) {
			if rerr := c.removeInfo(k); rerr != nil {
				log.Error(rerr, "Cannot remove the record of a base that was not installed; start-up removes it")
			}
		}
		return Base{}, fmt.Errorf("rootfs: install base %s: rename %s: %w", k, tmp.Name(), err)
	}
	installed = true
	if err := syncDir(filepath.Dir(final)); err != nil {
		return Base{}, err
	}
	b, ok, err := c.lookup(k)
	if err == nil && !ok {
		err = fmt.Errorf("rootfs: base %s vanished right after install", final)
	}
	if err != nil {
		return Base{}, err
	}
	return b, nil
}

// removeStaleTemps deletes what killed builds left in tmp/: partial bases
// and their records (both are named after their key). A temp file whose
// key lock is held belongs to a live build in another process and is left
// alone.
func (c *Cache) removeStaleTemps(ctx context.Context) error {
	dir := c.cfg.Home.TempDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("rootfs: list %s: %w", dir, err)
	}
	log := klog.FromContext(ctx)
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		removed, err := c.removeIfStale(p, e.Name())
		if err != nil {
			return err
		}
		if removed {
			log.Info("Removed stale temp file", "path", p)
		} else {
			log.V(2).Info("Leaving temp file of a live build", "path", p)
		}
	}
	return nil
}

func (c *Cache) removeIfStale(p, name string) (bool, error) {
	if base, _, ok := strings.Cut(name, ".ext4."); ok {
		if k, ok := parseFileName(base + ".ext4"); ok {
			l, free, err := tryLock(c.lockPath(k))
			if err != nil {
				return false, fmt.Errorf("rootfs: clean %s: %w", p, err)
			}
			if !free {
				return false, nil
			}
			// Hold the lock while removing so no build can start on it.
			defer l.release()
		}
	}
	if err := os.RemoveAll(p); err != nil {
		return false, fmt.Errorf("rootfs: remove stale temp %s: %w", p, err)
	}
	return true, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("rootfs: open %s for fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("rootfs: fsync %s: %w", dir, err)
	}
	return nil
}
