// Package testenv is the one place tests ask whether this machine can run
// them: root, installed tools, memory and disk. Outside CI a missing
// requirement skips the test with its reason. Under CI=true it fails the
// test instead, because CI installs everything first, and a broken install
// step must turn the run red rather than into a row of green skips.
//
// A few skips are right by design and stay skips everywhere; they go
// through ByDesign with one of the reasons listed in bydesign.go.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// InCI reports whether the tests run under CI (CI=true), where nothing
// may be skipped for a missing tool, root or machine size.
func InCI() bool {
	v := strings.ToLower(os.Getenv("CI"))
	return v == "true" || v == "1"
}

// Unmet stops the test because the machine lacks what it needs: a skip
// on a developer's machine, a failure under CI.
func Unmet(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("%s (CI=true: a missing requirement fails the test; fix .ci/run or make deps)", msg)
	}
	t.Skip(msg)
}

// RequireRoot stops the test unless it runs as root; why says what the
// test does with it, e.g. "it makes real bind mounts".
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unmet(t, "needs root: %s (CI runs as root; make test does as root too)", why)
	}
}

// sbinDirs are searched after PATH: e2fsprogs installs there, and a
// non-root PATH often leaves them out.
var sbinDirs = [...]string{"/usr/sbin", "/sbin"}

// LookTool finds a program on PATH or in the sbin directories.
func LookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	if !strings.Contains(name, "/") {
		for _, dir := range sbinDirs {
			p := filepath.Join(dir, name)
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("%s is not on PATH, nor in %s", name, strings.Join(sbinDirs[:], " or "))
}

// RequireTool returns the path of a program the test needs; pkg is the
// Debian package (or go install line) that provides it.
func RequireTool(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := LookTool(name)
	if err != nil {
		Unmet(t, "%s is not installed (%s): %v", name, pkg, err)
	}
	return p
}

// RequireFile stops the test unless path exists; pkg provides it.
func RequireFile(t testing.TB, path, pkg string) {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		Unmet(t, "%s is not installed (%s): %v", path, pkg, err)
	}
}

// RequireMemory stops the test unless the kernel reports at least want
// bytes of available memory.
func RequireMemory(t testing.TB, want uint64) {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return
	}
	for _, l := range strings.Split(string(b), "\n") {
		var kb uint64
		if _, err := fmt.Sscanf(l, "MemAvailable: %d kB", &kb); err == nil && kb<<10 < want {
			Unmet(t, "needs %d MiB of available memory, have %d MiB", want>>20, kb>>10)
		}
	}
}

// RequireDisk stops the test unless the filesystem holding dir (or its
// nearest existing parent) has at least want bytes free.
func RequireDisk(t testing.TB, dir string, want uint64) {
	t.Helper()
	d := dir
	for {
		if _, err := os.Stat(d); err == nil || d == filepath.Dir(d) {
			break
		}
		d = filepath.Dir(d)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(d, &st); err == nil {
		if free := st.Bavail * uint64(st.Bsize); free < want {
			Unmet(t, "needs %d GiB free under %s, have %d GiB", want>>30, dir, free>>30)
		}
	}
}
