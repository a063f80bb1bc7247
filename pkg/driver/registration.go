package driver

import (
	"context"
	"fmt"
	"path/filepath"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// registrationServer answers kubelet's plugin watcher, doing what the
// node-driver-registrar sidecar would where its image is unavailable.
type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	name     string
	endpoint string
	log      klog.Logger
}

func (r *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrationServer) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		r.log.Error(nil, "Kubelet refused the plugin registration", "error", s.Error)
	} else {
		r.log.Info("Registered with kubelet", "driver", r.name)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// serveRegistration listens on <RegistrationDir>/<driver>-reg.sock, the
// name kubelet's plugin watcher looks for, and tells kubelet to reach the
// CSI endpoint at KubeletRegistrationPath (its path on the host).
func (d *Driver) serveRegistration(ctx context.Context, errc chan<- error) (*grpc.Server, error) {
	sock := filepath.Join(d.cfg.RegistrationDir, d.cfg.DriverName+"-reg.sock")
	l, err := listen("unix://" + sock)
	if err != nil {
		return nil, fmt.Errorf("registration socket: %w", err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registrationServer{
		name:     d.cfg.DriverName,
		endpoint: d.cfg.KubeletRegistrationPath,
		log:      klog.FromContext(ctx),
	})
	go func() { errc <- srv.Serve(l) }()
	klog.FromContext(ctx).Info("Serving kubelet plugin registration", "socket", sock, "csiEndpoint", d.cfg.KubeletRegistrationPath)
	return srv, nil
}
