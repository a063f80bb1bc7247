package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestUnpublishKeepsOtherViews publishes one staged volume to two pods,
// unpublishes one, and publishes a third, on a shared mount as kubelet's
// directory and the plugin's home are on a node (mount propagation on).
// Unmounting one target must not take the read-only base/ and box.json
// mounts away from the box, the staging path or the other target: if the
// binds were peers of the home's mount, the unmount of the target's nested
// mounts would propagate to theirs, and the third pod would get a box whose
// base/ is the plugin's writable directory, with a hard link of the shared
// cached base in it.
func TestUnpublishKeepsOtherViews(t *testing.T) {
	needRoot(t)
	node := t.TempDir()
	if err := unix.Mount("boxlite-test", node, "tmpfs", 0, ""); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", node, err)
	}
	t.Cleanup(func() { unix.Unmount(node, unix.MNT_DETACH) })
	if err := unix.Mount("", node, "", unix.MS_SHARED, ""); err != nil {
		t.Fatalf("make %s shared: %v", node, err)
	}
	// Below the shared mount, so the plugin's own leak check does not
	// count it.
	dir := filepath.Join(node, "run")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := startPlugin(t, dir, testConfig(dir))
	params, _ := testImage(t)
	ctx := context.Background()
	v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "shared", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
	if err != nil {
		t.Fatal(err)
	}
	id := v.GetVolume().GetVolumeId()
	staging := filepath.Join(dir, "kubelet", "staging", id)
	target := func(pod string) string { return filepath.Join(dir, "kubelet", "pods", pod, "mount") }
	if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
		t.Fatal(err)
	}
	publish := func(pod string) {
		t.Helper()
		if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target(pod), VolumeCapability: rwo}); err != nil {
			t.Fatal(err)
		}
	}
	publish("a")
	publish("b")
	if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target("b")}); err != nil {
		t.Fatal(err)
	}
	publish("c")
	box := filepath.Join(p.home, "boxes", id)
	for _, view := range []string{box, staging, target("a"), target("c")} {
		for _, rel := range []string{"base", "box.json"} {
			p := filepath.Join(view, rel)
			var st unix.Statfs_t
			if err := unix.Statfs(p, &st); err != nil {
				t.Fatal(err)
			}
			if st.Flags&unix.ST_RDONLY == 0 {
				t.Errorf("%s is writable after another pod's target was unpublished: its read-only mount is gone", p)
			}
		}
	}
	f, err := os.OpenFile(filepath.Join(target("c"), "base", "rootfs.ext4"), os.O_WRONLY|os.O_APPEND, 0)
	if err == nil {
		f.Close()
		t.Errorf("the third pod can open the shared base for writing")
	} else if !errors.Is(err, unix.EROFS) {
		t.Errorf("opening the third pod's base for writing: %v, want EROFS", err)
	}
	for _, pod := range []string{"a", "c"} {
		if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target(pod)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
}
