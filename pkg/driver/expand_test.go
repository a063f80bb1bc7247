package driver

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const gib = 1 << 30

// volumeSteps are the kubelet calls on one volume of a running plugin.
type volumeSteps struct {
	t               *testing.T
	p               *plugin
	id              string
	staging, target string
}

func newVolume(t *testing.T, p *plugin, name string, params map[string]string, size int64) *volumeSteps {
	t.Helper()
	vol, err := p.controller().CreateVolume(context.Background(), &csi.CreateVolumeRequest{
		Name: name, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size},
	})
	if err != nil {
		t.Fatal(err)
	}
	return &volumeSteps{t: t, p: p, id: vol.GetVolume().GetVolumeId(),
		staging: filepath.Join(p.dir, "kubelet/plugins/staging", name),
		target:  filepath.Join(p.dir, "kubelet/pods", name, "volumes/box")}
}

func (v *volumeSteps) stage() {
	v.t.Helper()
	if _, err := v.p.node().NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{
		VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: rwo,
	}); err != nil {
		v.t.Fatal(err)
	}
}

func (v *volumeSteps) publish() {
	v.t.Helper()
	if _, err := v.p.node().NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{
		VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: rwo,
	}); err != nil {
		v.t.Fatal(err)
	}
}

func (v *volumeSteps) unpublishUnstage() {
	v.t.Helper()
	ctx := context.Background()
	if _, err := v.p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		v.t.Fatal(err)
	}
	if _, err := v.p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		v.t.Fatal(err)
	}
}

func (v *volumeSteps) expand(size int64) (*csi.NodeExpandVolumeResponse, error) {
	return v.p.node().NodeExpandVolume(context.Background(), &csi.NodeExpandVolumeRequest{
		VolumeId: v.id, VolumePath: v.target, StagingTargetPath: v.staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size},
	})
}

// manifest reads box.json as the pod sees it.
func (v *volumeSteps) manifest() boxManifest {
	v.t.Helper()
	var m boxManifest
	b, err := os.ReadFile(filepath.Join(v.target, "box.json"))
	if err != nil || json.Unmarshal(b, &m) != nil {
		v.t.Fatalf("box.json at %s: %v\n%s", v.target, err, b)
	}
	return m
}

// holdOverlay opens the published overlay read-only, through the pod's
// view, in a separate process, as a VM in the pod does, and keeps it open
// until the returned function is called. Read-only is the least a VM can
// hold; a writer is refused the same way (rootfs's TestExpandBox).
func holdOverlay(t *testing.T, overlay string) func() {
	t.Helper()
	cmd := exec.Command("sh", "-c", `exec 3<"$1" && echo open && read x`, "sh", overlay)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(stdout, buf); err != nil || string(buf) != "open\n" {
		t.Fatalf("the holder could not open %s: %q %v", overlay, buf, err)
	}
	return func() { stdin.Close(); cmd.Wait() }
}

// TestNodeExpandVolume: the disk grows in place, the filesystem the box
// was made with stays as it is for the guest to grow, a VM holding the
// overlay open gets FailedPrecondition and the growth at the next stage,
// and shrinking is refused.
func TestNodeExpandVolume(t *testing.T) {
	needRoot(t)
	qemuImg, qemuIO := needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	v := newVolume(t, p, "pvc-expand", params, 1*gib)
	v.stage()
	v.publish()
	m := v.manifest()
	if m.VirtualSize != 1*gib || m.FilesystemSize < 1*gib/100*95 || m.FilesystemSize > 1*gib {
		t.Fatalf("box.json: disk %d, filesystem %d; want a 1 GiB disk with a filesystem of nearly that", m.VirtualSize, m.FilesystemSize)
	}
	overlay := filepath.Join(v.target, "disks/guest-rootfs.qcow2")
	qemu(t, qemuIO, "-f", "qcow2", "-c", "write -P 0x5a 900M 64k", overlay)

	// A VM has the overlay open: nothing is rewritten under it.
	release := holdOverlay(t, overlay)
	_, err := v.expand(2 * gib)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "guest-rootfs.qcow2") || !strings.Contains(err.Error(), "next NodeStage") {
		release()
		t.Fatalf("expand under a VM: %v, want FailedPrecondition naming the overlay and when it happens", err)
	}
	release()
	if got := v.manifest().VirtualSize; got != 1*gib {
		t.Errorf("box.json says %d bytes after a refused expansion", got)
	}
	// The recorded size is applied by the next stage, as kubelet's next
	// mount does, before its NodeExpandVolume retry.
	v.unpublishUnstage()
	v.stage()
	v.publish()
	if m := v.manifest(); m.VirtualSize != 2*gib || m.ExpandedBytes != 2*gib {
		t.Errorf("after the next stage box.json says disk %d, expanded %d; want 2 GiB", m.VirtualSize, m.ExpandedBytes)
	}

	// Nothing holds it: it grows at once, and again idempotently.
	for i := 0; i < 2; i++ {
		rsp, err := v.expand(3 * gib)
		if err != nil || rsp.GetCapacityBytes() != 3*gib {
			t.Fatalf("expand to 3 GiB (call %d): %v, %v", i+1, rsp, err)
		}
	}
	m = v.manifest()
	if m.VirtualSize != 3*gib || m.FilesystemSize >= m.VirtualSize || m.FilesystemSize < 1*gib/100*95 || m.Capacity != 1*gib {
		t.Errorf("box.json after expansion: disk %d, filesystem %d, capacity %d; want 3 GiB over the 1 GiB filesystem it was made with, created at 1 GiB",
			m.VirtualSize, m.FilesystemSize, m.Capacity)
	}
	if out := qemu(t, qemuImg, "info", "--output=json", overlay); !strings.Contains(out, `"virtual-size": 3221225472`) {
		t.Errorf("qemu-img info after expansion:\n%s", out)
	}
	qemu(t, qemuImg, "check", overlay)
	qemu(t, qemuIO, "-f", "qcow2", "-c", "read -P 0x5a 900M 64k", "-c", "read -P 0 2G 64k", overlay)
	stats, err := p.node().NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
	if err != nil || stats.GetUsage()[0].GetTotal() != 3*gib {
		t.Errorf("volume stats after expansion: %v, %v", stats, err)
	}

	// Shrinking is refused, and so is a limit the disk, a multiple of 512,
	// would pass.
	for _, tc := range []struct {
		cr  *csi.CapacityRange
		msg string
	}{
		{&csi.CapacityRange{RequiredBytes: 2 * gib}, "shrinking is refused"},
		{&csi.CapacityRange{RequiredBytes: 3*gib + 1, LimitBytes: 3*gib + 1}, "above the limit"},
	} {
		_, err := p.node().NodeExpandVolume(context.Background(), &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target, CapacityRange: tc.cr})
		if status.Code(err) != codes.OutOfRange || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("expand to %v: %v, want OutOfRange saying %q", tc.cr, err, tc.msg)
		}
	}
	if got := v.manifest().VirtualSize; got != 3*gib {
		t.Errorf("a refused shrink changed the disk to %d", got)
	}
	v.unpublishUnstage()
}

// TestNodeExpandUnstagedVolume: a volume that has no disk yet records the
// size, and its first stage makes the disk that size, filesystem included.
func TestNodeExpandUnstagedVolume(t *testing.T) {
	needRoot(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	v := newVolume(t, p, "pvc-unstaged", params, 1*gib)
	if err := os.MkdirAll(v.target, 0o750); err != nil {
		t.Fatal(err)
	}
	if rsp, err := v.expand(2 * gib); err != nil || rsp.GetCapacityBytes() != 2*gib {
		t.Fatalf("expand an unstaged volume: %v, %v", rsp, err)
	}
	os.Remove(v.target)
	v.stage()
	v.publish()
	if m := v.manifest(); m.VirtualSize != 2*gib || m.FilesystemSize < 2*gib/100*95 {
		t.Errorf("first stage after expansion: disk %d, filesystem %d; want both about 2 GiB", m.VirtualSize, m.FilesystemSize)
	}
	v.unpublishUnstage()
}

// TestCapacityAccounting: at --overprovision-ratio=1 the claims on a node
// never promise more than its free space, so a guest filling its whole
// disk cannot make another box's write fail; a higher ratio lets claims
// promise more, as a thin pool would.
func TestCapacityAccounting(t *testing.T) {
	needRoot(t)
	_, qemuIO := needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	// A small home of its own, so the test owns every byte of free space;
	// outside dir, whose mounts startPlugin checks are gone before this
	// one is unmounted.
	cfg.Home = filepath.Join(t.TempDir(), "home")
	if err := os.MkdirAll(cfg.Home, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", cfg.Home).CombinedOutput(); err != nil {
		t.Fatalf("mount a 1 GiB tmpfs home: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", cfg.Home).Run() })
	p := startPlugin(t, dir, cfg)
	ctx := context.Background()
	capacity := func() int64 {
		t.Helper()
		rsp, err := p.controller().GetCapacity(ctx, &csi.GetCapacityRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return rsp.GetAvailableCapacity()
	}
	const mib = 1 << 20
	if c := capacity(); c < 900*mib || c > 1024*mib {
		t.Fatalf("GetCapacity on an empty 1 GiB home: %d bytes", c)
	}
	a := newVolume(t, p, "pvc-a", params, 400*mib)
	b := newVolume(t, p, "pvc-b", params, 400*mib)
	if c := capacity(); c > 230*mib || c < 100*mib {
		t.Errorf("GetCapacity with two 400 MiB claims on 1 GiB: %d bytes, want the rest (about 200 MiB)", c)
	}
	create := func(name string) error {
		_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: name, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 400 * mib},
		})
		return err
	}
	if err := create("pvc-c"); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--overprovision-ratio=1") {
		t.Fatalf("a third 400 MiB claim on 1 GiB: %v, want ResourceExhausted explaining the ratio", err)
	}
	// An expansion is a claim too.
	a.stage()
	a.publish()
	if _, err := a.expand(700 * mib); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("expanding a claim past the node's space: %v, want ResourceExhausted", err)
	}

	// Both guests fill their whole disks: neither runs out of space.
	b.stage()
	b.publish()
	for _, v := range []*volumeSteps{a, b} {
		qemu(t, qemuIO, "-f", "qcow2", "-c", "write -P 0xa5 0 400M", filepath.Join(v.target, "disks/guest-rootfs.qcow2"))
	}
	if c := capacity(); c > 230*mib {
		t.Errorf("GetCapacity after both disks filled: %d bytes, more than was left", c)
	}
	if err := create("pvc-c"); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a third claim after the disks filled: %v, want ResourceExhausted", err)
	}
	a.unpublishUnstage()
	b.unpublishUnstage()

	// At a ratio of 2 the same claim is accepted: the operator chose to
	// overcommit.
	p.stop()
	cfg.OverprovisionRatio = 2
	p = startPlugin(t, dir, cfg)
	if err := create("pvc-c"); err != nil {
		t.Errorf("a third claim at --overprovision-ratio=2: %v", err)
	}
}

// TestNodeExpandEdges: sizes that are not a multiple of 512 retry cleanly,
// a growth the overlay cannot take records nothing and reserves nothing,
// and box.json of a disk of the base's size keeps its filesystem size.
func TestNodeExpandEdges(t *testing.T) {
	needRoot(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.OverprovisionRatio = 1e6 // room for the 5 TiB below
	p := startPlugin(t, dir, cfg)
	v := newVolume(t, p, "pvc-edges", params, 0)
	v.stage()
	v.publish()
	base := v.manifest()
	if base.FilesystemSize == 0 || base.FilesystemSize != base.VirtualSize {
		t.Fatalf("box.json of a disk of the base's size: disk %d, filesystem %d", base.VirtualSize, base.FilesystemSize)
	}

	// Not a multiple of 512: the disk is rounded up, and the same call
	// again is the same answer, not a shrink.
	for i := 0; i < 2; i++ {
		rsp, err := v.expand(1*gib + 1)
		if err != nil || rsp.GetCapacityBytes() != 1*gib+512 {
			t.Fatalf("expand to 1 GiB + 1 (call %d): %v, %v; want a disk of 1 GiB + 512", i+1, rsp, err)
		}
	}
	m := v.manifest()
	if m.FilesystemSize != base.FilesystemSize || m.VirtualSize != 1*gib+512 {
		t.Errorf("box.json after expanding a disk of the base's size: disk %d, filesystem %d; want 1 GiB + 512 over the base's %d",
			m.VirtualSize, m.FilesystemSize, base.FilesystemSize)
	}

	// Past what the overlay's L1 table maps in place: refused, and neither
	// recorded nor reserved.
	capacity := func() int64 {
		rsp, err := p.controller().GetCapacity(context.Background(), &csi.GetCapacityRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return rsp.GetAvailableCapacity()
	}
	before := capacity()
	if _, err := v.expand(5 << 40); status.Code(err) != codes.OutOfRange {
		t.Errorf("expand to 5 TiB: %v, want OutOfRange", err)
	}
	r, err := p.d.readRecordOnly(v.id)
	if err != nil {
		t.Fatal(err)
	}
	if r.ExpandedBytes != 1*gib+1 {
		t.Errorf("a refused expansion was recorded: %d bytes", r.ExpandedBytes)
	}
	if after := capacity(); after < before-64<<20 {
		t.Errorf("a refused expansion reserved space: GetCapacity %d, was %d", after, before)
	}
	// A size no disk can have is refused before anything is looked at.
	if _, err := v.expand(1<<63 - 1); status.Code(err) != codes.OutOfRange {
		t.Errorf("expand to 8 EiB: %v, want OutOfRange", err)
	}
	v.unpublishUnstage()
}
