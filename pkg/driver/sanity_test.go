package driver

import (
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
)

// TestSanity runs the whole csi-sanity suite against the real driver on a
// unix socket, with real bind mounts and a real registry image.
func TestSanity(t *testing.T) {
	needRoot(t)
	params, _ := testImage(t)
	dir := t.TempDir()
	p := startPlugin(t, dir, testConfig(dir))

	cfg := sanity.NewTestConfig()
	cfg.Address = p.sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeParameters = params
	cfg.TestVolumeSize = 1 << 30
	cfg.IdempotentCount = 10
	sanity.Test(t, cfg)
}
