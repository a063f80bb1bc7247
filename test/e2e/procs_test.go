package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// state is what a run records before it changes anything, so that the
// tear-down of this run, or the start of the next one after a crash, can
// undo exactly that and nothing else.
type state struct {
	Procs []proc `json:"procs"`
	// Created are fixed host paths (not under the run root) that did not
	// exist before this run and are removed at the end.
	Created []string `json:"created"`
	// Sysctls are values the kubelet may rewrite, as they were before.
	Sysctls map[string]string `json:"sysctls"`
	// CgroupsCreated: kubepods cgroups did not exist before this run.
	CgroupsCreated bool `json:"cgroupsCreated"`
}

type proc struct {
	Name  string `json:"name"`
	PID   int    `json:"pid"`
	Start uint64 `json:"start"` // /proc/<pid>/stat starttime: a reused PID does not match
}

func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// comm may hold spaces and parentheses: fields start after the last ')'.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 {
		return 0, errors.New("short stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

func (p proc) alive() bool {
	st, err := startTime(p.PID)
	if err != nil || st != p.Start {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID))
	return err == nil && !strings.Contains(string(b[strings.LastIndexByte(string(b), ')'):]), ") Z")
}

// stop sends SIGTERM, then SIGKILL after grace, to a process only if it is
// still the one we started.
func (p proc) stop(grace time.Duration) {
	if !p.alive() {
		return
	}
	syscall.Kill(p.PID, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !p.alive() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	if p.alive() {
		syscall.Kill(p.PID, syscall.SIGKILL)
		for i := 0; i < 50 && p.alive(); i++ {
			time.Sleep(100 * time.Millisecond)
		}
	}
}

type harness struct {
	t     testing.TB
	root  string
	logs  string
	state state
	cmds  map[string]*exec.Cmd
}

func (h *harness) statePath() string { return filepath.Join(h.root, "state.json") }

func (h *harness) save() {
	b, _ := json.MarshalIndent(h.state, "", "  ")
	if err := os.WriteFile(h.statePath(), b, 0o644); err != nil {
		h.t.Fatal(err)
	}
}

// start runs a long-lived process with its output in logs/<name>.log and
// records it before doing anything else.
func (h *harness) start(name string, env []string, bin string, args ...string) {
	h.t.Helper()
	lf, err := os.Create(filepath.Join(h.logs, name+".log"))
	if err != nil {
		h.t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	// Own process group: a ^C to go test must not kill the cluster before
	// the tear-down has unmounted what it runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		h.t.Fatalf("start %s: %v", name, err)
	}
	st, err := startTime(cmd.Process.Pid)
	if err != nil {
		h.t.Fatalf("%s exited at once: see %s", name, lf.Name())
	}
	h.state.Procs = append(h.state.Procs, proc{Name: name, PID: cmd.Process.Pid, Start: st})
	h.cmds[name] = cmd
	h.save()
	go func() { cmd.Wait(); lf.Close() }()
}

func (h *harness) proc(name string) (proc, bool) {
	for _, p := range h.state.Procs {
		if p.Name == name {
			return p, true
		}
	}
	return proc{}, false
}

func (h *harness) stopProc(name string, grace time.Duration) {
	if p, ok := h.proc(name); ok {
		p.stop(grace)
	}
}

// logTail is the end of a component's log, for failure messages.
func (h *harness) logTail(name string) string {
	b, _ := os.ReadFile(filepath.Join(h.logs, name+".log"))
	return tail(string(b), 3000)
}

// pidsMatching lists processes whose command line contains needle; used
// for containerd shims, which containerd daemonises and which name our
// containerd's socket, a path no other process on the machine uses.
func pidsMatching(needle string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), needle) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// cgroupPIDs lists every process in the cgroup subtree dir.
func cgroupPIDs(dir string) []int {
	var pids []int
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids
}

// kubepodsCgroups are the kubelet's cgroupfs roots on every hierarchy.
func kubepodsCgroups() []string {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods*")
	own, _ := filepath.Glob("/sys/fs/cgroup/kubepods*") // unified hierarchy
	return append(dirs, own...)
}

// removeCgroups removes cgroup directories deepest first; rmdir is the
// only way to delete one and fails while it holds processes.
func removeCgroups(dirs []string) {
	var all []string
	for _, d := range dirs {
		filepath.Walk(d, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() {
				all = append(all, p)
			}
			return nil
		})
	}
	sort.Slice(all, func(i, j int) bool { return len(all[i]) > len(all[j]) })
	for _, d := range all {
		syscall.Rmdir(d)
	}
}

// mountsUnder lists mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	ms, _ := testenv.MountsUnder(dir)
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.MountPoint
	}
	return out
}
