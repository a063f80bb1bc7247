package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// NodeGetVolumeHealth reports what would stop the box from booting, each
// with a reason a human can act on.
func (d *Driver) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	const op = "NodeGetVolumeHealth"
	box, err := d.nodeBox(op, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	for what, p := range map[string]string{"volume publish path": req.GetVolumePublishPath(), "staging target path": req.GetStagingTargetPath()} {
		if p != "" {
			if err := checkPath(what, p); err != nil {
				return nil, err
			}
		}
	}
	r, err := d.readRecord(box)
	if err != nil {
		return nil, recordStatus(box, err)
	}
	box = r.boxOf(box)
	var entries []*csi.VolumeHealth_VolumeHealthEntry
	add := func(t csi.VolumeHealthErrorType, reason, format string, args ...any) {
		entries = append(entries, &csi.VolumeHealth_VolumeHealthEntry{Status: t, Reason: reason, Message: fmt.Sprintf(format, args...)})
	}
	for _, v := range diskVerdicts(box) {
		add(csi.VolumeHealthErrorType(csi.VolumeHealthErrorType_value[v.Status]), v.Reason, "%s", v.Message)
	}
	for _, p := range []string{req.GetStagingTargetPath(), req.GetVolumePublishPath()} {
		if p == "" {
			continue
		}
		if ok, err := d.mounter.isMountPoint(p); err != nil || !ok {
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "NotMounted", "the box is not mounted at %s (err %v)", p, err)
		}
	}
	if used, high, err := d.cache.Fill(); err == nil && used > high {
		add(csi.VolumeHealthErrorType_DEGRADED, "CacheAboveHighWatermark", "the node cache filesystem is %.0f%% full, above the %.0f%% high watermark", used*100, high*100)
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{VolumeId: box.ID(), HealthStatuses: entries}}, nil
}

// Verdict is one problem found with a volume's disk: Status is a CSI
// VolumeHealthErrorType name (DATA_LOSS, INACCESSIBLE, DEGRADED).
type Verdict struct {
	Status  string `json:"status"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// diskVerdicts judges the box's disk as NodeGetVolumeHealth and
// `boxlite-csi box check` report it: the overlay's header, and the base
// link it names. A box not staged yet has nothing to judge.
func diskVerdicts(box layout.Box) []Verdict {
	var out []Verdict
	add := func(t csi.VolumeHealthErrorType, reason, msg string) {
		out = append(out, Verdict{Status: t.String(), Reason: reason, Message: msg})
	}
	_, verr := rootfs.VerifyOverlay(box)
	switch {
	case verr == nil:
		if err := rootfs.VerifyBase(box); err != nil {
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "BaseMissing",
				fmt.Sprintf("overlay %s has missing backing file %s: %v", box.GuestRootfsDiskPath(), box.BackingPath(), err))
		}
	case errors.Is(verr, fs.ErrNotExist):
	case qcow2.IsCorrupt(verr):
		add(csi.VolumeHealthErrorType_DATA_LOSS, "OverlayCorrupt", verr.Error())
	case qcow2.IsTampered(verr):
		add(csi.VolumeHealthErrorType_INACCESSIBLE, "OverlayTampered", verr.Error())
	default:
		add(csi.VolumeHealthErrorType_INACCESSIBLE, "OverlayUnreadable", verr.Error())
	}
	return out
}

// NodeGetStorageHealth reports the node cache: space against the
// watermarks, whether the builder can run, whether the home is writable.
func (d *Driver) NodeGetStorageHealth(ctx context.Context, _ *csi.NodeGetStorageHealthRequest) (*csi.NodeGetStorageHealthResponse, error) {
	var out []*csi.NodeGetStorageHealthResponse_StorageBackendHealth
	add := func(t csi.StorageHealthErrorType, reason, msg string) {
		out = append(out, &csi.NodeGetStorageHealthResponse_StorageBackendHealth{Status: t, Reason: reason, Message: msg})
	}
	if used, high, err := d.cache.Fill(); err != nil {
		add(csi.StorageHealthErrorType_STORAGE_UNREACHABLE, "CacheUnreadable", err.Error())
	} else if used > high {
		add(csi.StorageHealthErrorType_STORAGE_DEGRADED, "CacheAboveHighWatermark",
			fmt.Sprintf("the node cache filesystem at %s is %.0f%% full, above the %.0f%% high watermark", d.home.Dir(), used*100, high*100))
	}
	if err := d.builder.Usable(); err != nil {
		add(csi.StorageHealthErrorType_STORAGE_UNREACHABLE, "BuilderUnusable", fmt.Sprintf("base builder %s: %v", d.builder.Version(), err))
	}
	if err := d.homeWritable(); err != nil {
		add(csi.StorageHealthErrorType_STORAGE_UNREACHABLE, "HomeNotWritable", err.Error())
	}
	return &csi.NodeGetStorageHealthResponse{BackendHealth: out}, nil
}
