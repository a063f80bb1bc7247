// Package metrics holds boxlite-csi's Prometheus metrics. Each plugin owns
// one Metrics with its own registry, so tests can run many drivers in one
// process and read each one's values; nothing is registered globally.
//
// Event metrics (RPCs, pulls, builds, overlays, evictions) are recorded as
// they happen. State metrics (cache contents, boxes) are read from disk at
// scrape time by collectors the driver registers, so they can never drift
// from what is actually on the node.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"
)

// Namespace prefixes every metric name.
const Namespace = "boxlite_csi"

// Result label values for pulls and builds.
const (
	ResultSuccess = "success"
	ResultError   = "error"
)

// durationBuckets span a warm RPC (about a millisecond) to a cold build of
// a large image (minutes).
var durationBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

// Metrics is one plugin's metric set.
type Metrics struct {
	reg *prometheus.Registry

	rpcs        *prometheus.CounterVec
	rpcDuration *prometheus.HistogramVec

	pullDuration  *prometheus.HistogramVec
	pulledBytes   prometheus.Counter
	buildDuration *prometheus.HistogramVec

	overlayDuration *prometheus.HistogramVec

	snapshotDuration prometheus.Histogram

	evictions    prometheus.Counter
	evictedBytes prometheus.Counter
}

// New creates a metric set with its own registry, including the Go runtime
// and process collectors.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		rpcs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "rpc_requests_total",
			Help: "CSI RPCs served, by full method name and gRPC result code.",
		}, []string{"method", "code"}),
		rpcDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "rpc_duration_seconds",
			Help:    "Time to serve a CSI RPC, by full method name and gRPC result code.",
			Buckets: durationBuckets,
		}, []string{"method", "code"}),
		pullDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "image_pull_duration_seconds",
			Help:    "Time to fetch and verify all of an image's layers during a base build (pulling overlaps building).",
			Buckets: durationBuckets,
		}, []string{"result"}),
		pulledBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "image_pulled_bytes_total",
			Help: "Compressed layer bytes received from image sources.",
		}),
		buildDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "base_build_duration_seconds",
			Help:    "Time to build and install one base disk, pull included.",
			Buckets: durationBuckets,
		}, []string{"result"}),
		overlayDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "overlay_create_duration_seconds",
			Help:    "Time to write a box's guest-rootfs overlay durably, by outcome (created or recreated).",
			Buckets: durationBuckets,
		}, []string{"outcome"}),
		snapshotDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "snapshot_create_duration_seconds",
			Help:    "Time to make a snapshot or capture a clone's source: freezing the overlay into a layer and linking the chain.",
			Buckets: durationBuckets,
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "cache_evictions_total",
			Help: "Base disks removed from the node cache by eviction.",
		}),
		evictedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "cache_evicted_bytes_total",
			Help: "Disk space released by evicting base disks.",
		}),
	}
	m.reg.MustRegister(m.rpcs, m.rpcDuration, m.pullDuration, m.pulledBytes, m.buildDuration,
		m.overlayDuration, m.snapshotDuration, m.evictions, m.evictedBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Register adds a collector, such as one that reads state from disk at
// scrape time.
func (m *Metrics) Register(c prometheus.Collector) error { return m.reg.Register(c) }

// Gatherer gives tests and handlers the registry's current values.
func (m *Metrics) Gatherer() prometheus.Gatherer { return m.reg }

// ObserveRPC records one served RPC.
func (m *Metrics) ObserveRPC(method, code string, d time.Duration) {
	m.rpcs.WithLabelValues(method, code).Inc()
	m.rpcDuration.WithLabelValues(method, code).Observe(d.Seconds())
}

// ObservePull records the layer fetches of one build.
func (m *Metrics) ObservePull(bytes int64, d time.Duration, err error) {
	m.pulledBytes.Add(float64(bytes))
	m.pullDuration.WithLabelValues(result(err)).Observe(d.Seconds())
}

// ObserveBuild records one base build.
func (m *Metrics) ObserveBuild(d time.Duration, err error) {
	m.buildDuration.WithLabelValues(result(err)).Observe(d.Seconds())
}

// ObserveOverlay records one overlay written.
func (m *Metrics) ObserveOverlay(outcome string, d time.Duration) {
	m.overlayDuration.WithLabelValues(outcome).Observe(d.Seconds())
}

// ObserveSnapshot records one snapshot made.
func (m *Metrics) ObserveSnapshot(d time.Duration) { m.snapshotDuration.Observe(d.Seconds()) }

// ObserveEviction records one evicted base.
func (m *Metrics) ObserveEviction(bytes int64) {
	m.evictions.Inc()
	m.evictedBytes.Add(float64(bytes))
}

func result(err error) string {
	if err != nil {
		return ResultError
	}
	return ResultSuccess
}

// Serve exposes /metrics on addr until ctx ends and returns the address
// it listens on (addr may ask for port 0). The listener is opened before
// Serve returns, so a bad address fails start-up rather than vanishing
// into a log line; the returned channel reports the server's end.
func (m *Metrics) Serve(ctx context.Context, addr string) (net.Addr, <-chan error, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      errorLogger{klog.FromContext(ctx)},
		ErrorHandling: promhttp.ContinueOnError,
	}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(l)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	klog.FromContext(ctx).Info("Serving metrics", "address", l.Addr().String())
	return l.Addr(), done, nil
}

// errorLogger routes promhttp's collection errors to klog.
type errorLogger struct{ log klog.Logger }

func (e errorLogger) Println(v ...any) {
	e.log.Error(nil, "Metrics collection", "error", fmt.Sprint(v...))
}
