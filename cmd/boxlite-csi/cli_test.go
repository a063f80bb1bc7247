package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/driver"
)

// TestCLIListsWhatThePluginMade: beside a running plugin, `cache ls` and
// `box ls` show the base it built and the volume it staged, as tables and
// as JSON, and a bad command line is refused.
func TestCLIListsWhatThePluginMade(t *testing.T) {
	testenv.RequireRoot(t, "NodeStage makes real bind mounts")
	reg := testregistry.NewInProcess(t)
	reg.Push(t, "busybox:1", testimage.Busybox(t))
	dir := t.TempDir()
	home, sock := filepath.Join(dir, "home"), filepath.Join(dir, "csi.sock")
	ctx, cancel := context.WithCancel(context.Background())
	var stderr syncBuffer
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"--home", home, "--endpoint", "unix://" + sock, "--node-id", "n1"}, &stderr, &stderr)
	}()
	defer func() {
		cancel()
		<-done
	}()
	waitSocket(t, sock, &stderr)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rwo := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	vol, err := csi.NewControllerClient(conn).CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: "pvc-cli", Parameters: map[string]string{"image": reg.Ref("busybox:1"), "plainHTTP": "true"},
		VolumeCapabilities: []*csi.VolumeCapability{rwo}, CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := vol.GetVolume().GetVolumeId()
	staging := filepath.Join(dir, "staging")
	node := csi.NewNodeClient(conn)
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwo}); err != nil {
		t.Fatal(err)
	}
	defer node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})

	cli := func(args ...string) (string, int) {
		var out, errOut syncBuffer
		code := run(context.Background(), append(args, "--home", home), &out, &errOut)
		return out.String() + errOut.String(), code
	}
	digest := vol.GetVolume().GetVolumeContext()["digest"]
	out, code := cli("cache", "ls")
	if code != 0 || !strings.Contains(out, shortDigest(digest)) || !strings.Contains(out, "LAST USED") {
		t.Errorf("cache ls (exit %d):\n%s", code, out)
	}
	t.Logf("cache ls:\n%s", out)
	out, code = cli("cache", "ls", "-o", "json")
	var bases []struct {
		Digest string
		Links  int
	}
	if err := json.Unmarshal([]byte(out), &bases); code != 0 || err != nil || len(bases) != 1 || bases[0].Digest != digest || bases[0].Links < 1 {
		t.Errorf("cache ls -o json (exit %d, %v): %+v\n%s", code, err, bases, out)
	}
	out, code = cli("box", "ls")
	t.Logf("box ls:\n%s", out)
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "pvc-cli") || !strings.Contains(out, "1.0Gi") {
		t.Errorf("box ls (exit %d):\n%s", code, out)
	}
	out, code = cli("box", "ls", "-o", "json")
	var vols []driver.VolumeInfo
	if err := json.Unmarshal([]byte(out), &vols); code != 0 || err != nil || len(vols) != 1 {
		t.Fatalf("box ls -o json (exit %d, %v):\n%s", code, err, out)
	}
	if v := vols[0]; v.ID != id || v.DiskBytes != 1<<30 || v.FilesystemBytes < 1<<30/100*95 || len(v.Mounts) != 1 || v.Mounts[0] != staging || v.Problem != "" {
		t.Errorf("box ls -o json: %+v; want the 1 GiB disk staged at %s", v, staging)
	}
	out, code = cli("box", "inspect", id)
	if code != 0 || !strings.Contains(out, "Disk:") || !strings.Contains(out, "1.0Gi") || !strings.Contains(out, staging) {
		t.Errorf("box inspect (exit %d):\n%s", code, out)
	}
	if out, code = cli("box", "check", id); code != 0 || !strings.Contains(out, "healthy") {
		t.Errorf("box check of a healthy box (exit %d):\n%s", code, out)
	}
	// A pod swaps its overlay for a FIFO: the check says so, and exits 1,
	// without blocking on it.
	overlay := filepath.Join(staging, "disks", "guest-rootfs.qcow2")
	if err := os.Rename(overlay, overlay+".away"); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(overlay, 0o644); err != nil {
		t.Fatal(err)
	}
	out, code = cli("box", "check", id)
	os.Remove(overlay)
	if err := os.Rename(overlay+".away", overlay); err != nil {
		t.Fatal(err)
	}
	if code != 1 || !strings.Contains(out, "INACCESSIBLE OverlayTampered") {
		t.Errorf("box check of a box whose overlay is a FIFO (exit %d):\n%s", code, out)
	}
	if out, code := cli("box", "inspect", "bx-nope"); code != 1 || !strings.Contains(out, "bx-nope") {
		t.Errorf("box inspect of no volume (exit %d):\n%s", code, out)
	}
	for _, bad := range [][]string{{"box", "rm"}, {"cache", "ls", "-o", "yaml"}, {"box", "ls", "extra"}, {"box", "check"}} {
		if out, code := cli(bad...); code != 2 {
			t.Errorf("%q: exit %d, want 2:\n%s", bad, code, out)
		}
	}
}
