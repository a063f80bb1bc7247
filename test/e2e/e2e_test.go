package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// Resources the e2e needs on top of the Debian packages install-deps.sh
// installs: the Kubernetes build peaks near 2.5 GB per link and the cache
// and build cache take about 5 GB.
const (
	minFreeDisk = 12 << 30
	minFreeMem  = 4 << 30
)

// gate stops the test, saying why, when this machine cannot run the e2e
// (a skip on a developer's machine, a failure under CI=true).
func gate(t *testing.T) {
	testenv.RequireRoot(t, "the e2e runs containerd, a kubelet and mounts (sudo make e2e)")
	for _, dir := range []string{cacheRoot(), filepath.Dir(runRoot())} {
		testenv.RequireDisk(t, dir, minFreeDisk)
	}
	testenv.RequireMemory(t, minFreeMem)
	for _, b := range []string{"go", "etcd", "containerd", "runc", "ctr", "docker-registry", "qemu-system-x86_64",
		"qemu-img", "debugfs", "e2fsck", "apt-get", "dpkg", "ip", "mount", busyboxHost, "/usr/lib/cni/bridge", "/usr/lib/cni/loopback"} {
		testenv.RequireTool(t, b, "run test/e2e/install-deps.sh")
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func sha256File(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

type suite struct {
	c          *cluster
	bins       binaries
	root       string  // the repository
	current    release // the working tree: chart, image and values
	previous   *release
	image1     string // busybox:1 in the local registry
	image2     string // busybox:two, for the shared-base scenario
	digest1    string
	digest2    string
	workDir    string
	chaincheck string
	upg        upgradeState
}

func TestE2E(t *testing.T) {
	gate(t)
	start := time.Now()
	root := repoRoot(t)
	s := &suite{workDir: t.TempDir(), root: root}
	// Checked before the long builds, so that a shallow clone in CI fails
	// in seconds rather than after the Kubernetes build.
	prevCommit, prevMissing := previousCommit(root)
	if prevMissing != nil {
		if testenv.InCI() {
			t.Fatalf("the upgrade and rollback steps need the previous release %s in the repository: %v (CI=true: fetch the history, e.g. actions/checkout with fetch-depth: 0)", previousRelease, prevMissing)
		}
		t.Logf("previous release %s not available (%v): installing the current release directly and skipping the upgrade and rollback steps", previousRelease, prevMissing)
	}
	bins := buildBinaries(t)
	s.bins = bins
	grow := filepath.Join(s.workDir, "ext4grow")
	buildLocal(t, ".", "./cmd/ext4grow", grow, "-s -w")
	g := buildGuest(t, grow)
	s.chaincheck = filepath.Join(s.workDir, "chaincheck")
	buildLocal(t, ".", "./cmd/chaincheck", s.chaincheck, "-s -w")
	pause := filepath.Join(s.workDir, "pause")
	buildLocal(t, ".", "./cmd/pause", pause, "-s -w")
	plugin := filepath.Join(s.workDir, "boxlite-csi")
	buildLocal(t, root, "./cmd/boxlite-csi", plugin, "-s -w -X main.version=e2e")
	pluginTar := filepath.Join(s.workDir, "plugin.tar")
	runCmd(t, root, goEnv(), "go", "run", "./hack/image", "-binary", plugin,
		"-image", pluginImageRepo+":"+pluginImageTag, "-version", "e2e", "-out", pluginTar)
	s.current = release{name: "current", chart: filepath.Join(root, "charts", "boxlite-csi"), tag: pluginImageTag, version: "e2e"}
	var prevTar string
	if prevMissing == nil {
		var prev release
		prev, prevTar = buildPrevious(t, root, prevCommit)
		s.previous = &prev
	}
	t.Logf("built everything in %s", time.Since(start).Round(time.Second))

	s.c = startCluster(t, bins)
	c := s.c
	t.Logf("cluster up after %s", time.Since(start).Round(time.Second))

	archives := map[string]string{pluginImageRepo + ":" + pluginImageTag: pluginTar}
	if s.previous != nil {
		archives[pluginImageRepo+":"+s.previous.tag] = prevTar
	}
	for ref, img := range map[string]func() string{
		"docker.io/" + pauseImage: func() string {
			p := filepath.Join(s.workDir, "pause.tar")
			writeArchive(t, staticBinaryImage(t, pause, "pause"), "docker.io/"+pauseImage, p)
			return p
		},
		snapshotterRepo + ":" + snapshotterTag: func() string {
			p := filepath.Join(s.workDir, "snapshotter.tar")
			writeArchive(t, staticBinaryImage(t, filepath.Join(bins.snapshotter, "csi-snapshotter"), "csi-snapshotter"), snapshotterRepo+":"+snapshotterTag, p)
			return p
		},
		provisionerRepo + ":" + provisionerTag: func() string {
			p := filepath.Join(s.workDir, "provisioner.tar")
			writeArchive(t, staticBinaryImage(t, bins.provisioner, "csi-provisioner"), provisionerRepo+":"+provisionerTag, p)
			return p
		},
		"docker.io/" + toolsImage: func() string {
			p := filepath.Join(s.workDir, "tools.tar")
			writeArchive(t, buildToolsImage(t, s.chaincheck, g), "docker.io/"+toolsImage, p)
			return p
		},
	} {
		archives[ref] = img()
	}
	for ref, p := range archives {
		c.ctr("images", "import", p)
		if out := c.ctr("images", "ls", "-q", "name=="+ref); strings.TrimSpace(out) != ref {
			t.Fatalf("image %s not in containerd after import: %q", ref, out)
		}
	}
	s.image1 = c.registry + "/e2e/busybox:1"
	s.image2 = c.registry + "/e2e/busybox:two"
	s.digest1 = pushImage(t, rootfsImage(t, "one"), s.image1)
	s.digest2 = pushImage(t, rootfsImage(t, "two"), s.image2)
	t.Logf("images ready after %s", time.Since(start).Round(time.Second))

	type step struct {
		name string
		fn   func(*testing.T)
	}
	steps := []step{
		{"PVCPod", s.testPVCPod},
		{"Ephemeral", s.testEphemeral},
		{"SharedBase", s.testSharedBase},
		{"DeleteLifecycle", s.testDeleteLifecycle},
		{"PluginRestart", s.testPluginRestart},
		{"MicroVM", s.testMicroVM},
		{"Snapshots", s.testSnapshots},
	}
	if s.previous != nil {
		// The previous release goes in first and makes boxes in its own
		// layout; the upgrade carries them over, every other step runs on
		// the current release, and the rollback and roll-forward come
		// last, when the home holds boxes of both layouts.
		s.install(t, *s.previous)
		steps = append([]step{{"Previous", s.testPrevious}, {"Upgrade", s.testUpgrade}}, steps...)
		steps = append(steps, step{"Rollback", s.testRollback}, step{"RollForward", s.testRollForward})
	} else {
		s.install(t, s.current)
		t.Run("Upgrade", func(t *testing.T) {
			testenv.Unmet(t, "previous release %s not in the repository: %v", previousRelease, prevMissing)
		})
	}
	t.Logf("plugin installed after %s", time.Since(start).Round(time.Second))

	for _, st := range steps {
		stepStart := time.Now()
		if !t.Run(st.name, st.fn) {
			// Later steps reuse what earlier ones left; the cluster's
			// state is dumped by the clean-up.
			t.Logf("%s failed; continuing with the next step", st.name)
		}
		t.Logf("%s took %s", st.name, time.Since(stepStart).Round(time.Second))
	}
}

// install runs helm install of a release's chart with the locally built
// images; only the sidecars that cannot be built here are off.
func (s *suite) install(t *testing.T, rel release) {
	c := s.c
	c.kubectl(t, "create", "namespace", testNamespace)
	// No kube-proxy on this node, so the ClusterIP of the kubernetes
	// Service that in-cluster configuration dials is unreachable; the
	// provisioner gets the API server's address through a kubeconfig in its
	// socket directory (a hostPath the chart already mounts at /csi), still
	// authenticating as its own ServiceAccount.
	sockDir := filepath.Join(c.kubeletDir, "plugins", driverName)
	if err := os.MkdirAll(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	c.pki.tokenKubeconfig(t, filepath.Join(sockDir, "e2e-kubeconfig"), "https://"+apiserverAddr)
	args := append([]string{"install", releaseName, rel.chart,
		"-n", pluginNamespace, "--create-namespace", "--wait", "--timeout", "5m"}, s.values(t, rel)...)
	out := s.helm(t, args...)
	t.Logf("helm install of the %s release:\n%s", rel.name, tail(out, 1500))
	// The plugin registers itself with kubelet; pods can mount only after.
	waitFor(t, "CSINode lists "+driverName, 90*time.Second, func() (bool, string) {
		out, _ := c.kubectlErr("get", "csinode", nodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		return strings.Contains(out, driverName), out
	})
	waitFor(t, "CSIStorageCapacity published", 90*time.Second, func() (bool, string) {
		out, _ := c.kubectlErr("get", "csistoragecapacities", "-n", pluginNamespace, "-o", "name")
		return strings.TrimSpace(out) != "", out
	})
}

// values are the --set arguments that install or upgrade rel with the
// locally built images and the settings the e2e cluster needs. Releases
// name some keys differently (git diff 64a22be HEAD -- charts/: the
// livenessprobe block became livenessProbe, inline.* is new), and each
// chart's schema refuses keys it does not know, so every release gets the
// names its own values.yaml has.
func (s *suite) values(t *testing.T, rel release) []string {
	t.Helper()
	c := s.c
	keys := chartKeys(t, rel.chart)
	probe := "livenessProbe"
	if !keys[probe] && keys["livenessprobe"] {
		probe = "livenessprobe"
	}
	if !keys[probe] {
		t.Fatalf("chart %s has neither livenessProbe nor livenessprobe in its values.yaml", rel.chart)
	}
	args := []string{
		"--set", "image.repository=" + pluginImageRepo, "--set", "image.tag=" + rel.tag, "--set", "image.pullPolicy=Never",
		"--set", "kubeletDir=" + c.kubeletDir, "--set", "home=" + c.home,
		"--set", "registrar.enabled=false", "--set", probe + ".enabled=false",
		"--set", "provisioner.enabled=true",
		"--set", "provisioner.image.repository=" + provisionerRepo, "--set", "provisioner.image.tag=" + provisionerTag,
		"--set", "provisioner.image.pullPolicy=Never",
		"--set", "provisioner.extraArgs[0]=--kubeconfig=/csi/e2e-kubeconfig",
		"--set", "provisioner.capacityPollInterval=10s",
		"--set", "storageClass.enabled=true", "--set", "storageClass.name=boxlite",
		"--set", "storageClass.image=" + s.image1, "--set", "storageClass.plainHTTP=true",
	}
	if keys["inline"] {
		// The e2e registry on 127.0.0.1 speaks plain HTTP, which inline
		// volumes may only ask for where the admin allows it. A release
		// without inline.* has no such restriction.
		args = append(args, "--set", "inline.allowInsecureRegistries=true")
	}
	return append(args, snapshotValues(keys)...)
}

// helm runs the helm the e2e built against the e2e cluster.
func (s *suite) helm(t *testing.T, args ...string) string {
	t.Helper()
	env := append(os.Environ(), "KUBECONFIG="+s.c.kubeconfig)
	return runCmd(t, s.root, env, s.bins.helm, args...)
}

// podYAML is a tools pod that mounts a box at /box and sleeps.
func podYAML(name, volume string, extra string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
spec:
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: tools
    image: %s
    imagePullPolicy: Never
    command: ["sleep", "100000"]
    volumeMounts:
    - {name: box, mountPath: /box}
%s  volumes:
  - name: box
%s`, name, testNamespace, toolsImage, extra, volume)
}

func claimVolume(pvc string) string {
	return fmt.Sprintf("    persistentVolumeClaim: {claimName: %s}\n", pvc)
}

func ephemeralVolume(class string) string {
	return fmt.Sprintf(`    ephemeral:
      volumeClaimTemplate:
        spec:
          storageClassName: %s
          accessModes: [ReadWriteOnce]
          resources: {requests: {storage: 1Gi}}
`, class)
}

// pvcYAML is a claim of size (a quantity such as 1Gi) in class.
func pvcYAML(name, class, size string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: %s
  namespace: %s
spec:
  storageClassName: %s
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: %s}}
`, name, testNamespace, class, size)
}

// The default (non-isolated) layout: shared/ rather than mounts/.
var boxDirs = []string{"disks", "sockets", "logs", "tmp", "shared", "base"}

// checkBox asserts what a pod sees at /box: the layout, box.json naming
// the image it was made from, and (through the static checker) an overlay
// whose backing chain resolves inside the pod to a base it cannot write.
// It returns the checker's output and the manifest.
func (s *suite) checkBox(t *testing.T, pod, image, digest string) (string, boxManifest) {
	t.Helper()
	c := s.c
	ls := c.mustExec(t, testNamespace, pod, "ls", "-a", "/box")
	for _, d := range append(boxDirs, "box.json") {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(d) + `$`).MatchString(ls) {
			t.Errorf("pod %s: /box lacks %s; has:\n%s", pod, d, ls)
		}
	}
	m := parseBoxJSON(t, c.mustExec(t, testNamespace, pod, "cat", "/box/box.json"))
	if m.Image != image || m.Digest != digest {
		t.Errorf("pod %s: box.json image %q digest %q, want %q %q", pod, m.Image, m.Digest, image, digest)
	}
	if m.Backing != "" && m.Backing != "../base/rootfs.ext4" {
		t.Errorf("pod %s: box.json backing %q", pod, m.Backing)
	}
	out, err := c.exec(testNamespace, pod, "/chaincheck", "-box", "/box")
	if err != nil || !strings.Contains(out, "CHAINCHECK OK") {
		t.Fatalf("pod %s: chain check failed: %v\n%s", pod, err, out)
	}
	// And from the shell, as a workload would try it.
	if out, err := c.exec(testNamespace, pod, "sh", "-c", "echo x >> /box/base/rootfs.ext4"); err == nil {
		t.Errorf("pod %s: appending to the base succeeded:\n%s", pod, out)
	} else if !strings.Contains(out, "Read-only file system") {
		t.Errorf("pod %s: appending to the base failed, but not as read-only: %s", pod, out)
	}
	return out, m
}

func (s *suite) testPVCPod(t *testing.T) {
	c := s.c
	sc := c.kubectl(t, "get", "storageclass", "boxlite", "-o", "jsonpath={.volumeBindingMode}")
	if sc != "WaitForFirstConsumer" {
		t.Fatalf("chart's StorageClass binding mode %q", sc)
	}
	c.apply(t, pvcYAML("box1", "boxlite", "1Gi"))
	// WaitForFirstConsumer: nothing is provisioned before a pod uses it.
	time.Sleep(2 * time.Second)
	if ph := c.jsonpath(testNamespace, "pvc/box1", "{.status.phase}"); ph != "Pending" {
		t.Fatalf("claim box1 is %q before any pod uses it, want Pending", ph)
	}
	c.apply(t, podYAML("pod1", claimVolume("box1"), ""))
	c.waitRunning(t, testNamespace, "pod1", 5*time.Minute)
	out, m := s.checkBox(t, "pod1", s.image1, s.digest1)
	t.Logf("pod1 chain check:\n%s", out)
	vol := c.pvVolume(t, testNamespace, "box1")
	if m.VolumeID != vol {
		t.Errorf("box.json volumeID %q, PV handle %q", m.VolumeID, vol)
	}
	// The box is a directory on the node under <home>/boxes.
	if _, err := os.Stat(filepath.Join(c.home, "boxes", vol, "disks", "guest-rootfs.qcow2")); err != nil {
		t.Errorf("box of %s not on the node: %v", vol, err)
	}
	logs := c.pluginLogs(t)
	for _, want := range []string{"Created volume", "Building base disk", "Installed base disk", "Staged volume", "Published volume"} {
		if countLines(logs, want) == 0 {
			t.Errorf("plugin log has no %q line", want)
		}
	}
}

func (s *suite) testEphemeral(t *testing.T) {
	c := s.c
	c.apply(t, podYAML("generic", ephemeralVolume("boxlite"), ""))
	inline := fmt.Sprintf(`    csi:
      driver: %s
      volumeAttributes: {image: %q, plainHTTP: "true"}
`, driverName, s.image2)
	c.apply(t, podYAML("inline", inline, ""))
	c.waitRunning(t, testNamespace, "generic", 5*time.Minute)
	c.waitRunning(t, testNamespace, "inline", 5*time.Minute)
	_, m := s.checkBox(t, "generic", s.image1, s.digest1)
	if m.Ephemeral {
		t.Errorf("generic ephemeral volume's box.json says ephemeral (it is a PVC underneath)")
	}
	// The generic volume's claim is named after the pod and owned by it.
	if owner := c.jsonpath(testNamespace, "pvc/generic-box", "{.metadata.ownerReferences[0].name}"); owner != "generic" {
		t.Errorf("claim generic-box owned by %q, want pod generic", owner)
	}
	_, m = s.checkBox(t, "inline", s.image2, s.digest2)
	if !m.Ephemeral {
		t.Errorf("inline volume's box.json does not say ephemeral")
	}
	inlineVol := m.VolumeID
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "generic", "inline", "--wait=true")
	c.waitGone(t, testNamespace, "pvc/generic-box", 2*time.Minute)
	// An inline box lives and dies with its pod.
	waitFor(t, "inline box removed from the node", time.Minute, func() (bool, string) {
		_, err := os.Stat(filepath.Join(c.home, "boxes", inlineVol))
		return os.IsNotExist(err), fmt.Sprint(err)
	})
}

func (s *suite) testSharedBase(t *testing.T) {
	c := s.c
	// A StorageClass for an image no box uses yet: the build this step
	// counts happens here, whatever earlier steps did.
	image3 := c.registry + "/e2e/busybox:shared"
	digest3 := pushImage(t, rootfsImage(t, "shared-"+randomHex(4)), image3)
	c.apply(t, fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: boxlite-shared}
provisioner: %s
parameters: {image: %q, plainHTTP: "true"}
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
`, driverName, image3))
	before := c.pluginLogs(t)
	builds0, installs0 := countLines(before, "Building base disk"), countLines(before, "Installed base disk")
	// Both pods at once, so the second one has to join or reuse the first
	// one's build rather than run its own.
	c.apply(t, podYAML("shared-a", ephemeralVolume("boxlite-shared"), "")+"---\n"+podYAML("shared-b", ephemeralVolume("boxlite-shared"), ""))
	c.waitRunning(t, testNamespace, "shared-a", 5*time.Minute)
	c.waitRunning(t, testNamespace, "shared-b", 5*time.Minute)
	outA, mA := s.checkBox(t, "shared-a", image3, digest3)
	outB, mB := s.checkBox(t, "shared-b", image3, digest3)
	after := c.pluginLogs(t)
	builds, installs := countLines(after, "Building base disk")-builds0, countLines(after, "Installed base disk")-installs0
	t.Logf("base builds for two pods: %d started, %d installed", builds, installs)
	if builds != 1 || installs != 1 {
		t.Errorf("two pods on one image: %d builds started, %d installed; want exactly 1", builds, installs)
	}
	if mA.VolumeID == mB.VolumeID {
		t.Fatalf("both pods got box %s", mA.VolumeID)
	}
	inode := regexp.MustCompile(`base dev (\d+) ino (\d+)`)
	ia, ib := inode.FindStringSubmatch(outA), inode.FindStringSubmatch(outB)
	if ia == nil || ib == nil || ia[2] != ib[2] {
		t.Errorf("the two boxes' bases are different files: %v vs %v", ia, ib)
	}
	// Two overlays on the node, one base behind both.
	for _, v := range []string{mA.VolumeID, mB.VolumeID} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(c.home, "boxes", v, "disks", "guest-rootfs.qcow2"), &st); err != nil {
			t.Errorf("overlay of %s: %v", v, err)
		}
	}
	// Only the .ext4 files: each base has its record (a .json) beside it.
	bases, _ := filepath.Glob(filepath.Join(c.home, "images", "disk-images", "sha256-"+strings.TrimPrefix(digest3, "sha256:")+".*.ext4"))
	if len(bases) != 1 {
		t.Errorf("cache has %v for %s, want one base", bases, digest3)
	}
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "shared-a", "shared-b", "--wait=true")
}

func (s *suite) testDeleteLifecycle(t *testing.T) {
	c := s.c
	vol := c.pvVolume(t, testNamespace, "box1")
	pv := c.jsonpath(testNamespace, "pvc/box1", "{.spec.volumeName}")
	box := filepath.Join(c.home, "boxes", vol)
	count := func(what string) int {
		n := 0
		for _, l := range strings.Split(c.pluginLogs(t), "\n") {
			if strings.Contains(l, what) && strings.Contains(l, vol) {
				n++
			}
		}
		return n
	}
	unpub0, unstage0, del0 := count(`"Unpublished volume"`), count(`"Unstaged volume"`), count(`"Deleted volume"`)
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "pod1", "--wait=true")
	waitFor(t, "NodeUnpublish and NodeUnstage of "+vol, 2*time.Minute, func() (bool, string) {
		return count(`"Unpublished volume"`) > unpub0 && count(`"Unstaged volume"`) > unstage0, ""
	})
	for _, mp := range mountsUnder(c.kubeletDir) {
		if strings.Contains(mp, pv) || strings.Contains(mp, vol) {
			t.Errorf("still mounted after the pod is gone: %s", mp)
		}
	}
	if len(mountsUnder(box)) != 0 {
		t.Errorf("box %s still has mounts: %v", vol, mountsUnder(box))
	}
	// Unpublished is not deleted: the claim still owns the box.
	if _, err := os.Stat(filepath.Join(box, "box.json")); err != nil {
		t.Fatalf("box gone before its claim: %v", err)
	}
	c.kubectl(t, "delete", "pvc", "-n", testNamespace, "box1", "--wait=true")
	c.waitGone(t, "", "pv/"+pv, 2*time.Minute)
	if count(`"Deleted volume"`) <= del0 {
		t.Errorf("PV %s is gone but the plugin logged no DeleteVolume for %s", pv, vol)
	}
	if _, err := os.Stat(box); !os.IsNotExist(err) {
		t.Errorf("box %s still on the node: %v", box, err)
	}
}

func (s *suite) testPluginRestart(t *testing.T) {
	c := s.c
	c.apply(t, pvcYAML("keep", "boxlite", "1Gi"))
	c.apply(t, podYAML("keeper", claimVolume("keep"), ""))
	c.waitRunning(t, testNamespace, "keeper", 5*time.Minute)
	_, m := s.checkBox(t, "keeper", s.image1, s.digest1)
	written := "written-before-restart-" + randomHex(4)
	c.mustExec(t, testNamespace, "keeper", "sh", "-c", "echo "+written+" > /box/tmp/e2e-write; sync")

	old := s.c.pluginPod(t)
	c.kubectl(t, "delete", "pod", "-n", pluginNamespace, old, "--wait=true")
	// While no plugin serves the node, the running pod keeps its box.
	out := c.mustExec(t, testNamespace, "keeper", "cat", "/box/tmp/e2e-write")
	if strings.TrimSpace(out) != written {
		t.Errorf("with the plugin gone, keeper reads %q", out)
	}
	if out, err := c.exec(testNamespace, "keeper", "/chaincheck"); err != nil {
		t.Errorf("with the plugin gone, keeper's chain no longer resolves: %v\n%s", err, out)
	}
	waitFor(t, "a new plugin pod", 2*time.Minute, func() (bool, string) {
		out, _ := c.kubectlErr("get", "pods", "-n", pluginNamespace, "-o", `jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.containerStatuses[*].ready}{"\n"}{end}`)
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && f[0] != old && f[1] == "Running" && !strings.Contains(l, "false") {
				return true, out
			}
		}
		return false, out
	})
	waitFor(t, "plugin registered again", time.Minute, func() (bool, string) {
		out, _ := c.kubectlErr("get", "csinode", nodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		return strings.Contains(out, driverName), out
	})
	s.checkBox(t, "keeper", s.image1, s.digest1)

	// A new pod after the restart gets a new box.
	c.apply(t, pvcYAML("fresh", "boxlite", "1Gi"))
	c.apply(t, podYAML("fresh", claimVolume("fresh"), ""))
	c.waitRunning(t, testNamespace, "fresh", 5*time.Minute)
	_, mf := s.checkBox(t, "fresh", s.image1, s.digest1)
	if mf.VolumeID == m.VolumeID {
		t.Errorf("the new pod got the old box %s", m.VolumeID)
	}
	if out, err := c.exec(testNamespace, "fresh", "cat", "/box/tmp/e2e-write"); err == nil {
		t.Errorf("a new box has the old box's write: %s", out)
	}

	// The old pod, recreated on its claim, gets its old box and its write.
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "keeper", "--wait=true")
	c.apply(t, podYAML("keeper", claimVolume("keep"), ""))
	c.waitRunning(t, testNamespace, "keeper", 5*time.Minute)
	_, m2 := s.checkBox(t, "keeper", s.image1, s.digest1)
	if m2.VolumeID != m.VolumeID {
		t.Errorf("recreated pod got box %s, want its old box %s", m2.VolumeID, m.VolumeID)
	}
	if out := c.mustExec(t, testNamespace, "keeper", "cat", "/box/tmp/e2e-write"); strings.TrimSpace(out) != written {
		t.Errorf("recreated pod reads %q from its box, want %q", out, written)
	}
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "keeper", "--wait=true")
}
