package driver

import (
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCapacityFor(t *testing.T) {
	d := &Driver{cfg: Config{MaxVolumeSize: 100}}
	for _, tc := range []struct {
		name     string
		r        *csi.CapacityRange
		want     int64
		wantCode codes.Code
	}{
		{"none means the base's size", nil, 0, codes.OK},
		{"required", &csi.CapacityRange{RequiredBytes: 10}, 10, codes.OK},
		{"limit only", &csi.CapacityRange{LimitBytes: 20}, 20, codes.OK},
		{"both", &csi.CapacityRange{RequiredBytes: 10, LimitBytes: 20}, 10, codes.OK},
		{"at the maximum", &csi.CapacityRange{RequiredBytes: 100}, 100, codes.OK},
		{"over the maximum", &csi.CapacityRange{RequiredBytes: 101}, 0, codes.OutOfRange},
		{"required over limit", &csi.CapacityRange{RequiredBytes: 30, LimitBytes: 20}, 0, codes.OutOfRange},
		{"negative", &csi.CapacityRange{RequiredBytes: -1}, 0, codes.OutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := d.capacityFor(tc.r)
			if status.Code(err) != tc.wantCode || got != tc.want {
				t.Errorf("capacityFor = %d, %v; want %d, %v", got, err, tc.want, tc.wantCode)
			}
		})
	}
	unlimited := &Driver{}
	if got, err := unlimited.capacityFor(&csi.CapacityRange{RequiredBytes: 1 << 50}); err != nil || got != 1<<50 {
		t.Errorf("without --max-volume-size: capacityFor = %d, %v", got, err)
	}
	// Past the largest qcow2 disk, and where the accounting's sums would
	// overflow: refused whatever the maximum.
	for _, n := range []int64{1<<51 + 1, 1<<63 - 1} {
		if got, err := unlimited.capacityFor(&csi.CapacityRange{RequiredBytes: n}); status.Code(err) != codes.OutOfRange {
			t.Errorf("capacityFor(%d) = %d, %v; want OutOfRange", n, got, err)
		}
	}
}

func TestTopology(t *testing.T) {
	d := &Driver{cfg: Config{DriverName: "csi.boxlite.dev", NodeID: "node-1"}}
	key := d.cfg.TopologyKey()
	here := &csi.Topology{Segments: map[string]string{key: "node-1"}}
	there := &csi.Topology{Segments: map[string]string{key: "node-2"}}
	otherKey := &csi.Topology{Segments: map[string]string{"zone": "node-1"}}
	for _, tc := range []struct {
		name string
		req  *csi.TopologyRequirement
		want bool
	}{
		{"no requirement", nil, true},
		{"preferred only", &csi.TopologyRequirement{Preferred: []*csi.Topology{there}}, true},
		{"requisite here", &csi.TopologyRequirement{Requisite: []*csi.Topology{there, here}}, true},
		{"requisite elsewhere", &csi.TopologyRequirement{Requisite: []*csi.Topology{there}}, false},
		{"requisite with another key", &csi.TopologyRequirement{Requisite: []*csi.Topology{otherKey}}, false},
	} {
		if got := d.topologyAllows(tc.req); got != tc.want {
			t.Errorf("%s: topologyAllows = %v, want %v", tc.name, got, tc.want)
		}
	}
	if got := d.nodeTopology().GetSegments()[key]; got != "node-1" {
		t.Errorf("nodeTopology names %q, want node-1", got)
	}
}
