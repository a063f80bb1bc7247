package driver

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// mountsPerVolume is what a staged and published volume costs the node's
// mount table: the box's own read-only binds of base/ and box.json, the
// staging bind of the box with those two under it, and the target's bind
// with them again. Kubelet's default of 110 pods per node makes this the
// number to keep small; the README states it.
const mountsPerVolume = 2 + 3 + 3

// TestMountCount stages and publishes 110 volumes (a full node at
// kubelet's default pod limit) and counts the mounts the plugin made under
// its home and the staging and target directories: exactly
// mountsPerVolume each, and none left once every volume is unpublished,
// unstaged and deleted.
func TestMountCount(t *testing.T) {
	needRoot(t)
	const n = 110
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))
	params, _ := testImage(t)
	ctx := context.Background()
	ids := make([]string, n)
	for i := range ids {
		v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: fmt.Sprintf("count-%d", i), Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		})
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = v.GetVolume().GetVolumeId()
		staging, target := filepath.Join(dir, "s", ids[i]), filepath.Join(dir, "t", ids[i])
		if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: ids[i], StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
			t.Fatal(err)
		}
		if _, err := p.node().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: ids[i], StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwo}); err != nil {
			t.Fatal(err)
		}
	}
	count := func() int {
		t.Helper()
		ms, err := testenv.MountsUnder(dir)
		if err != nil {
			t.Fatal(err)
		}
		return len(ms)
	}
	if got, want := count(), n*mountsPerVolume; got != want {
		t.Fatalf("%d volumes staged and published hold %d mounts under %s, want %d (%d per volume)", n, got, dir, want, mountsPerVolume)
	}
	t.Logf("%d volumes staged and published: %d mounts", n, n*mountsPerVolume)
	for _, id := range ids {
		if _, err := p.node().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: filepath.Join(dir, "t", id)}); err != nil {
			t.Fatal(err)
		}
		if _, err := p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(dir, "s", id)}); err != nil {
			t.Fatal(err)
		}
		if _, err := p.controller().DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if got := count(); got != 0 {
		t.Fatalf("%d mounts left under %s after every volume was deleted", got, dir)
	}
}
