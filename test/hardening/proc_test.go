package hardening

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// needRootAndQemu stops the test unless it can make mounts and judge
// overlays and bases, and returns the qemu tool paths.
func needRootAndQemu(t *testing.T) (qemuImg, qemuIO string) {
	t.Helper()
	testenv.RequireRoot(t, "the plugin makes real bind mounts")
	qemuImg = testenv.RequireTool(t, "qemu-img", "apt-get install qemu-utils")
	qemuIO = testenv.RequireTool(t, "qemu-io", "apt-get install qemu-utils")
	testenv.RequireTool(t, "e2fsck", "apt-get install e2fsprogs")
	if pluginBin == "" {
		t.Fatal("TestMain did not build the plugin")
	}
	return qemuImg, qemuIO
}

// proc is one boxlite-csi process at a time on a fixed home and socket;
// start after kill is a restart on the same state, as a DaemonSet does.
type proc struct {
	args   []string
	sock   string
	log    *os.File
	cmd    *exec.Cmd
	exited chan struct{}
	conn   *grpc.ClientConn
	starts int
}

func newProc(t *testing.T, dir string, extra ...string) *proc {
	t.Helper()
	p := &proc{sock: filepath.Join(dir, "csi.sock")}
	p.args = append([]string{
		"--endpoint", "unix://" + p.sock,
		"--home", filepath.Join(dir, "home"),
		"--node-id", "hardening-node",
		"-v=4",
	}, extra...)
	f, err := os.Create(filepath.Join(dir, "plugin.log"))
	if err != nil {
		t.Fatal(err)
	}
	p.log = f
	t.Cleanup(func() {
		p.kill()
		// A plugin built with -plugin.race reports data races on its
		// stderr and carries on; they are failures all the same.
		if n := countInFile(f.Name(), "WARNING: DATA RACE"); n > 0 {
			t.Errorf("the plugin reported %d data races; log tail:\n%s", n, p.logTail(32<<10))
		}
		f.Close()
	})
	return p
}

// start launches the plugin and waits until Probe says Ready: only then
// has start-up recovery run and is the home what the plugin serves from.
func (p *proc) start(ctx context.Context) error {
	if p.cmd != nil {
		return errors.New("plugin already running")
	}
	p.starts++
	fmt.Fprintf(p.log, "\n===== start %d =====\n", p.starts)
	cmd := exec.Command(pluginBin, p.args...)
	cmd.Stdout, cmd.Stderr = p.log, p.log
	// If the test binary itself is killed (a timeout, a closed pipe), no
	// cleanup runs: the plugin must not outlive it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start plugin: %w", err)
	}
	p.cmd = cmd
	p.exited = make(chan struct{})
	go func(exited chan struct{}) { _ = cmd.Wait(); close(exited) }(p.exited)
	// gRPC's default reconnect backoff starts at a second; a restarted
	// plugin listens within milliseconds, and the campaign restarts it
	// hundreds of times.
	conn, err := grpc.NewClient("unix://"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 5 * time.Millisecond, Multiplier: 1.5, MaxDelay: 100 * time.Millisecond},
			MinConnectTimeout: 5 * time.Second,
		}))
	if err != nil {
		return fmt.Errorf("dial plugin: %w", err)
	}
	p.conn = conn
	id := csi.NewIdentityClient(conn)
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
		r, err := id.Probe(pctx, &csi.ProbeRequest{})
		pcancel()
		if err == nil && r.GetReady().GetValue() {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("plugin exited during start-up (%v); log tail:\n%s", cmd.ProcessState, p.logTail(4096))
		case <-ctx.Done():
			return fmt.Errorf("plugin never became ready: last probe %v: %w", err, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// kill SIGKILLs the plugin: no handler runs, nothing is flushed, exactly
// what an OOM kill or a node crash of the process looks like.
func (p *proc) kill() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
	p.conn.Close()
	p.cmd, p.conn = nil, nil
}

// stop is a graceful SIGTERM shutdown.
func (p *proc) stop() error {
	if p.cmd == nil {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
	p.conn.Close()
	err := p.cmd.ProcessState
	p.cmd, p.conn = nil, nil
	if !err.Success() {
		return fmt.Errorf("plugin did not exit cleanly on SIGTERM: %v", err)
	}
	return nil
}

// openFDs counts the plugin's open file descriptors.
func (p *proc) openFDs() (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("count plugin file descriptors: %w", err)
	}
	return len(ents), nil
}

// cpuTime is the user plus system CPU the plugin has used so far, from
// /proc/<pid>/stat (in clock ticks of 10 ms, the Linux USER_HZ).
func (p *proc) cpuTime() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("read plugin CPU time: %w", err)
	}
	// The command name (field 2) may hold spaces; count from after it.
	rest := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(rest) < 13 {
		return 0, fmt.Errorf("read plugin CPU time: short /proc stat %q", b)
	}
	var ticks int64
	for _, f := range rest[11:13] { // utime and stime, fields 14 and 15
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("read plugin CPU time: %w", err)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond, nil
}

func (p *proc) logTail(n int64) string {
	b, err := os.ReadFile(p.log.Name())
	if err != nil {
		return err.Error()
	}
	if int64(len(b)) > n {
		b = b[int64(len(b))-n:]
	}
	return string(b)
}

// abortedOrDown is what a restart of the plugin makes kubelet retry:
// another operation on the volume or a base build still running
// (Aborted), and a plugin that is not listening (Unavailable).
func abortedOrDown(err error) bool {
	switch status.Code(err) {
	case codes.Aborted, codes.Unavailable:
		return true
	}
	return false
}

// aborted is the only failure a plugin that stays up may answer with.
func aborted(err error) bool { return status.Code(err) == codes.Aborted }

// untilOK re-issues an idempotent call until it succeeds or fails with an
// error retry does not accept; it returns the retries it needed.
func untilOK(ctx context.Context, retry func(error) bool, call func(context.Context) error) (retries int, err error) {
	// Kubelet would retry for ever; a test must end, and a plugin that
	// still refuses after two minutes (or died) has failed.
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		err = call(cctx)
		cancel()
		if err == nil || !retry(err) {
			return retries, err
		}
		retries++
		select {
		case <-ctx.Done():
			return retries, fmt.Errorf("gave up retrying after %d attempts (last: %w): %w", retries, err, ctx.Err())
		case <-time.After(time.Duration(min(retries, 20)) * 5 * time.Millisecond):
		}
	}
}

// rwo is the access every test volume asks for: a mounted box for one node.
func rwo() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// volume is one volume the test drives, with the paths kubelet would use.
type volume struct {
	name, id         string
	staging, target  string
	params           map[string]string
	capacity         int64
	readonly         bool // published read-only
	volumeContext    map[string]string
	marker           byte // 0: no marker written yet
	markerOffset     int64
	markerVersion    fileVersion // the overlay as its marker last read back
	box, overlayPath string
}

// step is one CSI call of a lifecycle, in kubelet's order.
type step int

const (
	stepCreate step = iota
	stepStage
	stepPublish
	stepUnpublish
	stepUnstage
	stepDelete
	stepDone
)

func (s step) String() string {
	switch s {
	case stepCreate:
		return "CreateVolume"
	case stepStage:
		return "NodeStageVolume"
	case stepPublish:
		return "NodePublishVolume"
	case stepUnpublish:
		return "NodeUnpublishVolume"
	case stepUnstage:
		return "NodeUnstageVolume"
	case stepDelete:
		return "DeleteVolume"
	}
	return "done"
}

// call issues step s for v once on the running plugin.
func (p *proc) call(ctx context.Context, v *volume, s step) error {
	return callOn(ctx, p.conn, v, s)
}

// callOn issues step s for v once over conn. A caller racing a kill
// passes the connection it took before, since kill replaces p.conn.
func callOn(ctx context.Context, conn *grpc.ClientConn, v *volume, s step) error {
	node, controller := csi.NewNodeClient(conn), csi.NewControllerClient(conn)
	switch s {
	case stepCreate:
		r, err := controller.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: v.name, Parameters: v.params, VolumeCapabilities: []*csi.VolumeCapability{rwo()},
			CapacityRange: &csi.CapacityRange{RequiredBytes: v.capacity},
		})
		if err != nil {
			return err
		}
		if v.id != "" && r.GetVolume().GetVolumeId() != v.id {
			return fmt.Errorf("CreateVolume %s: retry returned volume %s, first call %s", v.name, r.GetVolume().GetVolumeId(), v.id)
		}
		v.id, v.volumeContext = r.GetVolume().GetVolumeId(), r.GetVolume().GetVolumeContext()
		return nil
	case stepStage:
		_, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
			VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: rwo(), VolumeContext: v.volumeContext,
		})
		return err
	case stepPublish:
		_, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
			VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: rwo(), VolumeContext: v.volumeContext,
			Readonly: v.readonly,
		})
		return err
	case stepUnpublish:
		_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
		return err
	case stepUnstage:
		_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
		return err
	case stepDelete:
		_, err := controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id})
		return err
	}
	return fmt.Errorf("no call for step %v", s)
}

// unmountAll detaches everything under dir, so a failed test leaves no
// mounts behind to poison the next one.
func unmountAll(t testing.TB, dir string) {
	if err := testenv.UnmountAll(dir); err != nil {
		t.Log(err)
	}
}

// run executes a tool and returns its combined output, wrapping failures
// with the command line so a report names exactly what failed.
func run(ctx context.Context, name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// writeMarker writes a 64 KiB pattern into the overlay as a guest would;
// the overlay is reached through the path kubelet sees (staging), so the
// write goes through the real mounts.
func writeMarker(ctx context.Context, qemuIO, overlay string, pattern byte, off int64) error {
	_, err := run(ctx, qemuIO, "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x %d 64k", pattern, off), overlay)
	return err
}

// readMarker checks the pattern is still there, read-only so the check
// itself cannot repair anything.
func readMarker(ctx context.Context, qemuIO, overlay string, pattern byte, off int64) error {
	out, err := run(ctx, qemuIO, "-r", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %d 64k", pattern, off), overlay)
	if err == nil && strings.Contains(out, "Pattern verification failed") {
		err = fmt.Errorf("qemu-io read -P 0x%02x %d 64k on %s: %s", pattern, off, overlay, out)
	}
	return err
}
