package driver

import (
	"context"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// TestKubeletRegistration talks to the registration socket as kubelet's
// plugin watcher does: GetInfo, then NotifyRegistrationStatus.
func TestKubeletRegistration(t *testing.T) {
	dir := t.TempDir()
	cfg := testConfig(dir)
	cfg.RegistrationDir = filepath.Join(dir, "plugins_registry")
	cfg.KubeletRegistrationPath = "/var/lib/kubelet/plugins/csi.boxlite.dev/csi.sock"
	startPlugin(t, dir, cfg)

	conn, err := grpc.NewClient("unix://"+filepath.Join(cfg.RegistrationDir, "csi.boxlite.dev-reg.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	info, err := c.GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != "csi.boxlite.dev" || info.Endpoint != cfg.KubeletRegistrationPath || len(info.SupportedVersions) == 0 {
		t.Fatalf("GetInfo = %+v", info)
	}
	for _, ok := range []bool{true, false} {
		if _, err := c.NotifyRegistrationStatus(context.Background(), &registerapi.RegistrationStatus{PluginRegistered: ok, Error: "test"}); err != nil {
			t.Fatal(err)
		}
	}
}
