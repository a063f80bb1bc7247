package driver

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// TestRecordIgnoresBoxJSON plays a pod that rewrites its box.json: a
// digest of another tenant's image, "ephemeral": true, other parameters,
// and then a FIFO. The plugin's record is kept outside the box, so none of
// it changes what the plugin does, and nothing blocks.
func TestRecordIgnoresBoxJSON(t *testing.T) {
	needRoot(t)
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "mine:1", smallImage(t, "mine"))
	reg.Push(t, "theirs:1", smallImage(t, "theirs"))
	mine := map[string]string{ParamImage: reg.Ref("mine:1"), ParamPlainHTTP: "true"}
	theirs := map[string]string{ParamImage: reg.Ref("theirs:1"), ParamPlainHTTP: "true"}
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	ctx := testCtx(t)

	// Tenant A's image is in the cache.
	other, _ := createVolume(t, p, "theirs", theirs)
	if err := stageVolume(ctx, p, other, filepath.Join(dir, "staging-theirs")); err != nil {
		t.Fatal(err)
	}
	defer unstageVolume(t, p, other, filepath.Join(dir, "staging-theirs"))
	theirDigest := mustManifest(t, p.d, mustBox(t, p, other)).Digest

	id, box := createVolume(t, p, "mine", mine)
	want := mustManifest(t, p.d, box)
	staging := filepath.Join(dir, "staging")
	target := filepath.Join(dir, "pods/p1/mount")
	if err := stageVolume(ctx, p, id, staging); err != nil {
		t.Fatal(err)
	}
	publish := func() error {
		_, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo})
		return err
	}
	if err := publish(); err != nil {
		t.Fatal(err)
	}

	// The pod's view: box.json is a read-only mount point, so the pod can
	// neither write it nor replace it.
	forged := map[string]any{"version": 1, "volumeID": id, "ephemeral": true, "digest": theirDigest,
		"pinned": reg.Ref("theirs:1"), "image": reg.Ref("theirs:1"), "parameters": map[string]string{ParamImage: "oci:/etc"}}
	b, _ := json.Marshal(forged)
	if err := os.WriteFile(filepath.Join(target, "box.json"), b, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("the pod wrote its box.json: %v, want EROFS", err)
	}
	if err := os.WriteFile(filepath.Join(target, "forged.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(target, "forged.json"), filepath.Join(target, "box.json")); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("the pod replaced its box.json: %v, want EBUSY", err)
	}
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	unstageVolume(t, p, id, staging)

	// The box's own copy underneath, rewritten while no mount covers it
	// (as a pod of an earlier release could), and the overlay removed:
	// the plugin reads neither.
	if err := os.WriteFile(box.ManifestPath(), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(box.GuestRootfsDiskPath()); err != nil {
		t.Fatal(err)
	}
	if err := stageVolume(ctx, p, id, staging); err != nil {
		t.Fatalf("re-stage after box.json was rewritten: %v", err)
	}
	// The new overlay is over this volume's own base, not tenant A's.
	if got := mustManifest(t, p.d, box); got.Digest != want.Digest {
		t.Errorf("record digest changed to %s, want %s", got.Digest, want.Digest)
	}
	if b, err := os.ReadFile(box.ManifestPath()); err != nil || strings.Contains(string(b), theirDigest) || strings.Contains(string(b), `"ephemeral"`) {
		t.Errorf("box.json was not rewritten from the record at stage: %s (%v)", b, err)
	}
	if sameFile(t, box.BasePath(), mustBox(t, p, other).BasePath()) {
		t.Error("the box was given tenant A's base")
	}
	// A forged "ephemeral" must not make NodeUnpublish delete the claim.
	if err := publish(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(box.Root()); err != nil {
		t.Fatalf("NodeUnpublish deleted a persistent volume's box after its box.json said ephemeral: %v", err)
	}
	unstageVolume(t, p, id, staging)
	defer unstageVolume(t, p, id, staging)

	// A FIFO in place of the box's copy of box.json: every call still
	// answers.
	if err := os.Remove(box.ManifestPath()); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(box.ManifestPath(), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		short, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := p.node().NodeGetVolumeHealth(short, &csi.NodeGetVolumeHealthRequest{VolumeId: id}); err != nil {
			done <- err
			return
		}
		if err := stageVolume(short, p, id, staging); err != nil {
			done <- err
			return
		}
		_, err := p.node().NodeGetVolumeStats(short, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: staging})
		done <- err
	}()
	if err := <-done; err != nil {
		t.Fatalf("with a FIFO for box.json: %v", err)
	}
	if fi, err := os.Lstat(box.ManifestPath()); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("stage did not replace the FIFO with the manifest: %v %v", fi, err)
	}
}

// TestRecordCrashWindows makes the states a crash between the record and
// the box leaves, and checks that the CO's retry completes each call.
func TestRecordCrashWindows(t *testing.T) {
	needRoot(t)
	params := smallImageParams(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	ctx := testCtx(t)
	req := &csi.CreateVolumeRequest{Name: "v", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}}

	// Create stopped after the record: the retry creates the box.
	id, box := createVolume(t, p, "v", params)
	if err := os.RemoveAll(box.Root()); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s"), VolumeCapability: rwo}); err == nil {
		t.Error("NodeStage succeeded on a volume whose box does not exist yet")
	} else {
		wantStatus(t, "NodeStage without a box", err, codes.NotFound, id)
	}
	if _, err := p.controller().CreateVolume(ctx, req); err != nil {
		t.Fatalf("retried CreateVolume: %v", err)
	}
	if _, err := os.Stat(box.ManifestPath()); err != nil {
		t.Fatalf("retried CreateVolume did not create the box: %v", err)
	}

	// Delete stopped after the box went: the retry removes the record.
	if err := os.RemoveAll(box.Root()); err != nil {
		t.Fatal(err)
	}
	if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("retried DeleteVolume: %v", err)
	}
	if _, err := os.Stat(p.d.recordPath(id)); !os.IsNotExist(err) {
		t.Errorf("DeleteVolume left the record: %v", err)
	}
}

// TestRecordAdoption starts the plugin on a box made by the previous
// release (box.json only, no record) and on damaged ones: start-up adopts
// the first and still serves, leaving the others for the operator.
func TestRecordAdoption(t *testing.T) {
	needRoot(t)
	params := smallImageParams(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	p := startPlugin(t, dir, cfg)
	id, box := createVolume(t, p, "old", params)
	want := mustManifest(t, p.d, box)
	records := p.d.recordsDir()
	p.stop()

	// The previous release's layout: no records directory at all.
	if err := os.RemoveAll(records); err != nil {
		t.Fatal(err)
	}
	// A box whose box.json is a FIFO, and one whose box.json is garbage.
	for name, make := range map[string]func(string) error{
		"bx-fifo":    func(p string) error { return syscall.Mkfifo(p, 0o644) },
		"bx-garbage": func(p string) error { return os.WriteFile(p, []byte("{not json"), 0o644) },
	} {
		d := filepath.Join(cfg.Home, "boxes", name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := make(filepath.Join(d, "box.json")); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	p = startPlugin(t, dir, cfg)
	t.Logf("start-up with one box to adopt and two damaged ones: %v", time.Since(start))
	got := mustManifest(t, p.d, box)
	if got.Digest != want.Digest || got.Name != "old" || got.Capacity != want.Capacity {
		t.Errorf("adopted record %+v, want %+v", got, want)
	}
	staging := filepath.Join(dir, "staging")
	if err := stageVolume(testCtx(t), p, id, staging); err != nil {
		t.Fatalf("stage an adopted box: %v", err)
	}
	unstageVolume(t, p, id, staging)
	for _, name := range []string{"bx-fifo", "bx-garbage"} {
		if _, err := os.Stat(filepath.Join(cfg.Home, "boxes", name)); err != nil {
			t.Errorf("start-up removed the damaged box %s: %v", name, err)
		}
	}
}

// TestRecordFromNewerRelease: a record this release does not understand
// is refused with a clear error, and left as it is.
func TestRecordFromNewerRelease(t *testing.T) {
	_, err := parseRecord([]byte(`{"version": 2, "volumeID": "bx-1"}`), "bx-1", "/h/volumes/bx-1.json")
	if err == nil || !strings.Contains(err.Error(), "newer than this release understands") {
		t.Errorf("parseRecord of version 2 = %v", err)
	}
	if _, err := parseRecord([]byte(`{"version": 1, "volumeID": "bx-2"}`), "bx-1", "/h/volumes/bx-1.json"); err == nil {
		t.Error("parseRecord accepted another volume's record")
	}
	if _, err := parseRecord([]byte(`{"volumeID": "bx-1"}`), "bx-1", "/h/volumes/bx-1.json"); err == nil {
		t.Error("parseRecord accepted a record with no version")
	}
}

func mustBox(t *testing.T, p *plugin, id string) layout.Box {
	t.Helper()
	b, err := p.d.home.Box(id)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}
