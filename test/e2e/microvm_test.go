package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// vmClaim is the claim every micro-VM pod boots from, one after another.
const vmClaim = "vmbox"

const (
	kib = int64(1) << 10
	gib = int64(1) << 30
)

// vmBoxJSON starts the line on which a VM pod prints its box.json, as the
// runtime finds it in the published box, before QEMU starts.
const vmBoxJSON = "E2E-BOXJSON "

// vmPod is a pod that boots the box of vmClaim in QEMU (TCG) and exits
// when the guest powers off. args are the words guestInit reads from the
// kernel command line.
func vmPod(name string, args ...string) string {
	return vmPodOn(name, vmClaim, "", args...)
}

// vmPodOn is vmPod on another claim; spec is YAML added to the pod's spec
// (two-space indented lines, e.g. a nodeSelector), or "".
func vmPodOn(name, claim, spec string, args ...string) string {
	// The shell prints box.json on one line, then becomes QEMU.
	script := strconv.Quote(`echo "` + vmBoxJSON + `$(tr -d '\n' < /box/box.json)"; exec qemu-system-x86_64 "$@"`)
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
%s  containers:
  - name: vm
    image: %s
    imagePullPolicy: Never
    # Unprivileged, as a tenant's sandbox runs: TCG needs no device and
    # no capability, only the box's files.
    securityContext: {privileged: false, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
    command: [/bin/sh, -c, %s, sh, -accel, tcg, -m, "384", -smp, "1", -nographic, -no-reboot,
      -kernel, /vmlinuz, -initrd, /initrd.gz,
      -drive, "file=/box/disks/guest-rootfs.qcow2,format=qcow2,if=virtio",
      -nic, none, -append, "console=ttyS0 panic=-1 quiet %s"]
    volumeMounts:
    - {name: box, mountPath: /box}
  volumes:
  - name: box
    persistentVolumeClaim: {claimName: %s}
`, name, testNamespace, spec, toolsImage, script, strings.Join(args, " "), claim)
}

// vmManifest is the box.json a VM pod printed before it started QEMU.
func vmManifest(t *testing.T, console string) boxManifest {
	t.Helper()
	for _, l := range strings.Split(console, "\n") {
		if j, ok := strings.CutPrefix(strings.TrimSpace(l), vmBoxJSON); ok {
			return parseBoxJSON(t, j)
		}
	}
	t.Fatalf("no box.json line on the VM pod's output:\n%s", tail(console, 3000))
	return boxManifest{}
}

// bootVM runs a VM pod to completion and returns the guest's console and
// how long the pod took from creation to Succeeded.
func (s *suite) bootVM(t *testing.T, name string, timeout time.Duration, args ...string) (string, time.Duration) {
	t.Helper()
	return s.bootPod(t, name, vmPod(name, args...), timeout)
}

// bootPod is bootVM for a VM pod manifest of the caller's (vmPodOn).
func (s *suite) bootPod(t *testing.T, name, pod string, timeout time.Duration) (string, time.Duration) {
	t.Helper()
	c := s.c
	c.apply(t, pod)
	start := time.Now()
	c.waitPhase(t, testNamespace, name, "Succeeded", timeout)
	took := time.Since(start)
	console := c.kubectl(t, "logs", "-n", testNamespace, name)
	t.Logf("pod %s: guest booted and powered off in %s; console tail:\n%s", name, took.Round(time.Second), tail(console, 1500))
	return console, took
}

// guestDF is what guestInit's "E2E-GUEST df WHEN" line says: the root's
// total and available space in bytes (busybox df -k).
func guestDF(t *testing.T, console, when string) (total, avail int64) {
	t.Helper()
	m := regexp.MustCompile(`E2E-GUEST df ` + regexp.QuoteMeta(when) + ` total_kib=(\d+) avail_kib=(\d+)`).FindStringSubmatch(console)
	if m == nil {
		t.Fatalf("no %q df line on the guest's console:\n%s", when, tail(console, 6000))
	}
	total, _ = strconv.ParseInt(m[1], 10, 64)
	avail, _ = strconv.ParseInt(m[2], 10, 64)
	return total * kib, avail * kib
}

// guestTime is the guest's uptime, in seconds, on its "E2E-GUEST t=... WHAT"
// line; -1 if there is none.
func guestTime(console, what string) float64 {
	m := regexp.MustCompile(`E2E-GUEST t=([0-9.]+) ` + regexp.QuoteMeta(what)).FindStringSubmatch(console)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

func gibs(n int64) string { return fmt.Sprintf("%.3f GiB", float64(n)/float64(gib)) }

// chainImage converts a box's overlay, with the base it names, into one
// raw image on the node, as the guest's disk reads, for e2fsprogs to
// check. qemu-img follows the overlay's relative backing name to the
// box's own base link, as QEMU did in the pod; zeros are left as holes.
func (s *suite) chainImage(t *testing.T, box string) string {
	t.Helper()
	raw := filepath.Join(t.TempDir(), filepath.Base(box)+".raw")
	start := time.Now()
	if out, err := exec.Command("qemu-img", "convert", "-O", "raw", filepath.Join(box, "disks", "guest-rootfs.qcow2"), raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert of box %s: %v: %s", filepath.Base(box), err, out)
	}
	t.Logf("box %s converted to raw in %s", filepath.Base(box), time.Since(start).Round(100*time.Millisecond))
	return raw
}

// debugfs runs one debugfs request on a raw image, read-only.
func debugfs(raw, request string) (string, error) {
	cmd := exec.Command("debugfs", "-R", request, raw)
	cmd.Env = append(os.Environ(), "DEBUGFS_PAGER=__none__")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// fileSize is the size debugfs reads in a file's inode on a raw image.
func fileSize(t *testing.T, raw, path string) int64 {
	t.Helper()
	out, err := debugfs(raw, "stat "+path)
	m := regexp.MustCompile(`\bSize: (\d+)`).FindStringSubmatch(out)
	if err != nil || m == nil {
		t.Fatalf("debugfs stat %s: %v\n%s", path, err, out)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

// fsck runs a forced, read-only e2fsck on a raw image and fails the test
// unless it finds nothing to fix.
func fsck(t *testing.T, raw, when string) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", raw).CombinedOutput()
	if err != nil {
		t.Errorf("e2fsck -fn %s: %v (exit 4 or more: errors left, 1-2: would have fixed something):\n%s", when, err, out)
		return
	}
	t.Logf("e2fsck -fn %s: clean: %s", when, lastLine(string(out)))
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// diskSize is the overlay's virtual size as qemu-img reads its header.
// Only called while no VM has the overlay open: QEMU locks it.
func diskSize(t *testing.T, box string) int64 {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "--output=json", filepath.Join(box, "disks", "guest-rootfs.qcow2")).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	return info.VirtualSize
}

// testMicroVM boots the box's overlay in QEMU (TCG) inside pods, from the
// published path, and checks on the node what the guests wrote: first on
// a 2Gi claim, whose filesystem the plugin grew to the claim's size, then
// after the claim is grown to 3Gi (the plugin grows the disk, the guest
// its filesystem), and last a growth refused while a VM runs.
func (s *suite) testMicroVM(t *testing.T) {
	c := s.c
	// Whatever failed, the VM claim and the earlier steps' claims go, so
	// that the roll-forward finds the home empty.
	defer func() {
		for _, args := range [][]string{
			{"delete", "pod", "-n", testNamespace, "vm", "vm-grow", "vm-hold", "vm-after", "fresh", "--ignore-not-found", "--wait=true"},
			{"delete", "pvc", "-n", testNamespace, vmClaim, "fresh", "keep", "--ignore-not-found", "--wait=true"},
		} {
			if out, err := c.kubectlErr(args...); err != nil {
				t.Errorf("clean-up: %v\n%s", err, out)
			}
		}
	}()
	// Each sub-step starts from what the one before left.
	if !t.Run("Fill", s.testVMFill) {
		return
	}
	if !t.Run("Expand", s.testVMExpand) {
		return
	}
	t.Run("InUse", s.testVMInUse)
}

// testVMFill boots a guest on a 2Gi claim that sees the whole claim in
// its filesystem and fills 1 GiB of it, far more than the base holds.
func (s *suite) testVMFill(t *testing.T) {
	c := s.c
	bases := func() map[string]string {
		m := map[string]string{}
		files, _ := filepath.Glob(filepath.Join(c.home, "images", "disk-images", "*.ext4"))
		for _, f := range files {
			m[f] = sha256File(t, f)
		}
		return m
	}
	before := bases()
	marker := "guest-" + randomHex(6)
	const claimSize = 2 * gib
	c.apply(t, pvcYAML(vmClaim, "boxlite", "2Gi"))
	console, took := s.bootVM(t, "vm", 12*time.Minute, "e2e_marker="+marker, "e2e_fill=1")
	if !strings.Contains(console, "E2E-GUEST wrote "+marker) || !strings.Contains(console, "E2E-GUEST image one") {
		t.Fatalf("guest did not write its marker; console:\n%s", tail(console, 6000))
	}
	mounted, filled := guestTime(console, "mounted"), guestTime(console, "filled")
	t.Logf("guest timings: root mounted %.1fs after the guest's kernel started, %d MiB written and synced in %.1fs; pod ran %s",
		mounted, guestFillMiB, filled-mounted, took.Round(time.Second))
	total, avail := guestDF(t, console, "fill")
	t.Logf("guest's df of a %s claim: total %s, available %s", gibs(claimSize), gibs(total), gibs(avail))
	if total < claimSize*95/100 {
		t.Errorf("the guest's root filesystem is %s on a %s claim, want at least 95%% of the claim", gibs(total), gibs(claimSize))
	}
	if !strings.Contains(console, fmt.Sprintf("filled %d", int64(guestFillMiB)<<20)) {
		t.Fatalf("guest did not write its %d MiB fill file; console:\n%s", guestFillMiB, tail(console, 6000))
	}

	vol := c.pvVolume(t, testNamespace, vmClaim)
	box := filepath.Join(c.home, "boxes", vol)
	m := vmManifest(t, console)
	t.Logf("box.json in the VM pod: virtualSize %d, filesystemSize %d", m.VirtualSize, m.FilesystemSize)
	if int64(m.VirtualSize) != claimSize {
		t.Errorf("box.json virtualSize %d, want the claim's %d", m.VirtualSize, claimSize)
	}
	if int64(m.FilesystemSize) < claimSize*95/100 || int64(m.FilesystemSize) > claimSize {
		t.Errorf("box.json filesystemSize %d, want between 95%% of the claim's %d and the claim's size", m.FilesystemSize, claimSize)
	}
	raw := s.chainImage(t, box)
	if got, err := debugfs(raw, "cat "+guestMarkerFile); err != nil || !strings.Contains(got, marker) {
		t.Errorf("guest's file not in the overlay of %s: %v\n%s", vol, err, got)
	}
	if n := fileSize(t, raw, guestFillFile); n != int64(guestFillMiB)<<20 {
		t.Errorf("fill file is %d bytes in the overlay, want %d", n, int64(guestFillMiB)<<20)
	}
	fsck(t, raw, "after the fill")
	os.Remove(raw)

	after := bases()
	for f, sum := range before {
		if after[f] != sum {
			t.Errorf("base %s changed: sha256 %s before, %s after the guest ran", f, sum, after[f])
		}
	}
	var boxBase, cacheBase syscall.Stat_t
	if err := syscall.Stat(filepath.Join(box, "base", "rootfs.ext4"), &boxBase); err != nil {
		t.Fatal(err)
	}
	found := false
	for f := range before {
		if syscall.Stat(f, &cacheBase) == nil && cacheBase.Ino == boxBase.Ino {
			found = true
			t.Logf("VM box's base %s (%d bytes): sha256 %s unchanged", filepath.Base(f), cacheBase.Size, after[f])
			if cacheBase.Size >= int64(guestFillMiB)<<20 {
				t.Errorf("the base is %d bytes: the fill file does not prove the filesystem grew beyond it", cacheBase.Size)
			}
		}
	}
	if !found {
		t.Errorf("the VM's base is not one of the cached bases hashed before the boot")
	}
	// Another box on the same base does not see the guest's write.
	other := filepath.Join(c.home, "boxes", c.pvVolume(t, testNamespace, "fresh"))
	raw = s.chainImage(t, other)
	got, err := debugfs(raw, "cat "+guestMarkerFile)
	switch {
	case err != nil:
		t.Errorf("reading the second box %s: %v\n%s", filepath.Base(other), err, got)
	case strings.Contains(got, marker) || !strings.Contains(got, "File not found"):
		t.Errorf("a second box on the same base sees the guest's file:\n%s", got)
	default:
		t.Logf("second box %s on the same base: %s", filepath.Base(other), strings.Join(strings.Fields(got), " "))
	}
	os.Remove(raw)
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "vm", "fresh", "--wait=true")
	c.kubectl(t, "delete", "pvc", "-n", testNamespace, "fresh", "keep", "--wait=true")
}

// testVMExpand grows the VM's claim from 2Gi to 3Gi the way a resizer
// does for a driver with node expansion only, then boots a guest on it:
// kubelet has the plugin grow the disk when it mounts the claim, and the
// guest grows its mounted root into the new space.
func (s *suite) testVMExpand(t *testing.T) {
	c := s.c
	vol := c.pvVolume(t, testNamespace, vmClaim)
	box := filepath.Join(c.home, "boxes", vol)
	if n := diskSize(t, box); n != 2*gib {
		t.Fatalf("VM disk is %d bytes before the resize, want 2Gi", n)
	}
	volLines := func(what string) int {
		n := 0
		for _, l := range strings.Split(c.pluginLogs(t), "\n") {
			if strings.Contains(l, what) && strings.Contains(l, vol) {
				n++
			}
		}
		return n
	}
	expanded0 := volLines(`"Expanded volume"`)
	s.resizeClaim(t, vmClaim, "3Gi")
	marker := "grown-" + randomHex(6)
	console, took := s.bootVM(t, "vm-grow", 10*time.Minute, "e2e_marker="+marker, "e2e_resize=1")
	if volLines(`"Expanded volume"`) <= expanded0 {
		t.Errorf("the plugin logged no \"Expanded volume\" for %s: kubelet did not have it grow the disk", vol)
	}
	if !strings.Contains(console, "E2E-GUEST wrote "+marker) || !strings.Contains(console, "E2E-RESIZE ok") {
		t.Fatalf("guest did not grow its root or write its marker; console:\n%s", tail(console, 6000))
	}
	// box.json as QEMU's pod found it: kubelet's NodeExpandVolume ran
	// before the container started. The filesystem size is what the disk
	// was made with; the guest grows the filesystem.
	m := vmManifest(t, console)
	t.Logf("box.json in the VM pod: virtualSize %d, filesystemSize %d", m.VirtualSize, m.FilesystemSize)
	if int64(m.VirtualSize) != 3*gib || int64(m.FilesystemSize) < 2*gib*95/100 || int64(m.FilesystemSize) > 2*gib {
		t.Errorf("box.json after the growth: virtualSize %d, filesystemSize %d; want 3Gi and the 2Gi disk's filesystem", m.VirtualSize, m.FilesystemSize)
	}
	before, availBefore := guestDF(t, console, "before")
	after, availAfter := guestDF(t, console, "after")
	t.Logf("guest's df: total %s before EXT4_IOC_RESIZE_FS, %s after (available %s, then %s); resize took %.1fs of guest time; pod ran %s",
		gibs(before), gibs(after), gibs(availBefore), gibs(availAfter), guestTime(console, "resized")-guestTime(console, "mounted"), took.Round(time.Second))
	if after < 3*gib*95/100 || after > 3*gib {
		t.Errorf("after growing, the guest's root is %s, want about 3 GiB (95%%-100%%)", gibs(after))
	}
	if availAfter-availBefore < 9*gib/10 {
		t.Errorf("growing to 3 GiB made only %s available", gibs(availAfter-availBefore))
	}
	if !strings.Contains(console, fmt.Sprintf("E2E-GUEST fill file %d", int64(guestFillMiB)<<20)) {
		t.Errorf("the first guest's fill file is not intact after the growth; console:\n%s", tail(console, 3000))
	}
	// Kubelet marked the expansion finished before it started the pod.
	cl := s.waitClaimResized(t, vmClaim, 3*gib, time.Minute)
	t.Logf("claim %s after the mount: capacity %v, allocatedResources %v", vmClaim, cl.Status.Capacity, cl.Status.AllocatedResources)
	events := c.kubectl(t, "get", "events", "-n", testNamespace, "--field-selector", "involvedObject.kind=PersistentVolumeClaim,involvedObject.name="+vmClaim,
		"-o", `jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}`)
	if !strings.Contains(events, "FileSystemResizeSuccessful") {
		t.Errorf("claim %s has no FileSystemResizeSuccessful event from kubelet:\n%s", vmClaim, events)
	}
	if n := diskSize(t, box); n != 3*gib {
		t.Errorf("VM disk is %d bytes after the resize, want 3Gi", n)
	}
	raw := s.chainImage(t, box)
	if got, err := debugfs(raw, "cat "+guestMarkerFile); err != nil || !strings.Contains(got, marker) {
		t.Errorf("second guest's marker not in the overlay: %v\n%s", err, got)
	}
	if n := fileSize(t, raw, guestFillFile); n != int64(guestFillMiB)<<20 {
		t.Errorf("fill file is %d bytes after the growth, want %d", n, int64(guestFillMiB)<<20)
	}
	fsck(t, raw, "after the guest grew its root")
	os.Remove(raw)
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "vm-grow", "--wait=true")
}

// testVMInUse grows the claim again while a VM has the disk open: the
// plugin must refuse (FailedPrecondition) rather than rewrite the header
// under QEMU, kubelet records the refusal on the claim and leaves the pod
// running, and the next mount, with no VM, does the growth.
func (s *suite) testVMInUse(t *testing.T) {
	c := s.c
	vol := c.pvVolume(t, testNamespace, vmClaim)
	box := filepath.Join(c.home, "boxes", vol)
	// Long enough for kubelet's periodic pod sync to notice the new size
	// while QEMU still runs; the pod is deleted as soon as it has.
	c.apply(t, vmPod("vm-hold", "e2e_marker=hold-"+randomHex(4), "e2e_hold=300"))
	c.waitRunning(t, testNamespace, "vm-hold", 5*time.Minute)
	waitFor(t, "the held guest is up", 5*time.Minute, func() (bool, string) {
		out, _ := c.kubectlErr("logs", "-n", testNamespace, "vm-hold")
		return strings.Contains(out, "E2E-GUEST t="), tail(out, 500)
	})
	s.resizeClaim(t, vmClaim, "4Gi")
	var msg string
	waitFor(t, "kubelet's NodeResizeError on claim "+vmClaim, 3*time.Minute, func() (bool, string) {
		cl := s.getClaim(t, vmClaim)
		for _, cd := range cl.Status.Conditions {
			if cd.Type == "NodeResizeError" {
				msg = cd.Message
				return true, msg
			}
		}
		return false, fmt.Sprintf("conditions %+v, statuses %v", cl.Status.Conditions, cl.Status.AllocatedResourceStatuses)
	})
	t.Logf("claim %s while the VM runs: NodeResizeError %q", vmClaim, msg)
	if !strings.Contains(msg, "FailedPrecondition") || !strings.Contains(msg, "guest-rootfs.qcow2") || !strings.Contains(msg, vol) {
		t.Errorf("NodeResizeError does not carry the plugin's FailedPrecondition naming the overlay of %s: %q", vol, msg)
	}
	if ph := c.jsonpath(testNamespace, "pod/vm-hold", "{.status.phase}"); ph != "Running" {
		t.Errorf("the VM pod is %s after the refused growth, want Running", ph)
	}
	if cp := s.getClaim(t, vmClaim).Status.Capacity["storage"]; parseQuantity(t, cp) != 3*gib {
		t.Errorf("claim capacity %s after the refused growth, want 3Gi", cp)
	}
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "vm-hold", "--wait=true")
	if n := diskSize(t, box); n != 3*gib {
		t.Errorf("VM disk is %d bytes after the refused growth, want it left at 3Gi", n)
	}
	// The plugin recorded the size it refused to apply and grows the disk
	// at the next stage, when no VM has it open; kubelet's NodeExpandVolume
	// after it finds the disk grown and marks the claim resized.
	applied := func() int { return countLines(c.pluginLogs(t), `"Applied a recorded expansion at stage"`) }
	applied0 := applied()
	c.apply(t, podYAML("vm-after", claimVolume(vmClaim), ""))
	c.waitRunning(t, testNamespace, "vm-after", 5*time.Minute)
	s.waitClaimResized(t, vmClaim, 4*gib, time.Minute)
	if applied() <= applied0 {
		t.Errorf("the plugin logged no \"Applied a recorded expansion at stage\" when the claim was mounted again")
	}
	c.kubectl(t, "delete", "pod", "-n", testNamespace, "vm-after", "--wait=true")
	if n := diskSize(t, box); n != 4*gib {
		t.Errorf("VM disk is %d bytes after the next mount, want 4Gi", n)
	}
	// The growth at stage rewrote only the header: the filesystem, still
	// the 3 GiB one the guest made, is as the guest left it.
	raw := s.chainImage(t, box)
	fsck(t, raw, "after the disk grew to 4Gi at stage")
	os.Remove(raw)
}
