package driver

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

var rwo = mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)

func needQemu(t *testing.T) (img, io string) {
	t.Helper()
	return testenv.RequireTool(t, "qemu-img", "apt-get install qemu-utils"), testenv.RequireTool(t, "qemu-io", "apt-get install qemu-utils")
}

func qemu(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// checkPublished asserts what a pod would see at target: the box layout,
// box.json, a backing chain that resolves inside the target, and a base
// that cannot be written.
func checkPublished(t *testing.T, qemuImg, target string) {
	t.Helper()
	for _, p := range []string{"disks/guest-rootfs.qcow2", "base/rootfs.ext4", "sockets", "logs", "tmp", "box.json"} {
		if _, err := os.Stat(filepath.Join(target, p)); err != nil {
			t.Errorf("published box lacks %s: %v", p, err)
		}
	}
	var m boxManifest
	b, err := os.ReadFile(filepath.Join(target, "box.json"))
	if err != nil || json.Unmarshal(b, &m) != nil || m.Digest == "" || !strings.HasPrefix(m.Backing, "../base/") || m.VirtualSize == 0 || len(m.Entrypoint) == 0 {
		t.Errorf("box.json incomplete: %s (%v)", b, err)
	}
	out := qemu(t, qemuImg, "info", "--backing-chain", filepath.Join(target, "disks/guest-rootfs.qcow2"))
	if !strings.Contains(out, filepath.Join(target, "disks/../base/rootfs.ext4")) && !strings.Contains(out, "file format: raw") {
		t.Errorf("backing chain does not resolve inside %s:\n%s", target, out)
	}
	f, err := os.OpenFile(filepath.Join(target, "base/rootfs.ext4"), os.O_WRONLY, 0)
	if err == nil {
		f.Close()
		t.Error("the base is writable inside the published box")
	} else if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
		t.Errorf("opening the base for writing failed with %v, want EROFS", err)
	}
}

// TestLifecycleWithRestarts drives a volume the way kubelet does and
// restarts the plugin between every step: nothing may depend on memory.
func TestLifecycleWithRestarts(t *testing.T) {
	needRoot(t)
	qemuImg, qemuIO := needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	staging := filepath.Join(dir, "kubelet/plugins/staging")
	target := filepath.Join(dir, "kubelet/pods/p1/volumes/box")
	ctx := context.Background()

	p := startPlugin(t, dir, cfg)
	restart := func() {
		p.stop()
		p = startPlugin(t, dir, cfg)
	}
	vol, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: "pvc-1", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := vol.GetVolume().GetVolumeId()
	restart()

	stage := func() {
		t.Helper()
		if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
			VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo, VolumeContext: vol.GetVolume().GetVolumeContext(),
		}); err != nil {
			t.Fatal(err)
		}
	}
	publish := func() {
		t.Helper()
		if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
			VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo,
		}); err != nil {
			t.Fatal(err)
		}
	}
	unpublish := func() {
		t.Helper()
		if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	unstage := func() {
		t.Helper()
		if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}

	stage()
	restart()
	publish()
	restart()
	checkPublished(t, qemuImg, target)
	overlay := filepath.Join(target, "disks/guest-rootfs.qcow2")
	qemu(t, qemuIO, "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", overlay)
	restart()
	unpublish()
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("target %s still exists after unpublish: %v", target, err)
	}
	restart()
	unstage()
	restart()
	// Idempotent repeats, as kubelet retries them.
	unstage()
	unpublish()

	stage()
	restart()
	publish()
	qemu(t, qemuIO, "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", overlay)
	unpublish()
	unstage()
	restart()
	if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(cfg.Home, "boxes", id)); !os.IsNotExist(err) {
		t.Errorf("box still on disk after DeleteVolume: %v", err)
	}
	if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("second DeleteVolume: %v", err)
	}
}

func TestInlineEphemeralVolume(t *testing.T) {
	needRoot(t)
	qemuImg, _ := needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	// The in-process registry speaks plain HTTP, which inline volumes may
	// only ask for where the admin allows it.
	cfg.AllowInlineInsecure = true
	p := startPlugin(t, dir, cfg)
	ctx := context.Background()
	attrs := map[string]string{
		ephemeralKey:                       "true",
		"csi.storage.k8s.io/pod.name":      "p",
		"csi.storage.k8s.io/pod.namespace": "default",
	}
	for k, v := range params {
		attrs[k] = v
	}
	id := "csi-0123456789abcdef"
	target := filepath.Join(dir, "pods/p/volumes/box")
	if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: id, TargetPath: target, VolumeCapability: rwo, VolumeContext: attrs,
	}); err != nil {
		t.Fatal(err)
	}
	checkPublished(t, qemuImg, target)
	// Publishing again is a no-op.
	if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: id, TargetPath: target, VolumeCapability: rwo, VolumeContext: attrs,
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "home/boxes", id)); !os.IsNotExist(err) {
		t.Errorf("ephemeral box survived unpublish: %v", err)
	}
}

func TestRefusals(t *testing.T) {
	needRoot(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	ctx := context.Background()
	block := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	multi := mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)
	withParam := func(k, v string) map[string]string {
		m := map[string]string{}
		for a, b := range params {
			m[a] = b
		}
		m[k] = v
		return m
	}
	cases := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"block access", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{block}})
			return err
		}, codes.InvalidArgument, "block access type is not supported"},
		{"multi-node access", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{multi}})
			return err
		}, codes.InvalidArgument, "MULTI_NODE_MULTI_WRITER is not supported"},
		{"unknown parameter", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", Parameters: withParam("imgae", "x"), VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			return err
		}, codes.InvalidArgument, `unknown parameters ["imgae"]`},
		{"missing image", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", Parameters: map[string]string{}, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			return err
		}, codes.InvalidArgument, `"image" is required`},
		{"image not in registry", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "a", Parameters: withParam(ParamImage, strings.Replace(params[ParamImage], "busybox:1", "nope:1", 1)), VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			return err
		}, codes.NotFound, "nope"},
		{"same name, other capacity", func() error {
			req := &csi.CreateVolumeRequest{Name: "dup", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}}
			if _, err := p.controller().CreateVolume(ctx, req); err != nil {
				return err
			}
			req.CapacityRange = &csi.CapacityRange{RequiredBytes: 5 << 30}
			_, err := p.controller().CreateVolume(ctx, req)
			return err
		}, codes.AlreadyExists, "different parameters or capacity"},
		{"capacity over free space", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "huge", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 50}})
			return err
		}, codes.ResourceExhausted, "exceeds"},
		{"capacity no disk can have", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "huger", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1<<63 - 1}})
			return err
		}, codes.OutOfRange, "largest disk"},
		{"escaping volume ID", func() error {
			_, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "../../etc", StagingTargetPath: filepath.Join(dir, "s"), VolumeCapability: rwo})
			return err
		}, codes.InvalidArgument, `"../../etc"`},
		{"relative staging path", func() error {
			_, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "x", StagingTargetPath: "a/../b", VolumeCapability: rwo})
			return err
		}, codes.InvalidArgument, "absolute, clean"},
		{"unknown volume is not found at stage", func() error {
			_, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "bx-nope", StagingTargetPath: filepath.Join(dir, "s"), VolumeCapability: rwo})
			return err
		}, codes.NotFound, "does not exist"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %s mentioning %q", err, tc.code, tc.msg)
			}
		})
	}
	// Unpublish and unstage of unknown volumes are fine, never NotFound.
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "bx-nope", TargetPath: filepath.Join(dir, "t")}); err != nil {
		t.Errorf("unpublish of an unknown volume: %v", err)
	}
	if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "bx-nope", StagingTargetPath: filepath.Join(dir, "s")}); err != nil {
		t.Errorf("unstage of an unknown volume: %v", err)
	}
}
