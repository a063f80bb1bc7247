package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	ocilayout "github.com/google/go-containerregistry/pkg/v1/layout"
	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
)

// TestMain lets TestSanityCLI start this test binary as a real plugin
// process: with BOXLITE_CSI_MAIN set it is boxlite-csi, nothing else.
func TestMain(m *testing.M) {
	if os.Getenv("BOXLITE_CSI_MAIN") != "" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// TestSanityCLI runs the csi-sanity command (v5.6.0, installed by .ci/run)
// against a boxlite-csi process, then stops the plugin with SIGTERM.
func TestSanityCLI(t *testing.T) {
	testenv.RequireRoot(t, "the plugin makes real bind mounts")
	sanity := testenv.RequireTool(t, "csi-sanity", "go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.6.0")
	dir := t.TempDir()
	oci := filepath.Join(dir, "oci")
	p, err := ocilayout.Write(oci, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(testimage.Busybox(t)); err != nil {
		t.Fatal(err)
	}
	params := filepath.Join(dir, "params.yaml")
	if err := os.WriteFile(params, []byte("image: oci:"+oci+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(dir, "csi.sock")
	plugin := exec.Command(os.Args[0], "--endpoint", "unix://"+sock, "--home", filepath.Join(dir, "home"), "--node-id", "sanity-node")
	plugin.Env = append(os.Environ(), "BOXLITE_CSI_MAIN=1")
	logs := &strings.Builder{}
	plugin.Stdout, plugin.Stderr = logs, logs
	if err := plugin.Start(); err != nil {
		t.Fatal(err)
	}
	defer plugin.Process.Kill()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin never listened:\n%s", logs)
		}
	}

	out, err := exec.Command(sanity,
		"-csi.endpoint", "unix://"+sock,
		"-csi.mountdir", filepath.Join(dir, "mnt"),
		"-csi.stagingdir", filepath.Join(dir, "staging"),
		"-csi.testvolumeparameters", params,
		"-csi.testvolumesize", "1073741824",
		"-ginkgo.no-color",
	).CombinedOutput()
	summary := ""
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "Passed") && strings.Contains(line, "Failed") {
			summary = line
		}
	}
	t.Logf("csi-sanity: %s", summary)
	if err != nil || !strings.Contains(summary, "| 0 Failed") {
		t.Fatalf("csi-sanity failed: %v\n%s\nplugin log:\n%s", err, out, logs)
	}

	if err := plugin.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := plugin.Wait(); err != nil {
		t.Fatalf("plugin did not exit cleanly on SIGTERM: %v\n%s", err, logs)
	}
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, mi := range infos {
		if strings.HasPrefix(mi.MountPoint, dir) {
			t.Errorf("leaked mount %s", mi.MountPoint)
			syscall.Unmount(mi.MountPoint, syscall.MNT_DETACH)
		}
	}
}
