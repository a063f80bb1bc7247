package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The csi-snapshotter sidecar's image as the node's containerd knows it,
// and the VolumeSnapshotClass the chart makes in the e2e.
const (
	snapshotterRepo   = "registry.k8s.io/sig-storage/csi-snapshotter"
	snapshotterTag    = snapshotterVersion + "-e2e"
	snapshotClassName = "boxlite-snap"
	// managedByLabel is what snapshot-controller, with
	// --enable-distributed-snapshotting, puts on a VolumeSnapshotContent:
	// the node of its source volume, whose sidecar alone takes it.
	managedByLabel = "snapshot.storage.kubernetes.io/managed-by"
)

// startSnapshotController installs the VolumeSnapshot CRDs of
// snapshotterVersion and runs snapshot-controller beside the control
// plane, as kube-controller-manager runs: it is the cluster's part, which
// the chart expects to find. Distributed snapshotting is on, as the chart
// requires, so each content is labelled with its node. The controller has
// a system:masters certificate: its RBAC is the cluster's business, not
// the chart's, and is not what this test checks.
//
// All the CRDs go in, the group-snapshot ones too, as on a cluster that
// installed external-snapshotter whole: the sidecar must start there even
// though the chart gives it no access to them.
func (c *cluster) startSnapshotController(server string) {
	t := c.t
	ents, err := os.ReadDir(c.bins.snapshotCRDs)
	if err != nil {
		t.Fatal(err)
	}
	var crds []string
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".yaml") || name == "kustomization.yaml" {
			continue
		}
		// <group>_<plural>.yaml holds the CRD <plural>.<group>.
		group, plural, ok := strings.Cut(strings.TrimSuffix(name, ".yaml"), "_")
		if !ok {
			t.Fatalf("unexpected CRD file name %s in %s", name, c.bins.snapshotCRDs)
		}
		// create, not apply: the last-applied annotation of a large CRD
		// can pass the API server's annotation size limit.
		c.kubectl(t, "create", "-f", filepath.Join(c.bins.snapshotCRDs, name))
		crds = append(crds, "crd/"+plural+"."+group)
	}
	if len(crds) < 3 {
		t.Fatalf("only %v in %s", crds, c.bins.snapshotCRDs)
	}
	c.kubectl(t, append([]string{"wait", "--for=condition=Established", "--timeout=60s"}, crds...)...)
	c.start("snapshot-controller", nil, filepath.Join(c.bins.snapshotter, "snapshot-controller"),
		"--kubeconfig="+c.pki.kubeconfig(t, "snapshot-controller", server),
		"--enable-distributed-snapshotting", "--leader-election=false", "--v=3")
}

// snapshotValues are the chart values that turn the sidecar and the
// VolumeSnapshotClass on, for a chart that has them (the previous
// release's does not).
func snapshotValues(keys map[string]bool) []string {
	if !keys["snapshotter"] {
		return nil
	}
	return []string{
		"--set", "snapshotter.enabled=true",
		"--set", "snapshotter.image.repository=" + snapshotterRepo, "--set", "snapshotter.image.tag=" + snapshotterTag,
		"--set", "snapshotter.image.pullPolicy=Never",
		// The same way to the API server as the provisioner's.
		"--set", "snapshotter.extraArgs[0]=--kubeconfig=/csi/e2e-kubeconfig",
		"--set", "snapshotClass.create=true", "--set", "snapshotClass.name=" + snapshotClassName,
	}
}

func volumeSnapshotYAML(name, claim string) string {
	return fmt.Sprintf(`apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: %s, namespace: %s}
spec:
  volumeSnapshotClassName: %s
  source: {persistentVolumeClaimName: %s}
`, name, testNamespace, snapshotClassName, claim)
}

// pvcFromYAML is a 1Gi claim of the chart's class whose content comes
// from dataSource (a VolumeSnapshot or a PersistentVolumeClaim).
func pvcFromYAML(name, kind, source string) string {
	group := ""
	if kind == "VolumeSnapshot" {
		group = "apiGroup: snapshot.storage.k8s.io, "
	}
	return pvcYAML(name, "boxlite", "1Gi") + fmt.Sprintf("  dataSource: {%skind: %s, name: %s}\n", group, kind, source)
}

// snapshotObject is the part of a VolumeSnapshot or VolumeSnapshotContent
// the test reads.
type snapshotObject struct {
	Metadata struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Status *struct {
		BoundContent   *string `json:"boundVolumeSnapshotContentName"`
		ReadyToUse     *bool   `json:"readyToUse"`
		SnapshotHandle *string `json:"snapshotHandle"`
		RestoreSize    any     `json:"restoreSize"`
		Error          *struct {
			Message string `json:"message"`
		} `json:"error"`
	} `json:"status"`
}

func (s *snapshotObject) ready() bool {
	return s.Status != nil && s.Status.ReadyToUse != nil && *s.Status.ReadyToUse
}

func (s *snapshotObject) errorMessage() string {
	if s.Status == nil || s.Status.Error == nil {
		return ""
	}
	return s.Status.Error.Message
}

// getSnapshot reads a VolumeSnapshot (ns set) or a VolumeSnapshotContent.
func (s *suite) getSnapshot(t testing.TB, ns, obj string) (snapshotObject, error) {
	t.Helper()
	args := []string{"get", obj, "-o", "json"}
	if ns != "" {
		args = append(args, "-n", ns)
	}
	var o snapshotObject
	out, err := s.c.kubectlErr(args...)
	if err != nil {
		return o, err
	}
	if err := json.Unmarshal([]byte(out), &o); err != nil {
		t.Fatalf("%s: %v\n%s", obj, err, out)
	}
	return o, nil
}

// waitSnapshotContent waits until VolumeSnapshot name is bound to a
// content, and returns the content's name.
func (s *suite) waitSnapshotContent(t testing.TB, name string) string {
	t.Helper()
	var content string
	waitFor(t, "VolumeSnapshot "+name+" bound to a content", 2*time.Minute, func() (bool, string) {
		vs, err := s.getSnapshot(t, testNamespace, "volumesnapshot/"+name)
		if err != nil {
			return false, err.Error()
		}
		if vs.Status == nil || vs.Status.BoundContent == nil || *vs.Status.BoundContent == "" {
			return false, fmt.Sprintf("status %+v", vs.Status)
		}
		content = *vs.Status.BoundContent
		return true, ""
	})
	return content
}

// waitSnapshotReady waits until VolumeSnapshot name is ready to use and
// returns its content.
func (s *suite) waitSnapshotReady(t testing.TB, name string, timeout time.Duration) snapshotObject {
	t.Helper()
	content := s.waitSnapshotContent(t, name)
	var vc snapshotObject
	waitFor(t, "VolumeSnapshot "+name+" readyToUse", timeout, func() (bool, string) {
		vs, err := s.getSnapshot(t, testNamespace, "volumesnapshot/"+name)
		if err != nil {
			return false, err.Error()
		}
		if vc, err = s.getSnapshot(t, "", "volumesnapshotcontent/"+content); err != nil {
			return false, err.Error()
		}
		return vs.ready() && vc.ready(), fmt.Sprintf("snapshot error %q, content error %q", vs.errorMessage(), vc.errorMessage())
	})
	return vc
}

// snapshotDirs lists <home>/snapshots/ on the node: one directory per
// snapshot the plugin keeps (dot-entries are ones being made or removed).
func (s *suite) snapshotDirs(t testing.TB) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(s.c.home, "snapshots"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// snapshotDir is where the plugin keeps the snapshot with handle h: its
// ID is <key>@<node>, its directory <home>/snapshots/<key>.
func snapshotDir(home, h string) string {
	key, _, _ := strings.Cut(h, "@")
	return filepath.Join(home, "snapshots", key)
}

// guestFound is the marker a guest found on its disk when it booted, ""
// when it found none.
func guestFound(console string) string {
	for _, l := range strings.Split(console, "\n") {
		if m, ok := strings.CutPrefix(strings.TrimSpace(l), "E2E-GUEST found "); ok {
			return strings.TrimSpace(m)
		}
	}
	return ""
}

// testSnapshots takes CSI snapshots of a box a micro-VM wrote, restores
// and clones it, and checks what guests booted on each see: first the
// infrastructure (CRDs, snapshot-controller, the sidecar, the class), then
// a snapshot refused while the VM runs, a snapshot after, a restore and a
// clone on the same node, the snapshot's deletion under a restored volume,
// and a home left with no snapshot behind.
func (s *suite) testSnapshots(t *testing.T) {
	c := s.c
	const (
		source  = "snap-src"
		restore = "snap-restore"
		clone   = "snap-clone"
	)
	pods := []string{"snap-writer", "snap-r1", "snap-s2", "snap-c1", "snap-r2"}
	defer func() {
		for _, args := range [][]string{
			append([]string{"delete", "pod", "-n", testNamespace, "--ignore-not-found", "--wait=true"}, pods...),
			{"delete", "volumesnapshot", "-n", testNamespace, "snap-busy", "snap1", "--ignore-not-found", "--wait=true", "--timeout=2m"},
			{"delete", "pvc", "-n", testNamespace, restore, clone, source, "--ignore-not-found", "--wait=true", "--timeout=2m"},
		} {
			if out, err := c.kubectlErr(args...); err != nil {
				t.Errorf("clean-up: %v\n%s", err, out)
			}
		}
	}()
	if !t.Run("Infrastructure", s.testSnapshotInfra) {
		return
	}
	// The restore's pods are pinned the way the chart's NOTES tell users
	// to: by the topology key the plugin reports, to the snapshot's node.
	pin := fmt.Sprintf("  nodeSelector: {%s/node: %s}\n", driverName, nodeName)
	boot := func(t *testing.T, pod, claim, spec, marker string) string {
		t.Helper()
		console, _ := s.bootPod(t, pod, vmPodOn(pod, claim, spec, "e2e_marker="+marker), 8*time.Minute)
		if !strings.Contains(console, "E2E-GUEST wrote "+marker) {
			t.Fatalf("guest on %s did not write its marker; console:\n%s", claim, tail(console, 4000))
		}
		// Gone before the next snapshot or clone of its claim: a
		// finished pod keeps nothing open, but the claim stays in use
		// until kubelet has torn its volume down.
		c.kubectl(t, "delete", "pod", "-n", testNamespace, pod, "--wait=true")
		return guestFound(console)
	}
	m1 := "snap-first-" + randomHex(4)
	var snap snapshotObject
	ok := t.Run("RefusedWhileWriting", func(t *testing.T) {
		c.apply(t, pvcYAML(source, "boxlite", "1Gi"))
		c.apply(t, vmPodOn("snap-writer", source, "", "e2e_marker="+m1, "e2e_hold=600"))
		c.waitRunning(t, testNamespace, "snap-writer", 5*time.Minute)
		waitFor(t, "the writer's guest wrote its marker and holds the disk", 5*time.Minute, func() (bool, string) {
			out, _ := c.kubectlErr("logs", "-n", testNamespace, "snap-writer")
			return strings.Contains(out, "E2E-GUEST wrote "+m1) && strings.Contains(out, "holding"), tail(out, 500)
		})
		c.apply(t, volumeSnapshotYAML("snap-busy", source))
		content := s.waitSnapshotContent(t, "snap-busy")
		var msg string
		waitFor(t, "the plugin's refusal on content "+content, 2*time.Minute, func() (bool, string) {
			vc, err := s.getSnapshot(t, "", "volumesnapshotcontent/"+content)
			if err != nil {
				return false, err.Error()
			}
			if vc.ready() {
				t.Fatalf("content %s is ready while a VM has the disk open", content)
			}
			msg = vc.errorMessage()
			return strings.Contains(msg, "open for writing"), msg
		})
		t.Logf("VolumeSnapshotContent %s while the VM runs: %q", content, msg)
		if !strings.Contains(msg, "FailedPrecondition") {
			t.Errorf("the content's error does not carry the plugin's FailedPrecondition: %q", msg)
		}
		vc, _ := s.getSnapshot(t, "", "volumesnapshotcontent/"+content)
		if got := vc.Metadata.Labels[managedByLabel]; got != nodeName {
			t.Errorf("content %s has %s=%q, want %q (snapshot-controller without --enable-distributed-snapshotting?)", content, managedByLabel, got, nodeName)
		}
		if vs, _ := s.getSnapshot(t, testNamespace, "volumesnapshot/snap-busy"); vs.ready() {
			t.Errorf("VolumeSnapshot snap-busy is ready while the VM runs")
		}
		// With the VM gone, the sidecar's next retry (it backs off up to
		// 5 minutes) takes the snapshot.
		c.kubectl(t, "delete", "pod", "-n", testNamespace, "snap-writer", "--wait=true")
		start := time.Now()
		s.waitSnapshotReady(t, "snap-busy", 6*time.Minute)
		t.Logf("snap-busy ready %s after the writer pod was deleted", time.Since(start).Round(time.Second))
	})
	if !ok {
		return
	}
	ok = t.Run("Snapshot", func(t *testing.T) {
		c.apply(t, volumeSnapshotYAML("snap1", source))
		snap = s.waitSnapshotReady(t, "snap1", 2*time.Minute)
		if snap.Status.SnapshotHandle == nil {
			t.Fatalf("content %s is ready with no snapshot handle", snap.Metadata.Name)
		}
		h := *snap.Status.SnapshotHandle
		t.Logf("snap1: content %s, handle %s, restoreSize %v, %s=%s", snap.Metadata.Name, h, snap.Status.RestoreSize, managedByLabel, snap.Metadata.Labels[managedByLabel])
		// The handle names the node, so that a restore asked elsewhere
		// can say where the snapshot is.
		if !strings.HasSuffix(h, "@"+nodeName) {
			t.Errorf("snapshot handle %q does not name node %s", h, nodeName)
		}
		if _, err := os.Stat(snapshotDir(c.home, h)); err != nil {
			t.Errorf("snapshot %s not in the home: %v", h, err)
		}
	})
	if !ok {
		return
	}
	mr := "snap-restored-" + randomHex(4)
	ms2 := "snap-second-" + randomHex(4)
	ok = t.Run("Restore", func(t *testing.T) {
		c.apply(t, pvcFromYAML(restore, "VolumeSnapshot", "snap1"))
		if got := boot(t, "snap-r1", restore, pin, mr); got != m1 {
			t.Errorf("guest on the restored claim found %q, want the snapshot's %q", got, m1)
		}
		if a, b := c.pvVolume(t, testNamespace, source), c.pvVolume(t, testNamespace, restore); a == b {
			t.Fatalf("the restore got its source's volume %s", a)
		}
		// The restore's write stays out of the source.
		if got := boot(t, "snap-s2", source, "", ms2); got != m1 {
			t.Errorf("guest on the source found %q after the restore wrote %q, want its own %q", got, mr, m1)
		}
	})
	if !ok {
		return
	}
	t.Run("Clone", func(t *testing.T) {
		c.apply(t, pvcFromYAML(clone, "PersistentVolumeClaim", source))
		if got := boot(t, "snap-c1", clone, pin, "snap-clone-"+randomHex(4)); got != ms2 {
			t.Errorf("guest on the clone found %q, want its source's latest %q", got, ms2)
		}
	})
	t.Run("DeleteUnderRestore", func(t *testing.T) {
		h := ""
		if snap.Status != nil && snap.Status.SnapshotHandle != nil {
			h = *snap.Status.SnapshotHandle
		}
		c.kubectl(t, "delete", "volumesnapshot", "-n", testNamespace, "snap1", "snap-busy", "--wait=true", "--timeout=2m")
		c.waitGone(t, "", "volumesnapshotcontent/"+snap.Metadata.Name, 2*time.Minute)
		if h != "" {
			if _, err := os.Stat(snapshotDir(c.home, h)); !os.IsNotExist(err) {
				t.Errorf("snapshot %s still in the home after its VolumeSnapshot was deleted: %v", h, err)
			}
		}
		// The restored volume does not need its snapshot, and the source's
		// later write is not in it.
		if got := boot(t, "snap-r2", restore, pin, "snap-again-"+randomHex(4)); got != mr {
			t.Errorf("guest on the restored claim, its snapshot deleted, found %q, want its own %q", got, mr)
		}
	})
	t.Run("Cleanup", func(t *testing.T) {
		var pvs, vols []string
		for _, claim := range []string{source, restore, clone} {
			if pv := c.jsonpath(testNamespace, "pvc/"+claim, "{.spec.volumeName}"); pv != "" {
				pvs = append(pvs, pv)
				vols = append(vols, c.pvVolume(t, testNamespace, claim))
			}
		}
		c.kubectl(t, "delete", "volumesnapshot", "-n", testNamespace, "snap1", "snap-busy", "--ignore-not-found", "--wait=true", "--timeout=2m")
		c.kubectl(t, "delete", "pvc", "-n", testNamespace, restore, clone, source, "--ignore-not-found", "--wait=true", "--timeout=2m")
		for _, pv := range pvs {
			c.waitGone(t, "", "pv/"+pv, 2*time.Minute)
		}
		waitFor(t, "no VolumeSnapshotContent left", time.Minute, func() (bool, string) {
			out, _ := c.kubectlErr("get", "volumesnapshotcontents", "-o", "name")
			return strings.TrimSpace(out) == "", out
		})
		if left := s.snapshotDirs(t); len(left) != 0 {
			t.Errorf("%s/snapshots still holds %v", c.home, left)
		}
		for _, v := range vols {
			if _, err := os.Stat(filepath.Join(c.home, "boxes", v)); !os.IsNotExist(err) {
				t.Errorf("box %s still on the node: %v", v, err)
			}
		}
	})
}

// testSnapshotInfra checks what the scenario stands on: the CRDs, the
// snapshot-controller process, the sidecar ready in the plugin pod with
// the chart's RBAC, the node's topology label the restore pins to, and
// the chart's VolumeSnapshotClass.
func (s *suite) testSnapshotInfra(t *testing.T) {
	c := s.c
	for _, crd := range []string{"volumesnapshots", "volumesnapshotcontents", "volumesnapshotclasses"} {
		got := c.jsonpath("", "crd/"+crd+".snapshot.storage.k8s.io", `{.status.conditions[?(@.type=="Established")].status}`)
		if got != "True" {
			t.Errorf("CRD %s.snapshot.storage.k8s.io Established=%q", crd, got)
		}
	}
	if !c.proc2alive("snapshot-controller") {
		t.Fatalf("snapshot-controller is not running:\n%s", c.logTail("snapshot-controller"))
	}
	pod := c.pluginPod(t)
	var ready string
	waitFor(t, "the csi-snapshotter container ready in "+pod, 2*time.Minute, func() (bool, string) {
		ready = c.jsonpath(pluginNamespace, "pod/"+pod, `{.status.containerStatuses[?(@.name=="csi-snapshotter")].ready}`)
		return ready == "true", ready
	})
	logs, _ := c.kubectlErr("logs", "-n", pluginNamespace, pod, "-c", "csi-snapshotter")
	t.Logf("csi-snapshotter log head:\n%s", tail(strings.Join(firstLines(logs, 25), "\n"), 4000))
	// The one refusal expected: the group-snapshot CRDs, which the chart
	// does not let it read; it then runs without group snapshots.
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "forbidden") && !strings.Contains(strings.ToLower(l), "groupsnapshot") {
			t.Errorf("csi-snapshotter was refused by the API server: %s", l)
		}
	}
	if got := c.jsonpath("", "node/"+nodeName, fmt.Sprintf(`{.metadata.labels.%s/node}`, strings.ReplaceAll(driverName, ".", `\.`))); got != nodeName {
		t.Errorf("node %s has %s/node=%q, want %q: restores cannot be pinned by it", nodeName, driverName, got, nodeName)
	}
	drv := c.jsonpath("", "volumesnapshotclass/"+snapshotClassName, "{.driver} {.deletionPolicy}")
	if drv != driverName+" Delete" {
		t.Errorf("VolumeSnapshotClass %s: driver and deletionPolicy %q, want %q", snapshotClassName, drv, driverName+" Delete")
	}
}

func firstLines(s string, n int) []string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[:n]
	}
	return lines
}
