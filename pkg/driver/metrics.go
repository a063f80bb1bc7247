package driver

import (
	"errors"
	"io/fs"
	"os"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/boxlite-csi/boxlite-csi/pkg/metrics"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// Box states reported by boxlite_csi_boxes. They are derived from the box
// on disk and the kernel's mount table at scrape time, like everything
// else the driver knows.
const (
	boxNew       = "new"       // created, no overlay yet (not staged since CreateVolume)
	boxReady     = "ready"     // valid overlay over its base, not mounted anywhere
	boxMounted   = "mounted"   // valid overlay, mounted at a staging or target path
	boxUnhealthy = "unhealthy" // overlay refused (tampered, corrupt, unreadable) or base missing
)

var boxStates = []string{boxNew, boxReady, boxMounted, boxUnhealthy}

// stateCollector reads cache and box state from disk on every scrape, so
// the numbers are right after a restart and cannot drift.
type stateCollector struct {
	d *Driver

	cacheBytes, cacheBases, cacheUsed, boxes, snapshots, snapshotBytes, scrapeErrors *prometheus.Desc
}

func newStateCollector(d *Driver) *stateCollector {
	name := func(n string) string { return prometheus.BuildFQName(metrics.Namespace, "", n) }
	return &stateCollector{
		d:             d,
		cacheBytes:    prometheus.NewDesc(name("cache_bytes"), "Disk space the cached base disks occupy.", nil, nil),
		cacheBases:    prometheus.NewDesc(name("cache_bases"), "Cached base disks, by whether a box links them (in_use) or not (unused, evictable).", []string{"state"}, nil),
		cacheUsed:     prometheus.NewDesc(name("cache_filesystem_used_ratio"), "How full the home filesystem is, as the eviction watermarks judge it.", nil, nil),
		boxes:         prometheus.NewDesc(name("boxes"), "Boxes on this node, by state: new, ready, mounted, unhealthy.", []string{"state"}, nil),
		snapshots:     prometheus.NewDesc(name("snapshots"), "Snapshots on this node.", nil, nil),
		snapshotBytes: prometheus.NewDesc(name("snapshot_layer_bytes"), "Disk space the frozen layers of this node's snapshots occupy, each layer counted once.", nil, nil),
		scrapeErrors:  prometheus.NewDesc(name("state_scrape_errors"), "Boxes or cache entries this scrape could not read (1 for an unreadable cache).", nil, nil),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.cacheBytes
	ch <- c.cacheBases
	ch <- c.cacheUsed
	ch <- c.boxes
	ch <- c.snapshots
	ch <- c.snapshotBytes
	ch <- c.scrapeErrors
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	failed := 0
	if u, err := c.d.cache.Usage(); err != nil {
		failed++
	} else {
		ch <- prometheus.MustNewConstMetric(c.cacheBytes, prometheus.GaugeValue, float64(u.Bytes))
		ch <- prometheus.MustNewConstMetric(c.cacheBases, prometheus.GaugeValue, float64(u.InUse), "in_use")
		ch <- prometheus.MustNewConstMetric(c.cacheBases, prometheus.GaugeValue, float64(u.Bases-u.InUse), "unused")
		ch <- prometheus.MustNewConstMetric(c.cacheUsed, prometheus.GaugeValue, u.UsedFraction)
	}
	counts, errs := c.d.boxStates()
	failed += errs
	for _, s := range boxStates {
		ch <- prometheus.MustNewConstMetric(c.boxes, prometheus.GaugeValue, float64(counts[s]), s)
	}
	n, b := c.d.snapshotsUsage()
	ch <- prometheus.MustNewConstMetric(c.snapshots, prometheus.GaugeValue, float64(n))
	ch <- prometheus.MustNewConstMetric(c.snapshotBytes, prometheus.GaugeValue, float64(b))
	ch <- prometheus.MustNewConstMetric(c.scrapeErrors, prometheus.GaugeValue, float64(failed))
}

// boxStates classifies every box on disk; errs counts boxes it could not
// read (a box removed mid-scrape is simply gone, not an error).
func (d *Driver) boxStates() (counts map[string]int, errs int) {
	counts = map[string]int{}
	ids, err := d.home.BoxIDs()
	if err != nil {
		return counts, 1
	}
	for _, id := range ids {
		box, err := d.home.Box(id)
		if err != nil {
			errs++
			continue
		}
		r, err := d.readRecordOnly(id)
		if err != nil {
			// A box the plugin has no record of (damaged, or left for the
			// operator at start-up) is not a volume it can serve.
			if _, serr := os.Lstat(box.Root()); serr == nil {
				counts[boxUnhealthy]++
			}
			continue
		}
		box = r.boxOf(box)
		_, verr := rootfs.VerifyOverlay(box)
		switch {
		case errors.Is(verr, fs.ErrNotExist):
			if _, err := os.Stat(box.Root()); err == nil {
				counts[boxNew]++
			}
			continue
		case verr != nil:
			counts[boxUnhealthy]++
			continue
		}
		if err := rootfs.VerifyBase(box); err != nil {
			counts[boxUnhealthy]++
			continue
		}
		m, err := readBoxMounts(box)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			errs++
		case len(m.outside) > 0:
			counts[boxMounted]++
		default:
			counts[boxReady]++
		}
	}
	return counts, errs
}
