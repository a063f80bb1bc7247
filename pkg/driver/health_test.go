package driver

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

func TestNodeGetVolumeHealth(t *testing.T) {
	needRoot(t)
	params, _ := testImage(t)
	cases := []struct {
		name    string
		breakIt func(t *testing.T, box layout.Box, staging string)
		status  csi.VolumeHealthErrorType
		reason  string
	}{
		{name: "healthy"},
		{"mount gone", func(t *testing.T, _ layout.Box, staging string) {
			if err := syscallUnmount(staging); err != nil {
				t.Fatal(err)
			}
		}, csi.VolumeHealthErrorType_INACCESSIBLE, "NotMounted"},
		{"overlay corrupt", func(t *testing.T, box layout.Box, _ string) {
			if err := os.WriteFile(box.GuestRootfsDiskPath(), make([]byte, 4096), 0o644); err != nil {
				t.Fatal(err)
			}
		}, csi.VolumeHealthErrorType_DATA_LOSS, "OverlayCorrupt"},
		{"overlay tampered", func(t *testing.T, box layout.Box, _ string) {
			tmp := filepath.Join(t.TempDir(), "evil.qcow2")
			if err := qcow2.CreateOverlay(context.Background(), tmp, qcow2.OverlayOptions{BackingFile: "/etc/shadow", BackingFormat: qcow2.FormatRaw, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(tmp)
			if err := os.WriteFile(box.GuestRootfsDiskPath(), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}, csi.VolumeHealthErrorType_INACCESSIBLE, "OverlayTampered"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := startPlugin(t, dir, testConfig(dir))
			ctx := context.Background()
			v, err := p.controller().CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "h", Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{rwo}})
			if err != nil {
				t.Fatal(err)
			}
			id := v.GetVolume().GetVolumeId()
			staging := filepath.Join(dir, "staging")
			if _, err := p.node().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				p.node().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			})
			box, _ := p.d.home.Box(id)
			if tc.breakIt != nil {
				tc.breakIt(t, box, staging)
			}
			h, err := p.node().NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id, StagingTargetPath: staging})
			if err != nil {
				t.Fatal(err)
			}
			got := h.GetVolumeHealth().GetHealthStatuses()
			if tc.reason == "" {
				if len(got) != 0 {
					t.Fatalf("healthy volume reports %v", got)
				}
				return
			}
			for _, e := range got {
				if e.GetStatus() == tc.status && e.GetReason() == tc.reason && e.GetMessage() != "" {
					return
				}
			}
			t.Fatalf("health %v lacks %s/%s", got, tc.status, tc.reason)
		})
	}
}
