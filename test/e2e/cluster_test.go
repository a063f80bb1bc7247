package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"golang.org/x/sys/unix"
)

const (
	defaultRoot   = "/var/lib/boxlite-e2e"
	apiserverAddr = "127.0.0.1:6443"
	etcdAddr      = "127.0.0.1:2379"
	kubeletPort   = 10250
	nodeName      = "localhost"
	bridgeName    = "blxe2e0"
	podSubnet     = "10.251.77.0/24"
	serviceRange  = "10.251.78.0/24"
)

// Paths the components use whatever their flags say. Each is removed at
// the end only if it did not exist before the run.
var fixedPaths = []string{
	"/var/lib/kubelet/device-plugins", "/var/lib/kubelet",
	"/run/containerd/runc", "/run/containerd/s", "/run/containerd",
	"/var/lib/cni/results", "/var/lib/cni",
	"/var/log/containers", "/var/log/pods",
}

// Kernel settings the kubelet sets on start unless protectKernelDefaults;
// restored afterwards so the machine is left as found.
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
}

func runRoot() string {
	if d := os.Getenv("BOXLITE_E2E_ROOT"); d != "" {
		return d
	}
	return defaultRoot
}

type cluster struct {
	*harness
	bins       binaries
	pki        *pki
	kubeconfig string
	ctrSock    string
	kubeletDir string
	home       string
	podLogs    string
	registry   string // host:port of the local registry
	before     map[string]bool
}

// hostDirs are where a component that ignores its flags would leave
// something; the tear-down checks that nothing new is left in them.
var hostDirs = []string{"/run", "/var/run/netns", "/var/lib", "/var/log", "/etc", "/etc/cni", "/opt", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu"}

func hostSnapshot() map[string]bool {
	m := map[string]bool{}
	for _, d := range hostDirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			m[filepath.Join(d, e.Name())] = true
		}
	}
	if ifs, err := net.Interfaces(); err == nil {
		for _, i := range ifs {
			m["if:"+i.Name] = true
		}
	}
	return m
}

func (c *cluster) ctr(args ...string) string {
	c.t.Helper()
	return runCmd(c.t, "", nil, "ctr", append([]string{"-a", c.ctrSock, "-n", "k8s.io"}, args...)...)
}

// cleanupRoot undoes what a run recorded in root/state.json: this run's at
// the end, or a crashed run's before a new one starts.
func cleanupRoot(t testing.TB, root string) {
	var st state
	if b, err := os.ReadFile(filepath.Join(root, "state.json")); err == nil {
		if err := json.Unmarshal(b, &st); err != nil {
			t.Logf("cleanup: unreadable %s/state.json: %v", root, err)
		}
	} else if _, err := os.Stat(root); os.IsNotExist(err) {
		return
	}
	byName := map[string]proc{}
	for _, p := range st.Procs {
		byName[p.Name] = p
	}
	// The kubelet first, so it does not restart containers we kill.
	if p, ok := byName["kubelet"]; ok {
		p.stop(10 * time.Second)
	}
	if st.CgroupsCreated {
		for _, pid := range cgroupPIDs2(kubepodsCgroups()) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	sock := filepath.Join(root, "containerd", "containerd.sock")
	for _, name := range []string{"containerd"} {
		if p, ok := byName[name]; ok {
			p.stop(10 * time.Second)
		}
	}
	for _, pid := range pidsMatching("-address " + sock) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, name := range []string{"snapshot-controller", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "registry"} {
		if p, ok := byName[name]; ok {
			p.stop(10 * time.Second)
		}
	}
	time.Sleep(200 * time.Millisecond)
	// Never remove a tree that still has something mounted in it: the
	// removal would go through the mount into whatever it shows.
	mounted := map[string]bool{}
	for _, p := range append([]string{root}, st.Created...) {
		if err := testenv.UnmountAll(p); err != nil {
			t.Errorf("cleanup: %v", err)
			mounted[p] = true
		}
	}
	if st.CgroupsCreated {
		removeCgroups(kubepodsCgroups())
	}
	if _, err := net.InterfaceByName(bridgeName); err == nil {
		exec.Command("ip", "link", "del", bridgeName).Run()
	}
	for k, v := range st.Sysctls {
		os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644)
	}
	// Created is in creation order: children were recorded before parents.
	for _, p := range append(st.Created, root) {
		if mounted[p] {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			// A sealed layer (a snapshot's, or a restored volume's, left
			// by a step that failed or a run that was killed) is immutable
			// and cannot be unlinked until the attribute is lifted.
			if n := unseal(p); n > 0 {
				t.Logf("cleanup: lifted the immutable attribute of %d sealed layers under %s", n, p)
				err = os.RemoveAll(p)
			}
			if err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	}
}

// fsImmutableFL is FS_IMMUTABLE_FL of linux/fs.h, which x/sys/unix does
// not define.
const fsImmutableFL = 0x10

// unseal clears the immutable attribute the plugin gives frozen layers on
// every regular file under dir, and returns how many it cleared. Only run
// on trees with nothing mounted in them, so it stays on the run's own
// filesystem.
func unseal(dir string) int {
	n := 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			return nil
		}
		defer f.Close()
		flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
		if err != nil || flags&fsImmutableFL == 0 {
			return nil
		}
		if unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags&^fsImmutableFL)) == nil {
			n++
		}
		return nil
	})
	return n
}

func cgroupPIDs2(dirs []string) []int {
	var pids []int
	for _, d := range dirs {
		pids = append(pids, cgroupPIDs(d)...)
	}
	return pids
}

func portFree(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return l.Close()
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond until it returns true or the timeout passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if detail != "" {
			last = detail
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last: %s", timeout, what, last)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func writeFile(t testing.TB, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startCluster brings up etcd, the control plane, containerd, the kubelet
// and a registry on 127.0.0.1, after removing what a crashed run left.
func startCluster(t *testing.T, bins binaries) *cluster {
	root := runRoot()
	cleanupRoot(t, root)
	for _, a := range []string{apiserverAddr, etcdAddr, fmt.Sprintf("127.0.0.1:%d", kubeletPort)} {
		if err := portFree(a); err != nil {
			t.Fatalf("port %s is in use (another cluster or e2e run on this machine?): %v", a, err)
		}
	}
	h := &harness{t: t, root: root, logs: filepath.Join(root, "logs"), cmds: map[string]*exec.Cmd{}}
	if err := os.MkdirAll(h.logs, 0o755); err != nil {
		t.Fatal(err)
	}
	h.state.Sysctls = map[string]string{}
	for _, k := range kubeletSysctls {
		if b, err := os.ReadFile(filepath.Join("/proc/sys", k)); err == nil {
			h.state.Sysctls[k] = strings.TrimSpace(string(b))
		}
	}
	for _, p := range fixedPaths {
		if _, err := os.Stat(p); os.IsNotExist(err) {
			h.state.Created = append(h.state.Created, p)
		}
	}
	h.state.CgroupsCreated = len(kubepodsCgroups()) == 0
	if !h.state.CgroupsCreated {
		t.Logf("kubepods cgroups exist already; pod processes will not be killed by cgroup at tear-down")
	}
	h.save()
	c := &cluster{harness: h, bins: bins, before: hostSnapshot()}
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpDiagnostics()
		}
		if os.Getenv("BOXLITE_E2E_KEEP") != "" {
			t.Logf("BOXLITE_E2E_KEEP set: cluster left running under %s", root)
			return
		}
		c.teardown()
	})

	// Bidirectional mount propagation from the plugin pod has to reach
	// the host: the whole run root is a shared mount of its own.
	runCmd(t, "", nil, "mount", "--bind", root, root)
	runCmd(t, "", nil, "mount", "--make-rshared", root)

	c.pki = newPKI(t, filepath.Join(root, "pki"))
	p := c.pki
	p.issue(t, "apiserver", "kube-apiserver", nil, true, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, []string{"127.0.0.1", "10.251.78.1"})
	p.issue(t, "admin", "e2e-admin", []string{"system:masters"}, false, nil, nil)
	p.issue(t, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, false, nil, nil)
	p.issue(t, "controller-manager", "system:kube-controller-manager", nil, false, nil, nil)
	p.issue(t, "scheduler", "system:kube-scheduler", nil, false, nil, nil)
	p.issue(t, "snapshot-controller", "e2e-snapshot-controller", []string{"system:masters"}, false, nil, nil)
	p.issue(t, "kubelet", "system:node:"+nodeName, []string{"system:nodes"}, false, nil, nil)
	p.issue(t, "kubelet-serving", nodeName, nil, true, []string{nodeName}, []string{"127.0.0.1"})
	server := "https://" + apiserverAddr
	c.kubeconfig = p.kubeconfig(t, "admin", server)

	// etcd's peer port is not one of Kubernetes': a free one avoids
	// clashing with other tests on the machine.
	peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	h.start("etcd", nil, "etcd", "--name=e2e", "--data-dir="+filepath.Join(root, "etcd"),
		"--listen-client-urls=http://"+etcdAddr, "--advertise-client-urls=http://"+etcdAddr,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer, "--initial-cluster=e2e="+peer,
		"--log-level=warn")

	k := func(n string) string { return filepath.Join(bins.k8s, n) }
	h.start("kube-apiserver", nil, k("kube-apiserver"),
		"--etcd-servers=http://"+etcdAddr, "--bind-address=127.0.0.1", "--secure-port=6443",
		"--advertise-address=127.0.0.1",
		"--client-ca-file="+p.path("ca.crt"),
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--kubelet-client-certificate="+p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p.path("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p.path("ca.crt"),
		"--kubelet-preferred-address-types=Hostname",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+p.path("sa.pub"),
		"--service-account-signing-key-file="+p.path("sa.key"),
		"--service-cluster-ip-range="+serviceRange,
		"--authorization-mode=Node,RBAC", "--allow-privileged=true",
		"--endpoint-reconciler-type=none")
	waitFor(t, "kube-apiserver /readyz", 90*time.Second, func() (bool, string) {
		out, err := c.kubectlErr("get", "--raw", "/readyz")
		if !h.proc2alive("kube-apiserver") {
			t.Fatalf("kube-apiserver exited:\n%s", h.logTail("kube-apiserver"))
		}
		return err == nil && strings.TrimSpace(out) == "ok", out
	})

	h.start("kube-controller-manager", nil, k("kube-controller-manager"),
		"--kubeconfig="+p.kubeconfig(t, "controller-manager", server),
		"--authentication-kubeconfig="+p.path("controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+p.path("controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", freePort(t)),
		"--leader-elect=false", "--use-service-account-credentials=true",
		"--service-account-private-key-file="+p.path("sa.key"), "--root-ca-file="+p.path("ca.crt"),
		"--cluster-signing-cert-file="+p.path("ca.crt"), "--cluster-signing-key-file="+p.path("ca.key"))
	h.start("kube-scheduler", nil, k("kube-scheduler"),
		"--kubeconfig="+p.kubeconfig(t, "scheduler", server),
		"--authentication-kubeconfig="+p.path("scheduler.kubeconfig"),
		"--authorization-kubeconfig="+p.path("scheduler.kubeconfig"),
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", freePort(t)),
		"--leader-elect=false")
	c.startSnapshotController(server)

	c.startContainerd()
	c.startKubelet()
	waitFor(t, "node Ready", 120*time.Second, func() (bool, string) {
		for _, n := range []string{"kubelet", "containerd", "snapshot-controller"} {
			if !h.proc2alive(n) {
				t.Fatalf("%s exited:\n%s", n, h.logTail(n))
			}
		}
		out, _ := c.kubectlErr("get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		return out == "True", out
	})
	waitFor(t, "default ServiceAccount", 60*time.Second, func() (bool, string) {
		_, err := c.kubectlErr("get", "serviceaccount", "default", "-n", "default")
		return err == nil, ""
	})
	c.startRegistry()
	return c
}

func (h *harness) proc2alive(name string) bool {
	p, ok := h.proc(name)
	return ok && p.alive()
}

func (c *cluster) startContainerd() {
	t, root := c.t, c.root
	dir := filepath.Join(root, "containerd")
	c.ctrSock = filepath.Join(dir, "containerd.sock")
	cniConf := filepath.Join(root, "cni", "net.d")
	writeFile(t, filepath.Join(cniConf, "10-e2e.conflist"), fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "boxlite-e2e",
  "plugins": [{
    "type": "bridge", "bridge": %q, "isGateway": false, "ipMasq": false,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}
  }]
}
`, bridgeName, podSubnet, filepath.Join(root, "cni", "ipam")))
	// restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc
	// fails every sandbox when asked to lower an OOM score.
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/%s"
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.ctrSock, c.ctrSock+".ttrpc", pauseImage, cniConf)
	writeFile(t, filepath.Join(dir, "config.toml"), cfg)
	c.start("containerd", nil, "containerd", "--config", filepath.Join(dir, "config.toml"), "--log-level", "warn")
	waitFor(t, "containerd", 30*time.Second, func() (bool, string) {
		if !c.proc2alive("containerd") {
			t.Fatalf("containerd exited:\n%s", c.logTail("containerd"))
		}
		out, err := exec.Command("ctr", "-a", c.ctrSock, "version").CombinedOutput()
		return err == nil, string(out)
	})
}

func (c *cluster) startKubelet() {
	t, root := c.t, c.root
	c.kubeletDir = filepath.Join(root, "kubelet")
	c.home = filepath.Join(root, "home")
	c.podLogs = filepath.Join(root, "pod-logs")
	p := c.pki
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %q}
authorization: {mode: Webhook}
tlsCertFile: %q
tlsPrivateKeyFile: %q
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://%s
failSwapOn: false
makeIPTablesUtilChains: false
podLogsDir: %q
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
nodeStatusReportFrequency: 5s
fileCheckFrequency: 5s
syncFrequency: 10s
`, kubeletPort, p.path("ca.crt"), p.path("kubelet-serving.crt"), p.path("kubelet-serving.key"), c.ctrSock, c.podLogs)
	writeFile(t, filepath.Join(root, "kubelet-config.yaml"), cfg)
	if err := os.MkdirAll(c.kubeletDir, 0o750); err != nil {
		t.Fatal(err)
	}
	c.start("kubelet", nil, filepath.Join(c.bins.k8s, "kubelet"),
		"--config="+filepath.Join(root, "kubelet-config.yaml"),
		"--kubeconfig="+p.kubeconfig(t, "kubelet", "https://"+apiserverAddr),
		"--root-dir="+c.kubeletDir, "--cert-dir="+filepath.Join(root, "kubelet-pki"),
		"--hostname-override="+nodeName, "--v=2")
}

func (c *cluster) startRegistry() {
	t, root := c.t, c.root
	c.registry = "127.0.0.1:5555"
	if err := portFree(c.registry); err != nil {
		c.registry = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	}
	cfg := fmt.Sprintf(`version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: %q}
  delete: {enabled: true}
http:
  addr: %s
`, filepath.Join(root, "registry"), c.registry)
	writeFile(t, filepath.Join(root, "registry.yaml"), cfg)
	c.start("registry", nil, "docker-registry", "serve", filepath.Join(root, "registry.yaml"))
	waitFor(t, "registry", 30*time.Second, func() (bool, string) {
		if !c.proc2alive("registry") {
			t.Fatalf("registry exited:\n%s", c.logTail("registry"))
		}
		conn, err := net.Dial("tcp", c.registry)
		if err == nil {
			conn.Close()
		}
		return err == nil, fmt.Sprint(err)
	})
}

// teardown deletes what runs in the cluster while it can still unmount its
// volumes, then stops every process this run started and undoes its
// changes to the host.
func (c *cluster) teardown() {
	t := c.t
	if c.proc2alive("kube-apiserver") && c.proc2alive("kubelet") {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		run := func(args ...string) {
			cmd := exec.CommandContext(ctx, filepath.Join(c.bins.k8s, "kubectl"), args...)
			cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Logf("teardown: kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
		run("delete", "namespace", testNamespace, "--ignore-not-found", "--wait=true", "--timeout=80s")
		if c.bins.helm != "" {
			cmd := exec.CommandContext(ctx, c.bins.helm, "uninstall", releaseName, "-n", pluginNamespace, "--wait", "--ignore-not-found", "--timeout=60s")
			cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
			cmd.CombinedOutput()
		}
	}
	cleanupRoot(t, c.root)
	for _, p := range append(fixedPaths, c.root) {
		created := false
		for _, q := range c.state.Created {
			created = created || p == q
		}
		if _, err := os.Stat(p); err == nil && (created || p == c.root) {
			t.Errorf("teardown left %s behind", p)
		}
	}
	if _, err := net.InterfaceByName(bridgeName); err == nil {
		t.Errorf("teardown left interface %s behind", bridgeName)
	}
	for _, p := range c.state.Procs {
		if p.alive() {
			t.Errorf("teardown left %s (pid %d) running", p.Name, p.PID)
		}
	}
	for p := range hostSnapshot() {
		if !c.before[p] && p != c.root {
			t.Errorf("teardown left %s behind (not there before the run)", p)
		}
	}
	if pids := pidsMatching("-address " + c.ctrSock); len(pids) > 0 {
		t.Errorf("teardown left containerd shims running: %v", pids)
	}
}

func (c *cluster) dumpDiagnostics() {
	t := c.t
	if out, err := c.kubectlErr("get", "pods,pvc,pv,volumeattachments,csistoragecapacities", "-A", "-o", "wide"); err == nil {
		t.Logf("cluster state:\n%s", out)
	}
	if out, err := c.kubectlErr("get", "events", "-A", "--sort-by=.lastTimestamp"); err == nil {
		t.Logf("events:\n%s", tail(out, 6000))
	}
	if out, err := c.kubectlErr("get", "volumesnapshots,volumesnapshotcontents", "-A", "-o", "wide"); err == nil {
		t.Logf("snapshots:\n%s", out)
	}
	for _, n := range []string{"kubelet", "containerd", "snapshot-controller"} {
		t.Logf("%s log tail:\n%s", n, c.logTail(n))
	}
	logs, _ := filepath.Glob(filepath.Join(c.podLogs, pluginNamespace+"_*", "*", "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		t.Logf("%s:\n%s", l, tail(string(b), 5000))
	}
}
