// Command boxlite-csi is the boxlite-csi node plugin: a CSI driver that
// hands each volume a ready-to-boot micro-VM box whose root disk is a qcow2
// overlay over a shared, read-only base disk built from an OCI image.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/driver"
	"github.com/boxlite-csi/boxlite-csi/pkg/metrics"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
)

// version is stamped at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	klog.Flush()
	os.Exit(code)
}

// options are the command-line settings; flags bind to its fields.
type options struct {
	cfg           driver.Config
	headroom      byteSize
	headroomRatio float64
	minBaseSize   byteSize
	reserve       byteSize
	maxVolume     byteSize
	cacheMax      byteSize
	imageMaxBytes byteSize
	imageMaxFile  byteSize
	imageMaxFiles int64
	maxBuilds     int
	showVersion   bool
}

func newFlagSet(o *options, stderr io.Writer) *flag.FlagSet {
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("boxlite-csi", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c := &o.cfg
	fs.StringVar(&c.Endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint to serve: unix:///path/to.sock or tcp://host:port; a stale socket file is removed first")
	fs.StringVar(&c.NodeID, "node-id", host, "this node's name, reported to Kubernetes and used as the topology value (default: the host name)")
	fs.StringVar(&c.Home, "home", "/var/lib/boxlite-csi",
		"node cache and box directory: images/disk-images holds shared base disks, boxes/<volume> one box per volume; tmp, bases, images and boxes must be on one filesystem")
	fs.StringVar(&c.DriverName, "driver-name", "csi.boxlite.dev", "CSI driver name; the topology key is <driver-name>/node")
	fs.Int64Var(&c.MaxVolumesPerNode, "max-volumes-per-node", 0, "most volumes the scheduler may place on this node; 0 means no limit")
	fs.StringVar(&c.KubeletRegistrationPath, "kubelet-registration-path", "",
		"if set, register with kubelet without the node-driver-registrar sidecar: the CSI socket's path on the host, e.g. /var/lib/kubelet/plugins/csi.boxlite.dev/csi.sock")
	fs.StringVar(&c.RegistrationDir, "plugin-registration-dir", "/registration",
		"kubelet's plugins_registry directory as mounted in this container; the registration socket <driver-name>-reg.sock is created there")
	fs.Var(&o.reserve, "capacity-reserve", "space kept free on the home filesystem: subtracted from GetCapacity and from what a volume may claim (e.g. 2Gi)")
	fs.Var(&o.maxVolume, "max-volume-size", "largest virtual size a volume may request; 0 means no limit")
	fs.Float64Var(&c.OverprovisionRatio, "overprovision-ratio", 1,
		"how many times the free space (after --capacity-reserve) the volumes' claims may promise beyond what their disks have allocated; 1 promises no more than there is, so a guest filling its disk never makes another box's write fail")
	fs.Float64Var(&c.CacheHighWatermark, "cache-high-watermark", 0.85, "fraction of the home filesystem in use above which unused base disks are evicted")
	fs.Float64Var(&c.CacheLowWatermark, "cache-low-watermark", 0.70, "fraction eviction brings the home filesystem back down to")
	fs.Var(&o.cacheMax, "cache-max-size", "also evict once the base disks together exceed this size; 0 means only the watermarks apply")
	fs.DurationVar(&c.CacheGrace, "cache-grace", 5*time.Minute, "base disks installed or used this recently are never evicted; 0 means no grace")
	fs.DurationVar(&c.EvictionInterval, "eviction-interval", time.Minute, "how often to run an eviction pass; 0 disables eviction")
	fs.DurationVar(&c.BuildTimeout, "build-timeout", 30*time.Minute, "longest a base-disk build may run, including after the request that started it gave up, and the time it waits for a build slot")
	fs.IntVar(&o.maxBuilds, "max-concurrent-builds", rootfs.DefaultMaxConcurrentBuilds,
		"most base-disk builds that run at once; more wait for one to end. A build holds its image's file tree in memory until the base is written (about 250 MiB at the default --image-max-files)")
	o.headroom = rootfs.DefaultHeadroom
	o.minBaseSize = rootfs.DefaultMinSize
	fs.Var(&o.headroom, "base-headroom", "free space in every base disk on top of the image content, for the guest's writes")
	fs.Float64Var(&o.headroomRatio, "base-headroom-ratio", rootfs.DefaultHeadroomRatio, "more free space in every base disk, as a fraction of the image content (upstream: 0.1)")
	fs.Var(&o.minBaseSize, "base-min-size", "smallest base disk size")
	o.imageMaxBytes = ext4.DefaultMaxTotalBytes
	o.imageMaxFile = ext4.DefaultMaxFileSize
	fs.Var(&o.imageMaxBytes, "image-max-bytes", "largest total of uncompressed layer bytes over all of an image's layers, every byte counted (headers, whiteouts, skipped entries, data after the tar end), and largest total of its file sizes (bounds decompression bombs and sparse-file claims)")
	fs.Var(&o.imageMaxFile, "image-max-file-size", "largest single file an image may contain")
	fs.Int64Var(&o.imageMaxFiles, "image-max-files", ext4.DefaultMaxFiles, "most tar entries an image may contain over all its layers, counting the parent directories they imply without an entry of their own")
	fs.StringVar(&c.LocalImageRoot, "local-image-root", "",
		"let inline volumes name local image sources (oci:, oci-archive:, docker-archive:) below this directory, with no link followed; empty (the default) refuses them, since any pod author writes inline attributes. StorageClasses may name local sources anywhere")
	fs.BoolVar(&c.AllowInlineInsecure, "allow-inline-insecure-registries", false,
		"let inline volumes set plainHTTP and insecureSkipTLSVerify; off by default, since any pod author writes inline attributes. StorageClasses may set them")
	fs.BoolVar(&c.InlineNodeCredentials, "inline-node-credentials", false,
		"let inline volumes pull with the node's docker config; off by default, so an inline volume pulls private images only with the pull secret its pod names (nodePublishSecretRef)")
	fs.StringVar(&c.MetricsAddress, "metrics-address", "",
		"serve Prometheus metrics at http://<address>/metrics, e.g. 127.0.0.1:9859 or :9859; empty (the default) serves none")
	fs.BoolVar(&o.showVersion, "version", false, "print the version and exit")
	klog.InitFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: boxlite-csi [flags]

boxlite-csi is a Kubernetes CSI plugin for micro-VM sandboxes. Each volume
is a box directory whose disks/guest-rootfs.qcow2 is a copy-on-write overlay
over a read-only ext4 base disk, built once per image digest and shared from
the node cache under --home. One process serves the Identity, Controller
and Node services for its own node.

Sizes accept plain bytes or Ki, Mi, Gi, Ti suffixes.

Operator commands, run on --home beside the plugin (each takes --home and
-o table|json, and --help):
  boxlite-csi cache ls            the base disks in the node cache
  boxlite-csi box ls              the volumes, their disks and where they are mounted
  boxlite-csi box inspect VOLUME  one volume in full
  boxlite-csi box check VOLUME    its disk's health, as NodeGetVolumeHealth says it; exit 1 if unhealthy

Flags:
`)
		fs.PrintDefaults()
	}
	return fs
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if isCLI(args) {
		return runCLI(args, stdout, stderr)
	}
	var o options
	fs := newFlagSet(&o, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "boxlite-csi: unexpected arguments %q\n", fs.Args())
		fs.Usage()
		return 2
	}
	if o.showVersion {
		fmt.Fprintf(stdout, "boxlite-csi %s %s %s/%s\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return 0
	}
	o.cfg.Version = version
	o.cfg.CapacityReserve = int64(o.reserve)
	o.cfg.MaxVolumeSize = int64(o.maxVolume)
	o.cfg.CacheMaxBytes = int64(o.cacheMax)
	if o.cfg.CacheGrace == 0 {
		// rootfs reads a zero Grace as "the default"; on the command line
		// 0 means what it says.
		o.cfg.CacheGrace = time.Nanosecond
	}
	m := metrics.New()
	o.cfg.Metrics = m
	builder := &rootfs.Ext4Builder{Observer: m}
	builder.Options.Headroom = int64(o.headroom)
	builder.Options.HeadroomRatio = o.headroomRatio
	builder.Options.MinSize = int64(o.minBaseSize)
	builder.Options.MaxTotalBytes = int64(o.imageMaxBytes)
	builder.Options.MaxFileSize = int64(o.imageMaxFile)
	builder.Options.MaxFiles = o.imageMaxFiles
	if o.imageMaxBytes <= 0 || o.imageMaxFile <= 0 || o.imageMaxFiles <= 0 {
		fmt.Fprintln(stderr, "boxlite-csi: --image-max-bytes, --image-max-file-size and --image-max-files must be positive")
		return 2
	}
	if o.maxBuilds <= 0 {
		fmt.Fprintln(stderr, "boxlite-csi: --max-concurrent-builds must be positive")
		return 2
	}
	o.cfg.MaxConcurrentBuilds = o.maxBuilds

	d, err := driver.New(ctx, o.cfg, builder)
	if err != nil {
		fmt.Fprintf(stderr, "boxlite-csi: %v\n", err)
		return 1
	}
	if err := d.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "boxlite-csi: %v\n", err)
		return 1
	}
	return 0
}
