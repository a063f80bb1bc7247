package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// guestWrite writes pattern (one byte repeated) over 64 KiB at off into
// the disk published at target, through the pod's view, as a guest does.
func guestWrite(t *testing.T, target string, off int64, pattern byte) {
	t.Helper()
	qemu(t, "qemu-io", "-f", "qcow2", "-c", qemuIOCmd("write", off, pattern), filepath.Join(target, "disks/guest-rootfs.qcow2"))
}

// guestReads reports whether the disk published at target reads pattern
// over 64 KiB at off, following its chain inside the pod's view.
func guestReads(t *testing.T, target string, off int64, pattern byte) bool {
	t.Helper()
	out := qemu(t, "qemu-io", "-r", "-f", "qcow2", "-c", qemuIOCmd("read", off, pattern), filepath.Join(target, "disks/guest-rootfs.qcow2"))
	return strings.Contains(out, "read 65536/65536") && !strings.Contains(out, "Pattern verification failed")
}

func qemuIOCmd(op string, off int64, pattern byte) string {
	return fmt.Sprintf("%s -P %d %d 64k", op, pattern, off)
}

func snapshot(t *testing.T, p *plugin, name, source string) *csi.Snapshot {
	t.Helper()
	resp, err := p.controller().CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: source})
	if err != nil {
		t.Fatalf("CreateSnapshot %s of %s: %v", name, source, err)
	}
	if !resp.GetSnapshot().GetReadyToUse() {
		t.Fatalf("snapshot %s is not ready to use", name)
	}
	return resp.GetSnapshot()
}

func restoreVolume(t *testing.T, p *plugin, name string, params map[string]string, size int64, src *csi.VolumeContentSource) *volumeSteps {
	t.Helper()
	resp, err := p.controller().CreateVolume(context.Background(), &csi.CreateVolumeRequest{
		Name: name, Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeContentSource: src,
	})
	if err != nil {
		t.Fatalf("CreateVolume %s from %v: %v", name, src, err)
	}
	if resp.GetVolume().GetContentSource() == nil {
		t.Errorf("CreateVolume %s: the answer has no content source", name)
	}
	return &volumeSteps{t: t, p: p, id: resp.GetVolume().GetVolumeId(),
		staging: filepath.Join(p.dir, "kubelet/plugins/staging", name),
		target:  filepath.Join(p.dir, "kubelet/pods", name, "volumes/box")}
}

func fromSnapshot(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func fromVolume(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

// TestSnapshotRestoreClone: a restore starts with exactly what the source
// held at snapshot time, a clone with what it held at clone time, and no
// later write on any side shows on another. Deleting the snapshot, the
// source and a plugin restart in between break nothing.
func TestSnapshotRestoreClone(t *testing.T) {
	needRoot(t)
	needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))

	a := newVolume(t, p, "a", params, gib)
	a.stage()
	a.publish()
	guestWrite(t, a.target, 1<<20, 0xab)
	a.unpublishUnstage()
	s := snapshot(t, p, "snap-a", a.id)
	if s.GetSizeBytes() != gib {
		t.Errorf("snapshot size %d, want the source's capacity %d", s.GetSizeBytes(), gib)
	}
	// Idempotent by name.
	if again := snapshot(t, p, "snap-a", a.id); again.GetSnapshotId() != s.GetSnapshotId() {
		t.Errorf("a repeated CreateSnapshot gave %s, want %s", again.GetSnapshotId(), s.GetSnapshotId())
	}

	// The source goes on writing after the snapshot.
	a.stage()
	a.publish()
	if !guestReads(t, a.target, 1<<20, 0xab) {
		t.Fatal("the source lost its data when it was snapshotted")
	}
	guestWrite(t, a.target, 1<<20, 0xcd)
	a.unpublishUnstage()

	b := restoreVolume(t, p, "b", params, 2*gib, fromSnapshot(s.GetSnapshotId()))
	b.stage()
	b.publish()
	checkPublished(t, "qemu-img", b.target)
	if !guestReads(t, b.target, 1<<20, 0xab) {
		t.Error("the restore does not read what the source held at snapshot time")
	}
	if m := b.manifest(); m.VirtualSize != 2*gib {
		t.Errorf("restore's disk is %d bytes, want the 2 GiB asked for", m.VirtualSize)
	}
	guestWrite(t, b.target, 1<<20, 0xef)
	b.unpublishUnstage()

	c := restoreVolume(t, p, "c", params, gib, fromVolume(a.id))
	c.stage()
	c.publish()
	if !guestReads(t, c.target, 1<<20, 0xcd) {
		t.Error("the clone does not read what the source held at clone time")
	}
	c.unpublishUnstage()

	// Delete the snapshot and the source, restart: the restore and the
	// clone keep their data, and the source never saw their writes.
	a.stage()
	a.publish()
	if !guestReads(t, a.target, 1<<20, 0xcd) {
		t.Error("the restore's write showed on the source")
	}
	a.unpublishUnstage()
	if _, err := p.controller().DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: s.GetSnapshotId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.controller().DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: a.id}); err != nil {
		t.Fatal(err)
	}
	p.stop()
	p = startPlugin(t, dir, testConfig(dir))
	b.p, c.p = p, p
	b.stage()
	b.publish()
	if !guestReads(t, b.target, 1<<20, 0xef) {
		t.Error("the restore lost its own write after its snapshot and source were deleted")
	}
	b.unpublishUnstage()
	c.stage()
	c.publish()
	if !guestReads(t, c.target, 1<<20, 0xcd) {
		t.Error("the clone lost its data after its source was deleted")
	}
	c.unpublishUnstage()
	for _, id := range []string{b.id, c.id} {
		if _, err := p.controller().DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	// Nothing of the chain is left once its last user is gone.
	var left []string
	filepath.Walk(p.home, func(path string, info os.FileInfo, err error) error {
		if err == nil && strings.HasPrefix(info.Name(), layerPrefix) {
			left = append(left, path)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("layers left after every user was deleted: %v", left)
	}
}

// TestFreezeRefusedWithWriter: a disk is never frozen while any process
// has it open for writing: a qemu-io process, or a plain descriptor kept
// through a target that was unpublished with MNT_DETACH. The answer is
// FailedPrecondition, and the disk is untouched.
func TestFreezeRefusedWithWriter(t *testing.T) {
	needRoot(t)
	needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	v := newVolume(t, p, "v", params, gib)
	v.stage()
	v.publish()
	guestWrite(t, v.target, 0, 0x11)
	overlay := filepath.Join(v.target, "disks/guest-rootfs.qcow2")

	refused := func(what string) {
		t.Helper()
		_, err := p.controller().CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "s-" + what, SourceVolumeId: v.id})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "open for writing") {
			t.Errorf("%s: CreateSnapshot: %v, want FailedPrecondition saying the disk is open for writing", what, err)
		}
	}

	// A qemu-io process holding the image open read-write, as a VM does.
	cmd := exec.Command("qemu-io", "-f", "qcow2", overlay)
	stdin, _ := cmd.StdinPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitWriter(t, filepath.Join(v.staging, "disks/guest-rootfs.qcow2"))
	refused("qemu-io")
	stdin.Close()
	cmd.Wait()

	// A plain descriptor kept after the target is detached.
	f, err := os.OpenFile(overlay, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.node().NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		t.Fatal(err)
	}
	refused("detached")
	f.Close()

	// With no writer left, it freezes, and the data is in the snapshot.
	s := snapshot(t, p, "s-ok", v.id)
	r := restoreVolume(t, p, "r", params, gib, fromSnapshot(s.GetSnapshotId()))
	r.stage()
	r.publish()
	if !guestReads(t, r.target, 0, 0x11) {
		t.Error("the snapshot taken once the writers were gone lacks the data")
	}
	r.unpublishUnstage()
	if _, err := p.node().NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		t.Fatal(err)
	}
}

// waitWriter waits until some process has p open for writing, which a
// read lease attempt tells (it fails while a writer exists).
func waitWriter(t *testing.T, p string) {
	t.Helper()
	for i := 0; i < 500; i++ {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		_, lerr := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_RDLCK)
		if lerr == nil {
			unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_UNLCK)
		}
		f.Close()
		if lerr != nil {
			return
		}
		exec.Command("sleep", "0.01").Run()
	}
	t.Fatalf("no process opened %s for writing", p)
}

// TestLayersAreSealed: once frozen, a layer cannot be opened for writing
// by anyone, root included: not through the box's base/ (a read-only
// mount), not through the plugin-owned copy, not by reopening a
// descriptor kept from before the freeze, and not by linking it anew.
// Root can do more than a tenant, so what root cannot, a tenant cannot.
func TestLayersAreSealed(t *testing.T) {
	needRoot(t)
	needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	v := newVolume(t, p, "v", params, gib)
	v.stage()
	v.publish()
	guestWrite(t, v.target, 0, 0x22)
	// A pod keeps an O_PATH descriptor of its overlay, for later.
	kept, err := unix.Open(filepath.Join(v.target, "disks/guest-rootfs.qcow2"), unix.O_PATH, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(kept)
	snapshot(t, p, "s", v.id)

	r, err := p.d.readRecordOnly(v.id)
	if err != nil || len(r.Layers) != 1 {
		t.Fatalf("record after the snapshot: %+v, %v; want one layer", r, err)
	}
	layer := r.Layers[0]
	for _, path := range []string{
		filepath.Join(v.target, "base", layer),
		filepath.Join(p.d.ownedBaseDir(v.id), layer),
		filepath.Join(p.d.snapshotsDir(), snapshotKey("s"), layer),
		"/proc/self/fd/" + strconv.Itoa(kept),
	} {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err == nil {
			f.Close()
			t.Errorf("%s opened for writing", path)
		} else if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EROFS) {
			t.Errorf("%s: %v, want EPERM or EROFS", path, err)
		}
	}
	if err := unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(kept), unix.AT_FDCWD, filepath.Join(v.target, "disks/stolen"), unix.AT_SYMLINK_FOLLOW); err == nil {
		t.Error("the kept descriptor could be linked back into the box")
	}
	// The volume itself goes on writing, on its new overlay.
	guestWrite(t, v.target, 0, 0x33)
	if !guestReads(t, v.target, 0, 0x33) {
		t.Error("the volume cannot write after its snapshot")
	}
	v.unpublishUnstage()
}

// TestSnapshotGenerations: snapshot, restore, write, snapshot again, up to
// the chain bound; every generation's data survives in its restore, and a
// chain is never deeper than qcow2.MaxChainDepth.
func TestSnapshotGenerations(t *testing.T) {
	needRoot(t)
	needQemu(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	v := newVolume(t, p, "g0", params, gib)
	var vols []*volumeSteps
	for g := 0; g < maxLayers; g++ {
		v.stage()
		v.publish()
		guestWrite(t, v.target, int64(g)<<20, byte(0x40+g))
		v.unpublishUnstage()
		vols = append(vols, v)
		s := snapshot(t, p, fmt.Sprint("s", g), v.id)
		v = restoreVolume(t, p, fmt.Sprint("g", g+1), params, gib, fromSnapshot(s.GetSnapshotId()))
	}
	v.stage()
	v.publish()
	for g := 0; g < maxLayers; g++ {
		if !guestReads(t, v.target, int64(g)<<20, byte(0x40+g)) {
			t.Errorf("generation %d's data is missing from the last restore", g)
		}
	}
	out := qemu(t, "qemu-img", "info", "--backing-chain", filepath.Join(v.target, "disks/guest-rootfs.qcow2"))
	if n := strings.Count("\n"+out, "\nfile format: qcow2"); n > maxLayers+1 || n < 2 {
		t.Errorf("chain has %d qcow2 images, more than %d", n, maxLayers+1)
	}
	guestWrite(t, v.target, 100<<20, 0x99)
	v.unpublishUnstage()
	// At the bound a freeze is refused with a reason, never a deeper chain.
	_, err := p.controller().CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "too-deep", SourceVolumeId: v.id})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("snapshot past the chain bound: %v, want FailedPrecondition", err)
	}
}

// TestSnapshotRefusals: what CreateSnapshot and CreateVolume refuse, and
// with which codes.
func TestSnapshotRefusals(t *testing.T) {
	needRoot(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	v := newVolume(t, p, "v", params, gib)
	s := snapshot(t, p, "s", v.id)
	ctx := context.Background()
	other := map[string]string{ParamImage: params[ParamImage] + "-other", ParamPlainHTTP: "true"}
	for _, tc := range []struct {
		what string
		err  error
		want codes.Code
	}{
		{"same snapshot name, other source", func() error {
			w := newVolume(t, p, "w", params, gib)
			_, err := p.controller().CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: w.id})
			return err
		}(), codes.AlreadyExists},
		{"snapshot of a missing volume", func() error {
			_, err := p.controller().CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "x", SourceVolumeId: volumeIDForName("missing")})
			return err
		}(), codes.NotFound},
		{"restore into less than the snapshot", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "small", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: gib / 2}, VolumeContentSource: fromSnapshot(s.GetSnapshotId())})
			return err
		}(), codes.OutOfRange},
		{"restore of another image", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "other", Parameters: other, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: gib}, VolumeContentSource: fromSnapshot(s.GetSnapshotId())})
			return err
		}(), codes.InvalidArgument},
		{"restore of a missing snapshot", func() error {
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "m", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				VolumeContentSource: fromSnapshot(p.d.snapshotID("missing"))})
			return err
		}(), codes.NotFound},
		{"same volume name, other source", func() error {
			restoreVolume(t, p, "r", params, gib, fromSnapshot(s.GetSnapshotId()))
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "r", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: gib}, VolumeContentSource: fromVolume(v.id)})
			return err
		}(), codes.AlreadyExists},
		{"restore of another node's snapshot", func() error {
			key, _, _ := parseSnapshotID(s.GetSnapshotId())
			_, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "elsewhere", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
				VolumeContentSource: fromSnapshot(key + "@node-2")})
			if err != nil && !strings.Contains(err.Error(), "node-2") {
				t.Errorf("the refusal does not name the snapshot's node: %v", err)
			}
			return err
		}(), codes.ResourceExhausted},
		{"list with a foreign token", func() error {
			_, err := p.controller().ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "nonsense"})
			return err
		}(), codes.Aborted},
	} {
		if got := status.Code(tc.err); got != tc.want {
			t.Errorf("%s: %v, want %s", tc.what, tc.err, tc.want)
		}
	}
}

// TestInterruptedFreeze: a plugin killed during a freeze leaves its intent
// in the record; the next stage settles it from what the overlay's header
// says: before the exchange the freeze is undone (its links go), after it
// the layer is kept, sealed and recorded. Either way the data is there
// and the debris is gone.
func TestInterruptedFreeze(t *testing.T) {
	needRoot(t)
	needQemu(t)
	params, _ := testImage(t)
	for _, committed := range []bool{false, true} {
		t.Run(fmt.Sprint("committed=", committed), func(t *testing.T) {
			dir := t.TempDir()
			p := startPlugin(t, dir, testConfig(dir))
			v := newVolume(t, p, "v", params, gib)
			v.stage()
			v.publish()
			guestWrite(t, v.target, 0, 0x5a)
			v.unpublishUnstage()
			p.stop()

			// The state a kill leaves, made by hand: the intent recorded,
			// the overlay linked as the layer, the new overlay written
			// under FreezingName, and, once committed, exchanged.
			box, _ := p.d.home.Box(v.id)
			r, err := p.d.readRecordOnly(v.id)
			if err != nil {
				t.Fatal(err)
			}
			layer, _ := newLayerName()
			r.Freezing = layer
			if err := p.d.writeRecord(r); err != nil {
				t.Fatal(err)
			}
			overlay := box.GuestRootfsDiskPath()
			for _, dst := range []string{filepath.Join(box.BaseDir(), layer), filepath.Join(p.d.ownedBaseDir(v.id), layer)} {
				if err := os.Link(overlay, dst); err != nil {
					t.Fatal(err)
				}
			}
			tmp := filepath.Join(box.DisksDir(), ".guest-rootfs.qcow2.freezing")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base/"+layer, "-F", "qcow2", tmp, "1G")
			if committed {
				if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, overlay, unix.RENAME_EXCHANGE); err != nil {
					t.Fatal(err)
				}
			}

			p = startPlugin(t, dir, testConfig(dir))
			v.p = p
			v.stage()
			v.publish()
			if !guestReads(t, v.target, 0, 0x5a) {
				t.Error("the data is gone after the interrupted freeze was settled")
			}
			r, err = p.d.readRecordOnly(v.id)
			if err != nil {
				t.Fatal(err)
			}
			if r.Freezing != "" || (len(r.Layers) == 1) != committed {
				t.Errorf("record after settling: freezing %q, layers %v; want no intent and one layer iff committed", r.Freezing, r.Layers)
			}
			if _, err := os.Lstat(filepath.Join(v.staging, "disks/.guest-rootfs.qcow2.freezing")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the freeze's debris is still there: %v", err)
			}
			_, err = os.Lstat(filepath.Join(p.d.ownedBaseDir(v.id), layer))
			if committed {
				f, oerr := os.OpenFile(filepath.Join(p.d.ownedBaseDir(v.id), layer), os.O_RDWR, 0)
				if oerr == nil {
					f.Close()
					t.Error("the committed layer is not sealed")
				}
			} else if !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the undone freeze left its layer link: %v", err)
			}
			v.unpublishUnstage()
		})
	}
}
