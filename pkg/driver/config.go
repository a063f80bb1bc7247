package driver

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/boxlite-csi/boxlite-csi/pkg/metrics"
)

// Config is everything the driver is told at start-up.
type Config struct {
	// DriverName is the CSI driver name; its topology key is
	// <DriverName>/node.
	DriverName string
	// Version is reported by GetPluginInfo.
	Version string
	// NodeID names this node in NodeGetInfo and in topology.
	NodeID string
	// Endpoint is the CSI socket, unix:///path or tcp://host:port.
	Endpoint string
	// Home is the node cache and box directory.
	Home string
	// MaxVolumesPerNode is reported by NodeGetInfo; 0 means no limit.
	MaxVolumesPerNode int64
	// CapacityReserve is kept out of GetCapacity and of the space a new
	// volume may claim, so the node cache can still grow.
	CapacityReserve int64
	// MaxVolumeSize caps a volume's virtual size; 0 means no cap.
	MaxVolumeSize int64
	// OverprovisionRatio is how many times the home filesystem's free
	// space (after CapacityReserve) the volumes' claims may promise beyond
	// what their overlays have allocated. 1, the default, promises no
	// more than there is: a guest that fills its whole disk never makes
	// another box's write fail. 0 means 1.
	OverprovisionRatio float64
	// KubeletRegistrationPath, when set, makes the plugin register itself
	// with kubelet: it is the CSI socket's path on the host, which kubelet
	// dials. The registration socket goes into RegistrationDir.
	KubeletRegistrationPath string
	// RegistrationDir is kubelet's plugins_registry directory as this
	// process sees it.
	RegistrationDir string

	// Cache watermarks and limits; see rootfs.CacheConfig.
	CacheHighWatermark float64
	CacheLowWatermark  float64
	CacheMaxBytes      int64
	CacheGrace         time.Duration
	EvictionInterval   time.Duration
	// BuildTimeout bounds one base build.
	BuildTimeout time.Duration
	// MaxConcurrentBuilds caps the base builds running at once; the others
	// wait within their BuildTimeout. 0 means rootfs's default.
	MaxConcurrentBuilds int
	// RegistryRetry is the retry schedule for transient registry failures;
	// nil keeps go-containerregistry's (three tries, 1 s and 3 s apart).
	// Tests of registry faults shorten it.
	RegistryRetry *remote.Backoff

	// LocalImageRoot, when set, lets inline ephemeral volumes name local
	// image sources (oci:, oci-archive:, docker-archive:) below this
	// directory, and nowhere else. Empty refuses them: an inline volume's
	// attributes are written by any pod author, and a host path there
	// would have the privileged plugin open it. StorageClass parameters
	// are the admin's and may name local sources anywhere.
	LocalImageRoot string
	// AllowInlineInsecure lets inline ephemeral volumes set plainHTTP and
	// insecureSkipTLSVerify. Off by default, for the same reason.
	AllowInlineInsecure bool
	// InlineNodeCredentials lets inline ephemeral volumes pull with the
	// node's docker config. Off by default: an inline volume brings its own
	// pull secret (nodePublishSecretRef), so that one pod author cannot
	// use the node's access to another tenant's private images.
	InlineNodeCredentials bool

	// MetricsAddress, when set, serves Prometheus metrics at
	// http://<MetricsAddress>/metrics.
	MetricsAddress string
	// Metrics receives the driver's metrics; nil makes a fresh set. The
	// caller passes its own to wire in the builder's pull metrics too.
	Metrics *metrics.Metrics
}

// maxOverprovisionRatio bounds --overprovision-ratio, so that free space
// times the ratio stays far inside an int64 (and NaN is refused).
const maxOverprovisionRatio = 1e6

// TopologyKey is the node topology segment this driver reports.
func (c Config) TopologyKey() string { return c.DriverName + "/node" }

func (c Config) validate() error {
	var errs []error
	if c.DriverName == "" {
		errs = append(errs, errors.New("driver name is empty"))
	}
	if c.NodeID == "" {
		errs = append(errs, errors.New("node ID is empty"))
	}
	if c.Endpoint == "" {
		errs = append(errs, errors.New("endpoint is empty"))
	}
	if !filepath.IsAbs(c.Home) {
		errs = append(errs, fmt.Errorf("home %q must be an absolute path", c.Home))
	}
	if c.MaxVolumesPerNode < 0 || c.CapacityReserve < 0 || c.MaxVolumeSize < 0 || c.CacheMaxBytes < 0 {
		errs = append(errs, errors.New("limits must not be negative"))
	}
	if r := c.OverprovisionRatio; r != 0 && !(r >= 1 && r <= maxOverprovisionRatio) {
		errs = append(errs, fmt.Errorf("overprovision ratio %g must be between 1 and %g", r, float64(maxOverprovisionRatio)))
	}
	if c.LocalImageRoot != "" && (!filepath.IsAbs(c.LocalImageRoot) || filepath.Clean(c.LocalImageRoot) != c.LocalImageRoot) {
		errs = append(errs, fmt.Errorf("local image root %q must be an absolute, clean path", c.LocalImageRoot))
	}
	if c.KubeletRegistrationPath != "" {
		if !filepath.IsAbs(c.KubeletRegistrationPath) {
			errs = append(errs, fmt.Errorf("kubelet registration path %q must be absolute", c.KubeletRegistrationPath))
		}
		if !filepath.IsAbs(c.RegistrationDir) {
			errs = append(errs, fmt.Errorf("registration directory %q must be absolute", c.RegistrationDir))
		}
	}
	return errors.Join(errs...)
}
