package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	testNamespace   = "e2e"
	pluginNamespace = "boxlite-system"
	releaseName     = "boxlite-csi"
	driverName      = "csi.boxlite.dev"
)

func (c *cluster) kubectlErr(args ...string) (string, error) {
	return c.kubectlIn("", args...)
}

func (c *cluster) kubectlIn(stdin string, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.bins.k8s, "kubectl"), args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	if err != nil {
		return out.String() + stderr.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out.String(), nil
}

func (c *cluster) kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.kubectlErr(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (c *cluster) apply(t testing.TB, manifest string) {
	t.Helper()
	if out, err := c.kubectlIn(manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("%v\n%s\nmanifest:\n%s", err, out, manifest)
	}
}

// jsonpath reads one field of an object, "" if it does not exist.
func (c *cluster) jsonpath(ns, obj, path string) string {
	args := []string{"get", obj, "-o", "jsonpath=" + path}
	if ns != "" {
		args = append(args, "-n", ns)
	}
	out, err := c.kubectlErr(args...)
	if err != nil {
		return ""
	}
	return out
}

// waitRunning waits until every container of the pod runs and is ready,
// failing early with the pod's events when it cannot get there.
func (c *cluster) waitRunning(t testing.TB, ns, pod string, timeout time.Duration) {
	t.Helper()
	c.waitPhase(t, ns, pod, "Running", timeout)
}

func (c *cluster) waitPhase(t testing.TB, ns, pod, phase string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := c.jsonpath(ns, "pod/"+pod, "{.status.phase}")
		if got == phase {
			return
		}
		if got == "Failed" || (got == "Succeeded" && phase != "Succeeded") {
			t.Fatalf("pod %s/%s is %s, want %s:\n%s", ns, pod, got, phase, c.describe(ns, "pod/"+pod))
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod %s/%s: phase %q after %s, want %s:\n%s", ns, pod, got, timeout, phase, c.describe(ns, "pod/"+pod))
		}
		time.Sleep(time.Second)
	}
}

func (c *cluster) describe(ns, obj string) string {
	out, _ := c.kubectlErr("describe", obj, "-n", ns)
	return tail(out, 5000)
}

func (c *cluster) waitGone(t testing.TB, ns, obj string, timeout time.Duration) {
	t.Helper()
	waitFor(t, obj+" deleted", timeout, func() (bool, string) {
		args := []string{"get", obj, "--ignore-not-found", "-o", "name"}
		if ns != "" {
			args = append(args, "-n", ns)
		}
		out, err := c.kubectlErr(args...)
		return err == nil && strings.TrimSpace(out) == "", out
	})
}

// exec runs a command in a pod's first container and returns its output,
// with the error when the command exits non-zero.
func (c *cluster) exec(ns, pod string, cmd ...string) (string, error) {
	return c.kubectlErr(append([]string{"exec", "-n", ns, pod, "--"}, cmd...)...)
}

func (c *cluster) mustExec(t testing.TB, ns, pod string, cmd ...string) string {
	t.Helper()
	out, err := c.exec(ns, pod, cmd...)
	if err != nil {
		t.Fatalf("exec in %s: %v\n%s", pod, err, out)
	}
	return out
}

// pluginPod is the running plugin pod's name.
func (c *cluster) pluginPod(t testing.TB) string {
	t.Helper()
	out := c.kubectl(t, "get", "pods", "-n", pluginNamespace, "-l", "app.kubernetes.io/name=boxlite-csi",
		"--field-selector=status.phase=Running", "-o", "jsonpath={.items[*].metadata.name}")
	names := strings.Fields(out)
	if len(names) != 1 {
		t.Fatalf("want one running plugin pod, got %q", out)
	}
	return names[0]
}

// pluginLogs is every plugin container log of this run that kubelet still
// keeps on the node, oldest pod first; a restarted plugin's earlier logs
// count too.
func (c *cluster) pluginLogs(t testing.TB) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(c.podLogs, pluginNamespace+"_*", "boxlite-csi", "*.log"))
	var all strings.Builder
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		all.Write(b)
	}
	return all.String()
}

func countLines(log, substr string) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

// pvVolume is the CSI volume handle of a bound claim.
func (c *cluster) pvVolume(t testing.TB, ns, pvc string) string {
	t.Helper()
	pv := c.jsonpath(ns, "pvc/"+pvc, "{.spec.volumeName}")
	if pv == "" {
		t.Fatalf("claim %s/%s is not bound:\n%s", ns, pvc, c.describe(ns, "pvc/"+pvc))
	}
	h := c.jsonpath("", "pv/"+pv, "{.spec.csi.volumeHandle}")
	if h == "" {
		t.Fatalf("pv %s has no CSI volume handle", pv)
	}
	return h
}

// boxManifest is the part of box.json the test checks.
type boxManifest struct {
	VolumeID    string `json:"volumeID"`
	Ephemeral   bool   `json:"ephemeral"`
	Image       string `json:"image"`
	Digest      string `json:"digest"`
	VirtualSize uint64 `json:"virtualSize"`
	Backing     string `json:"backing"`
	// FilesystemSize is the size of the filesystem the plugin laid out in
	// a fresh overlay: the base's grown to the claim's size.
	FilesystemSize uint64 `json:"filesystemSize"`
}

func parseBoxJSON(t testing.TB, data string) boxManifest {
	t.Helper()
	var m boxManifest
	if err := json.Unmarshal([]byte(data), &m); err != nil {
		t.Fatalf("box.json: %v\n%s", err, data)
	}
	return m
}
