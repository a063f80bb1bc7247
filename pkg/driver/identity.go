package driver

import (
	"context"
	"fmt"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.cfg.DriverName, VendorVersion: d.cfg.Version}, nil
}

func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	svc := func(t csi.PluginCapability_Service_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}}
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		svc(csi.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		// A published volume can be expanded (NodeExpandVolume), as long
		// as no VM holds its overlay open at that moment.
		{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{
			Type: csi.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

// Probe is ready only when the plugin could actually serve a volume now:
// the home is prepared and writable and the builder can run.
func (d *Driver) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if err := d.checkReady(); err != nil {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

func (d *Driver) checkReady() error {
	if !d.isServing() {
		return fmt.Errorf("not serving yet")
	}
	if err := d.homeWritable(); err != nil {
		return err
	}
	if err := d.builder.Usable(); err != nil {
		return fmt.Errorf("base builder %s unusable: %w", d.builder.Version(), err)
	}
	return nil
}

// homeWritable creates and removes a file in tmp/: a read-only or full
// home fails here before it fails a volume.
func (d *Driver) homeWritable() error {
	f, err := os.CreateTemp(d.home.TempDir(), ".probe-*")
	if err != nil {
		return fmt.Errorf("home %s is not writable: %w", d.home.Dir(), err)
	}
	name := f.Name()
	f.Close()
	if err := os.Remove(name); err != nil {
		return fmt.Errorf("home %s: remove %s: %w", d.home.Dir(), name, err)
	}
	return nil
}
