package driver

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// TestBaseSwapAttack plays the pod that renames its base away and plants
// a link to a host path where the base was. The plugin must neither
// mount on the host path nor leak the renamed base mount, and deleting
// the volume must leave nothing, after which the plugin still starts.
func TestBaseSwapAttack(t *testing.T) {
	// A name with a space is written as \040 in mountinfo.
	for _, aside := range []string{"base.old", "base old"} {
		t.Run(aside, func(t *testing.T) { baseSwapAttack(t, aside) })
	}
}

func baseSwapAttack(t *testing.T, aside string) {
	needRoot(t)
	params := smallImageParams(t)
	dir := t.TempDir()
	cfg := testConfig(dir)
	p := startPlugin(t, dir, cfg)
	ctx := testCtx(t)
	host := newWatchedDir(t)

	id, box := createVolume(t, p, "v", params)
	staging := filepath.Join(dir, "staging")
	target := filepath.Join(dir, "pods/p1/mount")
	if err := stageVolume(ctx, p, id, staging); err != nil {
		t.Fatal(err)
	}
	if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo}); err != nil {
		t.Fatal(err)
	}
	// The pod, through its view of the box: base/ and box.json are
	// read-only mount points, so none of this works.
	for _, try := range []struct {
		what string
		err  error
		want syscall.Errno
	}{
		{"rename base/", os.Rename(filepath.Join(target, "base"), filepath.Join(target, aside)), syscall.EBUSY},
		{"rename the base", os.Rename(filepath.Join(target, "base", "rootfs.ext4"), filepath.Join(target, "base", "x")), syscall.EROFS},
		{"add to base/", os.Symlink(host.file, filepath.Join(target, "base", "evil")), syscall.EROFS},
		{"remove box.json", os.Remove(filepath.Join(target, "box.json")), syscall.EBUSY},
	} {
		if !errors.Is(try.err, try.want) {
			t.Errorf("the pod could %s: %v, want %v", try.what, try.err, try.want)
		}
	}
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	unstageVolume(t, p, id, staging)
	if ms, _ := testenv.MountsUnder(box.Root()); len(ms) != 0 {
		t.Errorf("unstage left %d mounts inside the box, e.g. %s", len(ms), ms[0].MountPoint)
	}
	// Underneath, with no mount covering it (as after a reboot, or as a
	// pod of an earlier release saw it), the box's base/ renamed away and
	// a link to a host path planted where the base was.
	if err := os.Rename(box.BaseDir(), filepath.Join(box.Root(), aside)); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(box.BaseDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(host.file, box.BasePath()); err != nil {
		t.Fatal(err)
	}
	// Staging again must not follow the link.
	err := stageVolume(ctx, p, id, staging)
	wantStatus(t, "NodeStage over a planted link", err, codes.FailedPrecondition)
	if ms, _ := testenv.MountsUnder(host.dir); len(ms) != 0 {
		t.Fatalf("the plugin mounted on the host path the pod named: %s", ms[0].MountPoint)
	}
	host.assertUntouched(t)
	unstageVolume(t, p, id, staging)
	if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume: %v", err)
	}
	if _, err := os.Lstat(box.Root()); !os.IsNotExist(err) {
		t.Errorf("DeleteVolume reported success with the box still there: %v", err)
	}
	if n := dirEntries(t, p.d.home.BoxesDir()); len(n) != 0 {
		t.Errorf("DeleteVolume left %v in %s", n, p.d.home.BoxesDir())
	}
	p.stop()
	startPlugin(t, dir, cfg)
}
