package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// EvictStats reports one eviction pass.
type EvictStats struct {
	// Bases is how many bases the cache held when the pass started.
	Bases int
	// CacheBytes is what they occupied on disk.
	CacheBytes int64
	// UsedFraction is the cache filesystem's use when the pass started.
	UsedFraction float64
	// Evicted names the keys removed, least recently used first.
	Evicted []Key
	// FreedBytes is the disk space the removals released.
	FreedBytes int64
	// Skipped is why nothing was considered, if so.
	Skipped string
}

type fileID struct{ dev, ino uint64 }

type cachedBase struct {
	key     Key
	path    string
	id      fileID
	nlink   uint64
	bytes   int64 // allocated, not apparent: a base is sparse
	lastUse time.Time
}

// usage returns the cache's bases and how full the cache filesystem is.
func (c *Cache) usage() (bases []cachedBase, cacheBytes int64, used float64, err error) {
	dir := c.cfg.Home.Images().DiskImagesDir()
	bases, cacheBytes, err = listBases(dir)
	if err != nil {
		return nil, 0, 0, err
	}
	used, err = usedFraction(dir)
	return bases, cacheBytes, used, err
}

// listBases reads the installed bases in dir, the cache's disk-images
// directory, and the space they occupy.
func listBases(dir string) (bases []cachedBase, cacheBytes int64, err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, 0, fmt.Errorf("rootfs: list cache %s: %w", dir, err)
	}
	for _, e := range ents {
		k, ok := parseFileName(e.Name())
		if !ok {
			continue
		}
		p := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, 0, fmt.Errorf("rootfs: stat %s: %w", p, err)
		}
		last := time.Unix(st.Atim.Unix())
		if m := time.Unix(st.Mtim.Unix()); m.After(last) {
			last = m
		}
		b := cachedBase{key: k, path: p, id: fileID{st.Dev, st.Ino}, nlink: uint64(st.Nlink), bytes: st.Blocks * 512, lastUse: last}
		bases = append(bases, b)
		cacheBytes += b.bytes
	}
	return bases, cacheBytes, nil
}

// CachedBase is one installed base as an operator sees it.
type CachedBase struct {
	Key  Key
	Path string
	// Bytes is the space it occupies (it is sparse), Size its length.
	Bytes, Size int64
	// Links is how many hard links other than the cache's own hold it:
	// boxes, the plugin's owned copies of their bases, and snapshots.
	Links int
	// LastUsed is the later of its access and modification times, which
	// is what eviction orders by.
	LastUsed time.Time
	// Info is its record (image config, index digest, anonymous pull);
	// InfoErr says why it could not be read, if it could not.
	Info    BaseInfo
	InfoErr string
}

// ListBases reads the bases installed in home's cache, straight from
// disk. It changes nothing and takes no lock, so it is safe beside a
// running plugin (a base being installed or evicted at that moment may be
// missing from the answer or present without its record).
func ListBases(home layout.Home) ([]CachedBase, error) {
	dir := home.Images().DiskImagesDir()
	bases, _, err := listBases(dir)
	if err != nil {
		return nil, err
	}
	out := make([]CachedBase, 0, len(bases))
	for _, b := range bases {
		cb := CachedBase{Key: b.key, Path: b.path, Bytes: b.bytes, Links: int(b.nlink) - 1, LastUsed: b.lastUse}
		if st, err := os.Lstat(b.path); err == nil {
			cb.Size = st.Size()
		}
		raw, err := safeopen.ReadRegular(b.path+infoSuffix, maxBaseInfoBytes)
		if err == nil {
			cb.Info, err = ParseBaseInfo(raw, b.key, b.path+infoSuffix)
		}
		if err != nil {
			cb.InfoErr = err.Error()
		}
		out = append(out, cb)
	}
	return out, nil
}

// usedFraction is the filesystem's use as df computes it: space reserved
// for root counts as neither used nor available.
func usedFraction(dir string) (float64, error) {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return 0, fmt.Errorf("rootfs: statfs %s: %w", dir, err)
	}
	usedBlocks := s.Blocks - s.Bfree
	denom := usedBlocks + s.Bavail
	if denom == 0 {
		return 0, nil
	}
	return float64(usedBlocks) / float64(denom), nil
}

// references returns the bases the boxes on disk back onto. A box's
// overlay names ../base/rootfs.ext4, a hard link to a cached base, so the
// inode at that path identifies the base whatever the cache file is called.
// complete is false only if the boxes cannot be listed at all.
//
// A box that cannot be read does not stop the pass: boxes are their pods'
// to damage, and one damaged box must not stop eviction for the node (the
// disk would fill). Nor does evicting for it lose anything. A box holds
// its base by a hard link, so if an unreadable box did reference a base
// that is evicted, its link keeps the inode, and only the space is not
// freed.
func (c *Cache) references(ctx context.Context) (refs map[fileID]bool, complete bool) {
	log := klog.FromContext(ctx)
	home := c.cfg.Home
	ids, err := home.BoxIDs()
	if err != nil {
		log.Error(err, "Cannot list boxes; skipping eviction")
		return nil, false
	}
	refs = map[fileID]bool{}
	complete = true
	for _, id := range ids {
		box, err := home.Box(id)
		if err != nil {
			log.Error(err, "Cannot lay out box; reference scan incomplete", "box", id)
			complete = false
			continue
		}
		// A tampered or corrupt overlay still pins its base: the box's
		// owner may repair it. The overlay is not read here at all.
		ref, ok, err := baseReference(box)
		if err != nil {
			log.Error(err, "Cannot look at a box's base link; it pins nothing in this pass", "box", box.ID())
			continue
		}
		if ok {
			refs[ref] = true
		}
	}
	return refs, complete
}

// baseReference is the base a box's link references. The box is its pod's
// to write, so the link is looked at beneath the box root without
// following links: a link a pod planted there, or anything but a regular
// file, references nothing (it must not pin another tenant's base, nor
// stop every eviction pass by failing to resolve). Only an error that
// leaves the answer unknown is returned.
func baseReference(box layout.Box) (fileID, bool, error) {
	root, err := safeopen.OpenRoot(box.Root())
	if errors.Is(err, fs.ErrNotExist) {
		return fileID{}, false, nil
	}
	if err != nil {
		return fileID{}, false, err
	}
	defer root.Close()
	rel, err := filepath.Rel(box.Root(), box.BasePath())
	if err != nil {
		return fileID{}, false, err
	}
	st, err := root.Lstat(rel)
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV), errors.Is(err, unix.ENOTDIR):
		return fileID{}, false, nil
	case err != nil:
		return fileID{}, false, err
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fileID{}, false, nil
	}
	return fileID{st.Dev, st.Ino}, true, nil
}

// Evict removes least-recently-used bases once the cache filesystem is
// above the high watermark (or the bases exceed MaxBytes), until it is
// back under the low one. It never removes a base that a box references,
// that is being built, or that was installed or used within Grace, and it
// skips the pass entirely if the boxes cannot be listed.
func (c *Cache) Evict(ctx context.Context) (EvictStats, error) {
	log := klog.FromContext(ctx)
	bases, cacheBytes, used, err := c.usage()
	if err != nil {
		return EvictStats{}, err
	}
	st := EvictStats{Bases: len(bases), CacheBytes: cacheBytes, UsedFraction: used}
	var maxLow int64
	if c.cfg.MaxBytes > 0 {
		maxLow = int64(float64(c.cfg.MaxBytes) * c.cfg.LowWatermark / c.cfg.HighWatermark)
	}
	over := func() bool {
		return used > c.cfg.HighWatermark || c.cfg.MaxBytes > 0 && cacheBytes > c.cfg.MaxBytes
	}
	done := func() bool {
		return used <= c.cfg.LowWatermark && (c.cfg.MaxBytes == 0 || cacheBytes <= maxLow)
	}
	if !over() {
		st.Skipped = "below the high watermark"
		return st, nil
	}
	refs, complete := c.references(ctx)
	if !complete {
		st.Skipped = "reference scan incomplete"
		return st, nil
	}
	now := time.Now()
	var candidates []cachedBase
	for _, b := range bases {
		switch {
		case refs[b.id] || b.nlink > 1:
		case c.Building(b.key):
		case now.Sub(b.lastUse) < c.cfg.Grace:
		default:
			candidates = append(candidates, b)
		}
	}
	sort.Slice(candidates, func(i, j int) bool { return candidates[i].lastUse.Before(candidates[j].lastUse) })

	dir := c.cfg.Home.Images().DiskImagesDir()
	for _, b := range candidates {
		if done() {
			break
		}
		if err := ctx.Err(); err != nil {
			return st, fmt.Errorf("rootfs: eviction: %w", err)
		}
		freed, err := c.evictOne(b)
		if err != nil {
			return st, err
		}
		if freed < 0 {
			continue
		}
		st.Evicted = append(st.Evicted, b.key)
		st.FreedBytes += freed
		if c.cfg.Observer != nil {
			c.cfg.Observer.ObserveEviction(freed)
		}
		cacheBytes -= freed
		if used, err = usedFraction(dir); err != nil {
			return st, err
		}
		log.Info("Evicted base disk", "key", b.key, "path", b.path, "bytes", freed, "lastUse", b.lastUse)
	}
	if len(st.Evicted) > 0 {
		if err := syncDir(dir); err != nil {
			return st, err
		}
	}
	return st, nil
}

// evictOne unlinks one base under its key lock, re-checking that nothing
// linked it since the scan. It returns -1 if the base was left alone.
func (c *Cache) evictOne(b cachedBase) (int64, error) {
	l, free, err := tryLock(c.lockPath(b.key))
	if err != nil {
		return 0, err
	}
	if !free {
		return -1, nil
	}
	defer l.release()
	var st unix.Stat_t
	if err := unix.Lstat(b.path, &st); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return -1, nil
		}
		return 0, fmt.Errorf("rootfs: stat %s: %w", b.path, err)
	}
	if st.Nlink > 1 || st.Ino != b.id.ino {
		return -1, nil
	}
	// A Lookup since the scan (a NodeStage about to link this base) has
	// refreshed its access time: the base is in use again.
	if last := time.Unix(st.Atim.Unix()); time.Since(last) < c.cfg.Grace {
		return -1, nil
	}
	if err := os.Remove(b.path); err != nil {
		return 0, fmt.Errorf("rootfs: evict %s: %w", b.path, err)
	}
	// The record goes with its base. Should this fail, start-up removes
	// the record of a base that is gone.
	if err := c.removeInfo(b.key); err != nil {
		return 0, fmt.Errorf("rootfs: evict %s: %w", b.path, err)
	}
	return st.Blocks * 512, nil
}

// RunEviction runs an eviction pass every interval until ctx ends.
func (c *Cache) RunEviction(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := c.Evict(ctx); err != nil {
				klog.FromContext(ctx).Error(err, "Eviction pass failed")
			}
		}
	}
}

// Usage is what the cache holds right now, read from disk.
type Usage struct {
	// Bases is how many base disks are installed; InUse how many of them
	// a box links.
	Bases, InUse int
	// Bytes is the disk space the bases occupy.
	Bytes int64
	// UsedFraction is how full the cache filesystem is.
	UsedFraction float64
}

// Usage reads the cache directory. A base counts as in use when it has
// more than one link: every box holds a hard link to its base.
func (c *Cache) Usage() (Usage, error) {
	bases, bytes, used, err := c.usage()
	if err != nil {
		return Usage{}, err
	}
	u := Usage{Bases: len(bases), Bytes: bytes, UsedFraction: used}
	for _, b := range bases {
		if b.nlink > 1 {
			u.InUse++
		}
	}
	return u, nil
}

// Fill reports how full the cache filesystem is, and the high watermark it
// is judged against.
func (c *Cache) Fill() (used, high float64, err error) {
	used, err = usedFraction(c.cfg.Home.Images().DiskImagesDir())
	return used, c.cfg.HighWatermark, err
}
