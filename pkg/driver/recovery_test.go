package driver

import (
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
)

// TestBusyVolumeAbortsAndBuildOutlivesCaller holds a base build open (the
// registry stalls the layer download) and checks that a second operation
// on the same volume answers Aborted at once, that a caller who gives up
// leaves the build running, and that the build then serves both volumes.
func TestBusyVolumeAbortsAndBuildOutlivesCaller(t *testing.T) {
	needRoot(t)
	img := testimage.Busybox(t)
	layers, _ := img.Layers()
	layer, _ := layers[0].Digest()
	fetching := make(chan struct{}, 1)
	release := make(chan struct{})
	reg := testregistry.NewInProcess(t, testregistry.WithMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+layer.String()) {
				select {
				case fetching <- struct{}{}:
				default:
				}
				<-release
			}
			next.ServeHTTP(w, r)
		})
	}))
	reg.Push(t, "bb:1", img)
	params := map[string]string{ParamImage: reg.Ref("bb:1"), ParamPlainHTTP: "true"}
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	ctx := context.Background()

	var ids []string
	for _, name := range []string{"a", "b"} {
		v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, v.GetVolume().GetVolumeId())
	}
	stage := func(ctx context.Context, id string) error {
		_, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s", id), VolumeCapability: rwo})
		return err
	}
	first := make(chan error, 1)
	go func() { first <- stage(ctx, ids[0]) }()
	select {
	case <-fetching:
	case <-time.After(30 * time.Second):
		t.Fatal("the build never fetched its layer")
	}

	if err := stage(ctx, ids[0]); status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "in progress") {
		t.Fatalf("second stage of a busy volume: %v, want Aborted", err)
	}
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err := stage(short, ids[1])
	cancel()
	if c := status.Code(err); c != codes.Aborted && c != codes.DeadlineExceeded {
		t.Fatalf("stage that gave up: %v, want Aborted or DeadlineExceeded", err)
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatalf("first stage: %v", err)
	}
	// The retry joins the finished build rather than starting another.
	if err := stage(ctx, ids[1]); err != nil {
		t.Fatalf("retried stage: %v", err)
	}
	if n := reg.BlobGETs(layer); n != 1 {
		t.Errorf("layer fetched %d times, want 1", n)
	}
	for _, id := range ids {
		if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s", id)}); err != nil {
			t.Error(err)
		}
	}
}

// TestRestageAfterReboot removes every mount behind the plugin's back, as
// a node reboot does, and checks kubelet's re-calls bring the same box
// back with its data.
func TestRestageAfterReboot(t *testing.T) {
	needRoot(t)
	qemuImg, qemuIO := needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	p := startPlugin(t, dir, cfg)
	ctx := context.Background()
	v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "r", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
	if err != nil {
		t.Fatal(err)
	}
	id := v.GetVolume().GetVolumeId()
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")
	up := func() {
		t.Helper()
		if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
			t.Fatal(err)
		}
		if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo}); err != nil {
			t.Fatal(err)
		}
	}
	up()
	qemu(t, qemuIO, "-f", "qcow2", "-c", "write -P 0x3c 0 64k", filepath.Join(target, "disks/guest-rootfs.qcow2"))

	p.stop()
	box, _ := p.d.home.Box(id)
	for _, m := range []string{target, staging, box.BaseDir(), box.ManifestPath()} {
		if err := syscallUnmount(m); err != nil {
			t.Fatalf("simulated reboot: unmount %s: %v", m, err)
		}
	}
	p = startPlugin(t, dir, cfg)
	up()
	checkPublished(t, qemuImg, target)
	qemu(t, qemuIO, "-f", "qcow2", "-c", "read -P 0x3c 0 64k", filepath.Join(target, "disks/guest-rootfs.qcow2"))
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}
