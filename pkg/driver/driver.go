// Package driver implements the boxlite-csi CSI Identity, Controller and
// Node services. One binary serves all three on each node: provisioning is
// per node (external-provisioner runs with --node-deployment), because a
// box only exists on the node whose cache holds its base.
//
// The driver keeps no state of its own. Volumes are the box directories
// under <home>/boxes, each with a box.json recording what CreateVolume
// decided; mounts are read back from the kernel. A restart therefore loses
// nothing, and there is no side database to drift from the disk.
package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/metrics"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// BaseBuilder turns an image into a base disk. Its version is part of the
// cache key.
type BaseBuilder interface {
	Version() string
	// Usable reports whether the builder can run on this node (Probe).
	Usable() error
	Build(ctx context.Context, img v1.Image, out *os.File) error
}

// Driver is the boxlite-csi plugin.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	cfg     Config
	home    layout.Home
	cache   *rootfs.Cache
	builder BaseBuilder
	mounter *syscallMounter
	locks   *volumeLocks
	// transports pools registry connections across CreateVolume and
	// NodeStage calls.
	transports *source.Transports

	// capacityMu is held from a capacity check until the claim it allowed
	// is recorded (CreateVolume, NodeExpandVolume).
	capacityMu sync.Mutex

	readyMu     sync.Mutex
	ready       bool
	metricsAddr net.Addr
}

// New prepares the home, recovers state from disk and returns a driver
// ready to Run.
func New(ctx context.Context, cfg Config, builder BaseBuilder) (*Driver, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("driver config: %w", err)
	}
	if err := checkMountAPI(); err != nil {
		return nil, err
	}
	home := layout.NewHome(cfg.Home, layout.Config{BindMountSupported: true})
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New()
	}
	cache, err := rootfs.NewCache(ctx, rootfs.CacheConfig{
		Observer:            cfg.Metrics,
		Home:                home,
		BuildTimeout:        cfg.BuildTimeout,
		MaxConcurrentBuilds: cfg.MaxConcurrentBuilds,
		HighWatermark:       cfg.CacheHighWatermark,
		LowWatermark:        cfg.CacheLowWatermark,
		MaxBytes:            cfg.CacheMaxBytes,
		Grace:               cfg.CacheGrace,
		Deterministic:       deterministicBuildFailure,
	})
	if err != nil {
		return nil, err
	}
	d := &Driver{
		cfg:        cfg,
		home:       home,
		cache:      cache,
		builder:    builder,
		mounter:    newMounter(),
		locks:      newVolumeLocks(),
		transports: &source.Transports{},
	}
	if err := d.recover(ctx); err != nil {
		return nil, err
	}
	if err := cfg.Metrics.Register(newStateCollector(d)); err != nil {
		return nil, fmt.Errorf("driver: register state metrics: %w", err)
	}
	return d, nil
}

// Run serves the CSI endpoint (and the kubelet registration socket, if
// configured) until ctx ends, then stops gracefully.
func (d *Driver) Run(ctx context.Context) error {
	log := klog.FromContext(ctx)
	l, err := listen(d.cfg.Endpoint)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.interceptor))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)

	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(l) }()
	if d.cfg.MetricsAddress != "" {
		addr, done, err := d.cfg.Metrics.Serve(ctx, d.cfg.MetricsAddress)
		if err != nil {
			srv.Stop()
			return err
		}
		d.setMetricsAddr(addr)
		go func() {
			if err := <-done; err != nil {
				errc <- err
			}
		}()
	}
	var reg *grpc.Server
	if d.cfg.KubeletRegistrationPath != "" {
		if reg, err = d.serveRegistration(ctx, errc); err != nil {
			srv.Stop()
			return err
		}
	}
	if d.cfg.EvictionInterval > 0 {
		go d.cache.RunEviction(ctx, d.cfg.EvictionInterval)
	}
	d.setReady(true)
	log.Info("Serving CSI", "endpoint", d.cfg.Endpoint, "driver", d.cfg.DriverName, "node", d.cfg.NodeID, "version", d.cfg.Version)

	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	d.setReady(false)
	log.Info("Stopping CSI server")
	stopGracefully(srv, 10*time.Second)
	if reg != nil {
		stopGracefully(reg, time.Second)
	}
	if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve %s: %w", d.cfg.Endpoint, err)
	}
	return nil
}

// stopGracefully lets in-flight calls finish, but not forever: a call
// waiting on a long build must not hold up a SIGTERM.
func stopGracefully(s *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		s.Stop()
	}
}

// Metrics is the driver's metric set.
func (d *Driver) Metrics() *metrics.Metrics { return d.cfg.Metrics }

// MetricsAddr is where metrics are served, nil before Run starts serving
// them or when they are off.
func (d *Driver) MetricsAddr() net.Addr {
	d.readyMu.Lock()
	defer d.readyMu.Unlock()
	return d.metricsAddr
}

func (d *Driver) setMetricsAddr(a net.Addr) {
	d.readyMu.Lock()
	defer d.readyMu.Unlock()
	d.metricsAddr = a
}

func (d *Driver) setReady(v bool) {
	d.readyMu.Lock()
	d.ready = v
	d.readyMu.Unlock()
}

func (d *Driver) isServing() bool {
	d.readyMu.Lock()
	defer d.readyMu.Unlock()
	return d.ready
}

// recover cleans up after a crash, from what is on disk: half-created or
// half-deleted boxes (dot-entries under boxes/), temp files inside boxes
// and among the records, and boxes of an earlier release, which get a
// record. Mounts need no recovery: kubelet calls Stage and Publish again,
// and they work from whatever the kernel reports.
//
// Nothing here stops the plugin from starting. A box it cannot clean up
// or adopt is logged and left for the operator: the other boxes on the
// node must still be served.
func (d *Driver) recover(ctx context.Context) error {
	log := klog.FromContext(ctx)
	if err := os.MkdirAll(d.recordsDir(), 0o700); err != nil {
		return fmt.Errorf("recover: create %s: %w", d.recordsDir(), err)
	}
	if records, err := safeopen.OpenRoot(d.recordsDir()); err == nil {
		removeTemps(log, records, ".")
		records.Close()
	}
	dir := d.home.BoxesDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("recover: list %s: %w", dir, err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), ".") {
			if err := unmountInside(p); err != nil {
				log.Error(err, "Cannot unmount everything inside a half-finished box", "path", p)
			}
			if err := sealed.RemoveAll(p); err != nil {
				log.Error(err, "Cannot remove half-finished box; leaving it for the operator", "path", p)
				continue
			}
			log.Info("Removed half-finished box", "path", p)
			continue
		}
		box, err := d.home.Box(e.Name())
		if err != nil || !e.IsDir() {
			log.Info("Ignoring an entry in the boxes directory that is not a box", "path", p)
			continue
		}
		removeBoxTemps(log, box)
		d.adoptIfNeeded(ctx, box)
	}
	d.removeOrphans(ctx)
	d.removeSnapshotDebris(log)
	return nil
}

// removeOrphans removes records whose box is gone, and plugin-owned files
// whose record is gone. A record without a box is a create or a delete
// that did not finish, or a volume an earlier release deleted after a
// rollback; the retry of either call redoes its work from nothing, so
// nothing is lost, and the record's base link stops pinning the base.
func (d *Driver) removeOrphans(ctx context.Context) {
	log := klog.FromContext(ctx)
	ents, err := os.ReadDir(d.recordsDir())
	if err != nil {
		log.Error(err, "Cannot list the volume records", "path", d.recordsDir())
		return
	}
	records := map[string]bool{}
	for _, e := range ents {
		id, ok := recordID(e.Name())
		if !ok {
			continue
		}
		box, err := d.home.Box(id)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if err := unix.Lstat(box.Root(), &st); err == nil || !errors.Is(err, unix.ENOENT) {
			records[id] = true
			continue
		}
		if err := d.removeRecord(id); err != nil {
			log.Error(err, "Cannot remove the record of a volume that has no box", "volume", id)
			records[id] = true
			continue
		}
		log.Info("Removed the record of a volume that has no box: a create or delete that did not finish", "volume", id)
	}
	for _, e := range ents {
		id, owned := ownedID(e.Name())
		if !owned || records[id] {
			continue
		}
		if err := d.removeOwned(id); err != nil {
			log.Error(err, "Cannot remove the plugin-owned files of a volume that has no record", "volume", id)
		}
	}
}

// adoptIfNeeded gives a box of an earlier release, which has no record,
// the record its box.json holds.
func (d *Driver) adoptIfNeeded(ctx context.Context, box layout.Box) {
	log := klog.FromContext(ctx)
	_, err := d.readRecordOnly(box.ID())
	if err == nil {
		return
	}
	if !errors.Is(err, fs.ErrNotExist) {
		log.Error(err, "Volume record is unreadable; the volume is left for the operator", "volume", box.ID())
		return
	}
	if _, err := d.adoptBox(box); err != nil {
		log.Error(err, "Box has no volume record and its box.json cannot be adopted; the box is left for the operator", "volume", box.ID())
		return
	}
	log.Info("Adopted a box made by an earlier release: its box.json is now the volume record", "volume", box.ID(), "record", d.recordPath(box.ID()))
}

// removeTemps removes the dot-named temp files that an interrupted write
// left in the directory rel beneath root. A box is its pod's to write, so
// the directory is opened without following links and names are removed
// relative to it: a pod that replaced disks/ with a link to a host
// directory must not have the plugin delete files there.
func removeTemps(log klog.Logger, root *safeopen.Root, rel string) {
	dir, err := root.OpenDir(rel)
	if err != nil {
		return
	}
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return
	}
	for _, name := range names {
		if ok, _ := filepath.Match(".*.tmp*", name); !ok {
			continue
		}
		if err := unix.Unlinkat(int(dir.Fd()), name, 0); err == nil {
			log.Info("Removed stale temp file", "path", filepath.Join(root.Name(), rel, name))
		}
	}
}

// removeBoxTemps removes the temp files in a box: in its root (box.json)
// and in disks/ (the overlay).
func removeBoxTemps(log klog.Logger, box layout.Box) {
	root, err := safeopen.OpenRoot(box.Root())
	if err != nil {
		return
	}
	defer root.Close()
	removeTemps(log, root, ".")
	removeTemps(log, root, "disks")
}
