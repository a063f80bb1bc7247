package driver

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/pkg/metrics"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// scrape fetches /metrics over HTTP, as Prometheus would, and parses it.
func scrape(t *testing.T, p *plugin) map[string]*dto.MetricFamily {
	t.Helper()
	var addr string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if a := p.d.MetricsAddr(); a != nil {
			addr = a.String()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("metrics never served")
		}
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// value returns the sample of family name whose labels include want, as a
// counter or gauge value, or a histogram's count. Missing is -1.
func value(fams map[string]*dto.MetricFamily, name string, want ...string) float64 {
	f, ok := fams[name]
	if !ok {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(want); i += 2 {
			if have[want[i]] != want[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// TestMetricsEndpoint drives two volumes of one image through their lives
// and checks what /metrics says at each point against what happened: one
// build and one pull for two boxes, the exact bytes the registry served,
// RPC counts by code, and box and cache state read from disk.
func TestMetricsEndpoint(t *testing.T) {
	needRoot(t)
	reg := newCountingImage(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.MetricsAddress = "127.0.0.1:0"
	cfg.Metrics = metrics.New()
	p := startPluginWith(t, dir, cfg, &rootfs.Ext4Builder{Observer: cfg.Metrics})
	ctx := context.Background()

	type vol struct{ id, staging, target string }
	var vols []vol
	for i := range 2 {
		v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: fmt.Sprintf("pvc-%d", i), Parameters: reg.params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		})
		if err != nil {
			t.Fatal(err)
		}
		vv := vol{id: v.GetVolume().GetVolumeId(), staging: filepath.Join(dir, fmt.Sprintf("staging/%d", i)), target: filepath.Join(dir, fmt.Sprintf("target/%d", i))}
		if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
			VolumeId: vv.id, StagingTargetPath: vv.staging, VolumeCapability: rwo, VolumeContext: v.GetVolume().GetVolumeContext(),
		}); err != nil {
			t.Fatal(err)
		}
		vols = append(vols, vv)
	}
	if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: vols[0].id, StagingTargetPath: vols[0].staging, TargetPath: vols[0].target, VolumeCapability: rwo,
	}); err != nil {
		t.Fatal(err)
	}
	// An RPC that fails, to see its code counted.
	if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "bx-missing", StagingTargetPath: vols[0].staging, VolumeCapability: rwo}); err == nil {
		t.Fatal("staging an unknown volume succeeded")
	}

	f := scrape(t, p)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"boxlite_csi_rpc_requests_total", []string{"method", "/csi.v1.Controller/CreateVolume", "code", "OK"}, 2},
		{"boxlite_csi_rpc_requests_total", []string{"method", "/csi.v1.Node/NodeStageVolume", "code", "OK"}, 2},
		{"boxlite_csi_rpc_requests_total", []string{"method", "/csi.v1.Node/NodeStageVolume", "code", "NotFound"}, 1},
		{"boxlite_csi_rpc_duration_seconds", []string{"method", "/csi.v1.Node/NodePublishVolume", "code", "OK"}, 1},
		// Two boxes on one image: one build, one pull.
		{"boxlite_csi_base_build_duration_seconds", []string{"result", "success"}, 1},
		{"boxlite_csi_image_pull_duration_seconds", []string{"result", "success"}, 1},
		{"boxlite_csi_image_pulled_bytes_total", nil, float64(reg.layerBytes)},
		{"boxlite_csi_overlay_create_duration_seconds", []string{"outcome", "created"}, 2},
		{"boxlite_csi_cache_bases", []string{"state", "in_use"}, 1},
		{"boxlite_csi_cache_bases", []string{"state", "unused"}, 0},
		{"boxlite_csi_boxes", []string{"state", "mounted"}, 2},
		{"boxlite_csi_boxes", []string{"state", "ready"}, 0},
		{"boxlite_csi_state_scrape_errors", nil, 0},
	}
	for _, c := range checks {
		if got := value(f, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if got := value(f, "boxlite_csi_cache_bytes"); got <= 0 {
		t.Errorf("boxlite_csi_cache_bytes = %v, want the base's allocated size", got)
	}
	if got := reg.layerGets(); got != reg.layers {
		t.Errorf("registry served %d layer blobs, want %d (one pull)", got, reg.layers)
	}

	// Tear everything down; the state metrics must follow the disk.
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vols[0].id, TargetPath: vols[0].target}); err != nil {
		t.Fatal(err)
	}
	for _, v := range vols {
		if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
			t.Fatal(err)
		}
	}
	f = scrape(t, p)
	if got := value(f, "boxlite_csi_boxes", "state", "ready"); got != 2 {
		t.Errorf("after unstage: boxes{ready} = %v, want 2", got)
	}
	for _, v := range vols {
		if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			t.Fatal(err)
		}
	}
	f = scrape(t, p)
	for _, s := range boxStates {
		if got := value(f, "boxlite_csi_boxes", "state", s); got != 0 {
			t.Errorf("after delete: boxes{%s} = %v, want 0", s, got)
		}
	}
	if in, un := value(f, "boxlite_csi_cache_bases", "state", "in_use"), value(f, "boxlite_csi_cache_bases", "state", "unused"); in != 0 || un != 1 {
		t.Errorf("after delete: cache_bases in_use=%v unused=%v, want 0 and 1 (evictable, not yet evicted)", in, un)
	}
}

// countingImage is the busybox test image in a registry that counts layer
// blob downloads.
type countingImage struct {
	params     map[string]string
	layers     int
	layerBytes int64
	layerGets  func() int
}

func newCountingImage(t *testing.T) countingImage {
	t.Helper()
	img := testimage.Busybox(t)
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	c := countingImage{layers: len(ls)}
	var digests []v1.Hash
	for _, l := range ls {
		n, err := l.Size()
		if err != nil {
			t.Fatal(err)
		}
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		c.layerBytes += n
		digests = append(digests, d)
	}
	params, reg := testImage(t)
	c.params = params
	c.layerGets = func() int {
		n := 0
		for _, d := range digests {
			n += reg.BlobGETs(d)
		}
		return n
	}
	if !strings.Contains(params[ParamImage], "busybox") {
		t.Fatalf("unexpected test image %q", params[ParamImage])
	}
	return c
}
