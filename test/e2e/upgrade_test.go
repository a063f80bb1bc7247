package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// The upgrade and rollback steps start from this release: the last one
// whose box.json in the box is the volume record and whose base file is
// bind-mounted onto itself. The working tree is the release it upgrades
// to, with the record under <home>/volumes and base/ and box.json mounted
// read-only from plugin-owned files there.
const (
	previousRelease  = "64a22be"
	previousImageTag = "previous"
	upgradeClass     = "boxlite-upgrade"
	// markFile is where each pod of the upgrade scenario appends a line
	// for every phase it lives through, relative to its box.
	markFile = "tmp/e2e-upgrade"
)

// release is one version of the plugin: its chart and its image.
type release struct {
	name    string // "previous" or "current", for messages
	chart   string // the chart directory
	tag     string // the plugin image's tag under pluginImageRepo
	version string // what the plugin logs as its version
}

// upgradeState is what the upgrade scenario's steps hand on to each other.
type upgradeState struct {
	image, digest string
	revision      int               // the previous release's helm revision
	vols          map[string]string // pod -> volume ID
	marks         map[string][]string
}

// previousCommit resolves previousRelease to a full commit hash, or says
// why it cannot (no git, or a shallow clone without that commit).
func previousCommit(root string) (string, error) {
	cmd := exec.Command("git", "-c", "safe.directory="+root, "-C", root, "rev-parse", "--verify", "--quiet", previousRelease+"^{commit}")
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git rev-parse %s in %s: %v (a shallow clone?)", previousRelease, root, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// buildPrevious builds the previous release's plugin and image from its
// own sources, with its own hack/image, and returns the release and the
// image archive. A commit never changes, so the build is cached.
func buildPrevious(t *testing.T, root, commit string) (release, string) {
	t.Helper()
	bin := cached(t, "boxlite-csi-"+commit, func(dir string) {
		src := filepath.Join(dir, "src")
		if err := os.MkdirAll(src, 0o755); err != nil {
			t.Fatal(err)
		}
		// git archive only reads the repository; the working tree and the
		// index are someone else's.
		archive := filepath.Join(dir, "src.tar")
		runCmd(t, root, nil, "git", "-c", "safe.directory="+root, "-C", root, "archive", "-o", archive, commit)
		runCmd(t, src, nil, "tar", "-xf", archive)
		if err := os.Remove(archive); err != nil {
			t.Fatal(err)
		}
		plugin := filepath.Join(dir, "bin", "boxlite-csi")
		buildLocal(t, src, "./cmd/boxlite-csi", plugin, "-s -w -X main.version="+previousImageTag)
		runCmd(t, src, goEnv(), "go", "run", "./hack/image", "-binary", plugin,
			"-image", pluginImageRepo+":"+previousImageTag, "-version", previousImageTag,
			"-out", filepath.Join(dir, "bin", "plugin.tar"))
	})
	rel := release{
		name:    "previous (" + previousRelease + ")",
		chart:   filepath.Join(filepath.Dir(bin), "src", "charts", "boxlite-csi"),
		tag:     previousImageTag,
		version: previousImageTag,
	}
	return rel, filepath.Join(bin, "plugin.tar")
}

// chartKeys are the top-level keys of a chart's values.yaml.
func chartKeys(t testing.TB, chart string) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chart, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^([A-Za-z][A-Za-z0-9]*):`).FindAllStringSubmatch(string(b), -1) {
		keys[m[1]] = true
	}
	return keys
}

func (s *suite) helmRevision(t *testing.T) int {
	t.Helper()
	var st struct {
		Version int `json:"version"`
	}
	out := s.helm(t, "status", releaseName, "-n", pluginNamespace, "-o", "json")
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Version == 0 {
		t.Fatalf("helm status %s: %v\n%s", releaseName, err, tail(out, 2000))
	}
	return st.Version
}

// upgrade moves the release to rel with helm upgrade and returns the new
// plugin pod once it serves.
func (s *suite) upgrade(t *testing.T, rel release) string {
	t.Helper()
	old := s.c.pluginPod(t)
	args := append([]string{"upgrade", releaseName, rel.chart, "-n", pluginNamespace, "--wait", "--timeout", "5m"}, s.values(t, rel)...)
	out := s.helm(t, args...)
	t.Logf("helm upgrade to the %s release:\n%s", rel.name, tail(out, 600))
	return s.waitPlugin(t, rel, old)
}

// waitPlugin waits until the only plugin pod is a new one (not old) that
// runs rel's image, is ready, and has registered with kubelet: helm's
// --wait only knows that the DaemonSet rolled out, not that the plugin
// behind it serves CSI yet.
func (s *suite) waitPlugin(t *testing.T, rel release, old string) string {
	t.Helper()
	c := s.c
	want := pluginImageRepo + ":" + rel.tag
	var name string
	waitFor(t, "the "+rel.name+" release's plugin pod ("+want+") serving", 3*time.Minute, func() (bool, string) {
		out, err := c.kubectlErr("get", "pods", "-n", pluginNamespace, "-l", "app.kubernetes.io/name=boxlite-csi", "-o", "json")
		if err != nil {
			return false, out
		}
		var list struct {
			Items []struct {
				Metadata struct {
					Name              string  `json:"name"`
					DeletionTimestamp *string `json:"deletionTimestamp"`
				} `json:"metadata"`
				Spec struct {
					Containers []struct{ Name, Image string } `json:"containers"`
				} `json:"spec"`
				Status struct {
					Phase             string `json:"phase"`
					ContainerStatuses []struct {
						Name  string `json:"name"`
						Ready bool   `json:"ready"`
					} `json:"containerStatuses"`
				} `json:"status"`
			} `json:"items"`
		}
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			return false, err.Error()
		}
		if len(list.Items) != 1 {
			var names []string
			for _, p := range list.Items {
				names = append(names, p.Metadata.Name)
			}
			return false, fmt.Sprintf("plugin pods %v", names)
		}
		p := list.Items[0]
		image := ""
		for _, ct := range p.Spec.Containers {
			if ct.Name == "boxlite-csi" {
				image = ct.Image
			}
		}
		ready := len(p.Status.ContainerStatuses) > 0
		for _, cs := range p.Status.ContainerStatuses {
			ready = ready && cs.Ready
		}
		detail := fmt.Sprintf("pod %s image %s phase %s ready %v", p.Metadata.Name, image, p.Status.Phase, ready)
		if p.Metadata.Name == old || p.Metadata.DeletionTimestamp != nil || image != want || p.Status.Phase != "Running" || !ready {
			return false, detail
		}
		logs, _ := c.kubectlErr("logs", "-n", pluginNamespace, p.Metadata.Name, "-c", "boxlite-csi")
		if !strings.Contains(logs, "Registered with kubelet") {
			return false, detail + ", not registered with kubelet yet"
		}
		if len(matching(logs, `"Serving CSI"`, `version="`+rel.version+`"`)) == 0 {
			return false, detail + ", not serving CSI as version " + rel.version
		}
		name = p.Metadata.Name
		return true, detail
	})
	t.Logf("plugin pod %s of the %s release serves", name, rel.name)
	return name
}

// podLog is the plugin container's log of one plugin pod.
func (s *suite) podLog(t *testing.T, pod string) string {
	t.Helper()
	return s.c.kubectl(t, "logs", "-n", pluginNamespace, pod, "-c", "boxlite-csi")
}

func storageClassYAML(name, image string) string {
	return fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: %s}
provisioner: %s
parameters: {image: %q, plainHTTP: "true"}
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
`, name, driverName, image)
}

func inlineVolume(image string) string {
	return fmt.Sprintf(`    csi:
      driver: %s
      volumeAttributes: {image: %q, plainHTTP: "true"}
`, driverName, image)
}

// mark appends a line naming pod and phase to the pod's mark file and
// remembers it, so that later checks know exactly what the box must hold.
func (s *suite) mark(t *testing.T, pod, phase string) {
	t.Helper()
	vol := s.upg.vols[pod]
	line := fmt.Sprintf("%s %s %s", pod, phase, randomHex(4))
	s.c.mustExec(t, testNamespace, pod, "sh", "-c", fmt.Sprintf("echo %q >> /box/%s && sync", line, markFile))
	s.upg.marks[vol] = append(s.upg.marks[vol], line)
}

func (s *suite) wantMarks(pod string) string {
	return strings.Join(s.upg.marks[s.upg.vols[pod]], "\n") + "\n"
}

// checkMarks reads the pod's mark file through its box.
func (s *suite) checkMarks(t *testing.T, pod string) {
	t.Helper()
	out, err := s.c.exec(testNamespace, pod, "cat", "/box/"+markFile)
	if want := s.wantMarks(pod); err != nil || out != want {
		t.Errorf("pod %s (volume %s): /box/%s reads %q (%v), want %q", pod, s.upg.vols[pod], markFile, out, err, want)
	}
}

// checkMarksOnNode reads a volume's mark file from its box on the node.
func (s *suite) checkMarksOnNode(t *testing.T, vol string) {
	t.Helper()
	p := filepath.Join(s.c.home, "boxes", vol, markFile)
	b, err := os.ReadFile(p)
	want := strings.Join(s.upg.marks[vol], "\n") + "\n"
	if err != nil || string(b) != want {
		t.Errorf("volume %s: %s reads %q (%v), want %q", vol, p, b, err, want)
	}
}

// checkAlive asserts that a pod still runs the container it started with.
func (s *suite) checkAlive(t *testing.T, pod string) {
	t.Helper()
	got := s.c.jsonpath(testNamespace, "pod/"+pod, "{.status.phase} {.status.containerStatuses[0].ready} {.status.containerStatuses[0].restartCount}")
	if got != "Running true 0" {
		t.Errorf("pod %s: phase, ready, restarts %q, want \"Running true 0\":\n%s", pod, got, s.c.describe(testNamespace, "pod/"+pod))
	}
}

// checkWorking asserts that a running pod still reads everything it wrote
// and can write more, and that its backing chain still resolves.
func (s *suite) checkWorking(t *testing.T, pod, phase string) {
	t.Helper()
	s.checkAlive(t, pod)
	s.checkMarks(t, pod)
	s.mark(t, pod, phase)
	s.checkMarks(t, pod)
	if out, err := s.c.exec(testNamespace, pod, "/chaincheck", "-box", "/box"); err != nil || !strings.Contains(out, "CHAINCHECK OK") {
		t.Errorf("pod %s: chain check failed after %s: %v\n%s", pod, phase, err, out)
	}
}

// podMounts maps each mount point the pod sees to its mount options.
func (s *suite) podMounts(t *testing.T, pod string) map[string]string {
	t.Helper()
	out := s.c.mustExec(t, testNamespace, pod, "cat", "/proc/self/mountinfo")
	m := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 5 {
			m[f[4]] = f[5]
		}
	}
	return m
}

func readOnly(opts string) bool {
	for _, o := range strings.Split(opts, ",") {
		if o == "ro" {
			return true
		}
	}
	return false
}

// checkPreviousLayout asserts that a box is the previous release's: no
// record under volumes/, the base file bind-mounted read-only onto itself.
func (s *suite) checkPreviousLayout(t *testing.T, pod string) {
	t.Helper()
	vol := s.upg.vols[pod]
	if _, err := os.Lstat(filepath.Join(s.c.home, "volumes", vol+".json")); !os.IsNotExist(err) {
		t.Errorf("pod %s: the previous release left a record for volume %s under volumes/ (%v): is %s the previous release?", pod, vol, err, previousRelease)
	}
	mounts := s.podMounts(t, pod)
	if opts, ok := mounts["/box/base/rootfs.ext4"]; !ok || !readOnly(opts) {
		t.Errorf("pod %s: /box/base/rootfs.ext4 mounted %v with %q, want the previous release's read-only mount of the base file; mounts under /box: %v", pod, ok, opts, boxMountsOf(mounts))
	}
}

// checkCurrentLayout asserts that a box is staged the current release's
// way: base/ and box.json read-only mounts of plugin-owned files, no
// mount left on the base file itself, box.json readable and the box's,
// and the record and owned files under volumes/ on the node.
func (s *suite) checkCurrentLayout(t *testing.T, pod string) {
	t.Helper()
	vol := s.upg.vols[pod]
	mounts := s.podMounts(t, pod)
	for _, mp := range []string{"/box/base", "/box/box.json"} {
		if opts, ok := mounts[mp]; !ok || !readOnly(opts) {
			t.Errorf("pod %s (volume %s): %s mounted %v with %q, want a read-only mount; mounts under /box: %v", pod, vol, mp, ok, opts, boxMountsOf(mounts))
		}
	}
	if _, ok := mounts["/box/base/rootfs.ext4"]; ok {
		t.Errorf("pod %s (volume %s): the previous release's mount on /box/base/rootfs.ext4 is still there under the new base mount", pod, vol)
	}
	out, err := s.c.exec(testNamespace, pod, "cat", "/box/box.json")
	if err != nil {
		t.Errorf("pod %s: cannot read /box/box.json: %v\n%s", pod, err, out)
	} else if m := parseBoxJSON(t, out); m.VolumeID != vol || m.Digest != s.upg.digest {
		t.Errorf("pod %s: /box/box.json names volume %q digest %q, want %q %q", pod, m.VolumeID, m.Digest, vol, s.upg.digest)
	}
	for _, p := range []string{vol + ".json", vol + ".box.json", vol + ".base/rootfs.ext4"} {
		if _, err := os.Lstat(filepath.Join(s.c.home, "volumes", p)); err != nil {
			t.Errorf("pod %s (volume %s): %v", pod, vol, err)
		}
	}
}

func boxMountsOf(m map[string]string) []string {
	var out []string
	for mp, opts := range m {
		if testenv.Within(mp, "/box") {
			out = append(out, mp+" "+opts)
		}
	}
	sort.Strings(out)
	return out
}

// startPods applies the pods (name -> volume) and waits for all of them,
// then checks each box, records its volume and writes the first mark.
func (s *suite) startPods(t *testing.T, phase string, pods [][2]string) {
	t.Helper()
	var manifests []string
	for _, p := range pods {
		manifests = append(manifests, podYAML(p[0], p[1], ""))
	}
	s.c.apply(t, strings.Join(manifests, "---\n"))
	for _, p := range pods {
		s.c.waitRunning(t, testNamespace, p[0], 5*time.Minute)
	}
	for _, p := range pods {
		_, m := s.checkBox(t, p[0], s.upg.image, s.upg.digest)
		if old, ok := s.upg.vols[p[0]]; ok && old != m.VolumeID {
			t.Errorf("pod %s got box %s, want its old box %s", p[0], m.VolumeID, old)
		}
		s.upg.vols[p[0]] = m.VolumeID
		s.mark(t, p[0], phase)
	}
}

// recreate deletes a pod and starts it again on the same volume.
func (s *suite) recreate(t *testing.T, pod, volume string) {
	t.Helper()
	s.c.kubectl(t, "delete", "pod", "-n", testNamespace, pod, "--wait=true")
	s.c.apply(t, podYAML(pod, volume, ""))
	s.c.waitRunning(t, testNamespace, pod, 3*time.Minute)
}

// homeState lists what the home holds besides the cache: every entry of
// boxes/ (dot-entries of half-done creates and deletes included), every
// entry of volumes/, and every mount.
func (s *suite) homeState() (boxes, records, mounts []string) {
	list := func(dir string) []string {
		ents, _ := os.ReadDir(dir)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return names
	}
	return list(filepath.Join(s.c.home, "boxes")), list(filepath.Join(s.c.home, "volumes")), mountsUnder(s.c.home)
}

func (s *suite) logHome(t *testing.T, when string) {
	t.Helper()
	b, r, m := s.homeState()
	t.Logf("home %s:\n  boxes/   %v\n  volumes/ %v\n  mounts   %v", when, b, r, m)
}

// matching is the lines of log that contain every one of substrs.
func matching(log string, substrs ...string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		ok := l != ""
		for _, s := range substrs {
			ok = ok && strings.Contains(l, s)
		}
		if ok {
			out = append(out, l)
		}
	}
	return out
}

func (s *suite) events(obj string) string {
	out, _ := s.c.kubectlErr("get", "events", "-A", "--field-selector", "involvedObject.name="+obj,
		"-o", `jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}`)
	return out
}

// testPrevious runs on the previous release: a pod on a PVC, one with a
// generic ephemeral volume and one with a CSI inline volume, each with a
// first line in its box, all in the previous release's layout.
func (s *suite) testPrevious(t *testing.T) {
	c := s.c
	u := &s.upg
	u.vols, u.marks = map[string]string{}, map[string][]string{}
	u.revision = s.helmRevision(t)
	// An image of its own, so that the base of the chart's StorageClass
	// image is built by the current release in PVCPod, as that step checks.
	u.image = c.registry + "/e2e/busybox:upgrade"
	u.digest = pushImage(t, rootfsImage(t, "upgrade"), u.image)
	c.apply(t, storageClassYAML(upgradeClass, u.image))
	c.apply(t, pvcYAML("upg", upgradeClass, "1Gi"))
	s.startPods(t, "previous", [][2]string{
		{"upg-pvc", claimVolume("upg")},
		{"upg-generic", ephemeralVolume(upgradeClass)},
		{"upg-inline", inlineVolume(u.image)},
	})
	for _, p := range []string{"upg-pvc", "upg-generic", "upg-inline"} {
		s.checkPreviousLayout(t, p)
	}
	s.logHome(t, "on the previous release")
}

// testUpgrade moves to the current release under the running pods.
func (s *suite) testUpgrade(t *testing.T) {
	c := s.c
	u := &s.upg
	plugin := s.upgrade(t, s.current)
	logs := s.podLog(t, plugin)
	// Start-up adopts every box of the previous release: its box.json
	// becomes the volume record under volumes/.
	for _, p := range []string{"upg-pvc", "upg-generic", "upg-inline"} {
		vol := u.vols[p]
		if len(matching(logs, "Adopted a box made by an earlier release", vol)) != 1 {
			t.Errorf("plugin %s did not log adopting volume %s of pod %s once:\n%s", plugin, vol, p, tail(logs, 3000))
		}
		if _, err := os.Stat(filepath.Join(c.home, "volumes", vol+".json")); err != nil {
			t.Errorf("pod %s: volume %s has no record after the upgrade: %v", p, vol, err)
		}
	}
	// The pods the previous release staged keep running through the
	// upgrade, and their boxes keep working.
	for _, p := range []string{"upg-pvc", "upg-generic", "upg-inline"} {
		s.checkWorking(t, p, "upgraded")
	}
	// The PVC pod, re-created, gets its old box with everything it wrote,
	// now staged the current release's way.
	s.recreate(t, "upg-pvc", claimVolume("upg"))
	_, m := s.checkBox(t, "upg-pvc", u.image, u.digest)
	if m.VolumeID != u.vols["upg-pvc"] {
		t.Errorf("re-created pod upg-pvc got box %s, want its old box %s", m.VolumeID, u.vols["upg-pvc"])
	}
	s.checkMarks(t, "upg-pvc")
	s.checkCurrentLayout(t, "upg-pvc")
	s.mark(t, "upg-pvc", "restaged")
	// New volumes on the current release, to be kept through the rollback.
	c.apply(t, pvcYAML("upg-new", upgradeClass, "1Gi"))
	s.startPods(t, "current", [][2]string{
		{"upg-new", claimVolume("upg-new")},
		{"upg-inline2", inlineVolume(u.image)},
	})
	s.checkCurrentLayout(t, "upg-new")
	s.checkCurrentLayout(t, "upg-inline2")
	s.logHome(t, "after the upgrade")
}

// testRollback goes back to the previous release's helm revision, with
// boxes of both layouts in the home and pods running on them. The
// previous release knows nothing of volumes/: it takes box.json in the box
// as the record, which the current release keeps writing in the format
// the previous one reads.
func (s *suite) testRollback(t *testing.T) {
	c := s.c
	u := &s.upg
	old := c.pluginPod(t)
	out := s.helm(t, "rollback", releaseName, fmt.Sprint(u.revision), "-n", pluginNamespace, "--wait", "--timeout", "5m")
	t.Logf("helm rollback to revision %d:\n%s", u.revision, tail(out, 600))
	plugin := s.waitPlugin(t, *s.previous, old)
	for _, p := range []string{"upg-pvc", "upg-generic", "upg-inline", "upg-new", "upg-inline2"} {
		s.checkWorking(t, p, "rolled-back")
	}
	s.logHome(t, "after the rollback")

	// The PVC pod, re-created, is unstaged and staged again by the
	// previous release, over a box the current release staged last: it
	// gets its box with everything it wrote, its base read-only.
	s.recreate(t, "upg-pvc", claimVolume("upg"))
	_, m := s.checkBox(t, "upg-pvc", u.image, u.digest)
	if m.VolumeID != u.vols["upg-pvc"] {
		t.Errorf("re-created pod upg-pvc got box %s on the previous release, want its old box %s", m.VolumeID, u.vols["upg-pvc"])
	}
	s.checkMarks(t, "upg-pvc")
	s.mark(t, "upg-pvc", "restaged-previous")
	t.Logf("pod upg-pvc's mounts, staged by the previous release: %v", boxMountsOf(s.podMounts(t, "upg-pvc")))

	// Volumes the current release made, deleted by the previous one. The
	// previous release does not know the base/ and box.json mounts the
	// current one made in their boxes, so its unstage leaves them and its
	// delete fails with EBUSY after renaming the box away: the claim's PV
	// goes (its retry finds no box), and boxes/.<id>.deleting stays, with
	// the records and plugin-owned files under volumes/, for the
	// roll-forward to clean up (README: rolling back). What must hold here:
	// no live box is left under the volume's name, and nothing else is hurt.
	pv := c.jsonpath(testNamespace, "pvc/upg-new", "{.spec.volumeName}")
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "upg-new", "upg-inline2", "--wait=true")
	c.kubectl(t, "delete", "pvc", "-n", testNamespace, "upg-new", "--wait=true")
	waitFor(t, "PV "+pv+" of volume "+u.vols["upg-new"]+" deleted by the previous release", 90*time.Second, func() (bool, string) {
		return c.jsonpath("", "pv/"+pv, "{.metadata.name}") == "", s.events(pv)
	})
	logs := s.podLog(t, plugin)
	for _, p := range []string{"upg-new", "upg-inline2"} {
		vol := u.vols[p]
		t.Logf("pod %s: what the previous release logged about %s:\n%s", p, vol, strings.Join(matching(logs, vol), "\n"))
		boxes, _, _ := s.homeState()
		for _, b := range boxes {
			switch b {
			case vol:
				t.Errorf("pod %s: volume %s deleted by the previous release, but its box boxes/%s is still live", p, vol, b)
			case "." + vol + ".deleting":
				t.Logf("pod %s: the previous release left boxes/%s (mounts of the current release inside), for the roll-forward", p, b)
			}
		}
		if _, err := os.Lstat(filepath.Join(c.home, "volumes", vol+".json")); err != nil {
			t.Errorf("pod %s: volume %s: want its record left under volumes/ by the previous release, which does not know it: %v", p, vol, err)
		}
	}
	s.logHome(t, "after the previous release deleted upg-new and upg-inline2")

	// A volume the previous release makes in a home the current one used.
	c.apply(t, pvcYAML("upg-back", upgradeClass, "1Gi"))
	s.startPods(t, "previous-again", [][2]string{{"upg-back", claimVolume("upg-back")}})
	s.checkPreviousLayout(t, "upg-back")
}

// testRollForward upgrades to the current release again: start-up adopts
// what the previous release made and removes what it left of volumes it
// deleted; then every box still has its data, and deleting every pod and
// claim leaves nothing in the home but the cache.
func (s *suite) testRollForward(t *testing.T) {
	c := s.c
	u := &s.upg
	plugin := s.upgrade(t, s.current)
	logs := s.podLog(t, plugin)
	t.Logf("current release's start-up after the rollback:\n%s", strings.Join(matching(logs, "driver.go"), "\n"))
	for _, p := range []string{"upg-new", "upg-inline2"} {
		vol := u.vols[p]
		if len(matching(logs, "Removed the record of a volume that has no box", vol)) != 1 {
			t.Errorf("pod %s: the current release did not log removing the record of %s, which the previous release deleted", p, vol)
		}
		_, records, _ := s.homeState()
		for _, r := range records {
			if strings.HasPrefix(r, vol+".") {
				t.Errorf("pod %s: volume %s was deleted, but volumes/%s is left after the roll-forward", p, vol, r)
			}
		}
	}
	if vol := u.vols["upg-back"]; len(matching(logs, "Adopted a box made by an earlier release", vol)) != 1 {
		t.Errorf("pod upg-back: the current release did not log adopting %s, made by the previous release after the rollback", vol)
	}
	// klog marks errors with an E in the first column.
	for _, l := range strings.Split(logs, "\n") {
		if strings.HasPrefix(l, "E") {
			t.Errorf("plugin %s logged an error at start-up after the rollback: %s", plugin, l)
		}
	}
	s.logHome(t, "after the roll-forward")
	for _, p := range []string{"upg-pvc", "upg-generic", "upg-inline", "upg-back"} {
		s.checkWorking(t, p, "rolled-forward")
		s.checkMarksOnNode(t, u.vols[p])
	}
	// Staged last by the previous release, the PVC pod's box is staged the
	// current release's way again.
	s.recreate(t, "upg-pvc", claimVolume("upg"))
	s.checkMarks(t, "upg-pvc")
	s.checkCurrentLayout(t, "upg-pvc")

	c.kubectl(t, "delete", "pod", "-n", testNamespace, "--all", "--wait=true")
	c.kubectl(t, "delete", "pvc", "-n", testNamespace, "--all", "--wait=true")
	waitFor(t, "every PV deleted", 2*time.Minute, func() (bool, string) {
		out, _ := c.kubectlErr("get", "pv", "-o", "name")
		return strings.TrimSpace(out) == "", out
	})
	waitFor(t, "no box, record or mount left in the home", time.Minute, func() (bool, string) {
		b, r, m := s.homeState()
		return len(b) == 0 && len(r) == 0 && len(m) == 0, fmt.Sprintf("boxes/ %v, volumes/ %v, mounts %v", b, r, m)
	})
}
