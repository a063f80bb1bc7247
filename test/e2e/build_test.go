package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/mod/modfile"
)

// Versions of what the e2e builds from the Go module proxy. Kubernetes
// v1.31.0 also resolves (BOXLITE_E2E_K8S_VERSION=v1.31.0).
const (
	defaultK8sVersion   = "v1.34.4"
	provisionerModule   = "github.com/kubernetes-csi/external-provisioner/v6"
	provisionerVersion  = "v6.4.0"
	snapshotterModule   = "github.com/kubernetes-csi/external-snapshotter/v8"
	snapshotterVersion  = "v8.7.0"
	snapshotClientMod   = "github.com/kubernetes-csi/external-snapshotter/client/v8"
	helmVersion         = "v3.22.0"
	defaultCacheRoot    = "/var/cache/boxlite-e2e"
	kubernetesModule    = "k8s.io/kubernetes"
	wrapperModuleName   = "e2e.local/wrapper"
	completeMarker      = ".complete"
	componentBaseGitVer = "k8s.io/component-base/version.gitVersion"
)

func k8sVersion() string {
	if v := os.Getenv("BOXLITE_E2E_K8S_VERSION"); v != "" {
		return v
	}
	return defaultK8sVersion
}

// cacheRoot holds builds that outlive a run, keyed by component and
// version; it is outside the repository so nothing built is committed.
func cacheRoot() string {
	if d := os.Getenv("BOXLITE_E2E_CACHE"); d != "" {
		return d
	}
	return defaultCacheRoot
}

// repoRoot is the main module's root, two levels up from this package.
func repoRoot(t testing.TB) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Clean(filepath.Join(wd, "..", ".."))
	if _, err := os.Stat(filepath.Join(root, "cmd", "boxlite-csi")); err != nil {
		t.Fatalf("repository root not found from %s: %v", wd, err)
	}
	return root
}

// goEnv is the environment for every go command the harness runs: the
// wrapper modules must never see a go.work or the caller's GOFLAGS
// (e.g. -mod=vendor), which would make them resolve differently.
func goEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "GOWORK=") || strings.HasPrefix(kv, "GOFLAGS=") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false")
	return append(env, extra...)
}

func runCmd(t testing.TB, dir string, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if env != nil {
		cmd.Env = env
	}
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s (in %s): %v\n%s", name, strings.Join(args, " "), dir, err, tail(out.String(), 4000))
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Logf("%s %s: %s", name, strings.Join(args, " "), d.Round(time.Second))
	}
	return out.String()
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// lockCache serialises builds of one cache entry between concurrent runs
// on the same machine.
func lockCache(t testing.TB, dir string) func() {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	return func() { f.Close() }
}

// cached returns <cache>/<key>/bin, running build into a fresh directory
// only when no complete build is there yet. A half-done build from a
// crashed run lacks the marker and is started over.
func cached(t testing.TB, key string, build func(dir string)) string {
	t.Helper()
	dir := filepath.Join(cacheRoot(), key)
	if _, err := os.Stat(filepath.Join(dir, completeMarker)); err == nil {
		return filepath.Join(dir, "bin")
	}
	unlock := lockCache(t, dir)
	defer unlock()
	if _, err := os.Stat(filepath.Join(dir, completeMarker)); err == nil {
		return filepath.Join(dir, "bin")
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	build(dir)
	if err := os.WriteFile(filepath.Join(dir, completeMarker), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("built %s in %s", key, time.Since(start).Round(time.Second))
	return filepath.Join(dir, "bin")
}

// upstreamGoMod downloads a module's go.mod through the proxy and parses it.
func upstreamGoMod(t testing.TB, dir, mod, version string) *modfile.File {
	t.Helper()
	out := runCmd(t, dir, goEnv(), "go", "mod", "download", "-json", mod+"@"+version)
	var info struct{ GoMod, Error string }
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.GoMod == "" {
		t.Fatalf("go mod download %s@%s: %v %s\n%s", mod, version, err, info.Error, out)
	}
	data, err := os.ReadFile(info.GoMod)
	if err != nil {
		t.Fatal(err)
	}
	// Parse, not ParseLax: ParseLax drops the replace directives we need.
	f, err := modfile.Parse(info.GoMod, data, nil)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// publishedSiblings are modules that a repository we build replaces with a
// directory of its own, mapped to the published version that holds the
// same tree. external-snapshotter v8.7.0 builds against ./client, which
// is client/v8 v8.7.0 (its go.mod requires v8.6.0, which the replace
// overrides).
var publishedSiblings = map[string]string{
	snapshotClientMod: snapshotterVersion,
}

// wrapperReplaces turns the replace directives of a module we build as a
// dependency into ones that work from outside its repository: directory
// replaces of Kubernetes' staging modules become the published module at
// the matching v0 version, those of publishedSiblings their published
// version, versioned replaces are kept as they are.
func wrapperReplaces(t testing.TB, f *modfile.File, version string) []string {
	t.Helper()
	var lines []string
	for _, r := range f.Replace {
		switch {
		case r.New.Version != "":
			lines = append(lines, fmt.Sprintf("replace %s => %s %s", r.Old.Path, r.New.Path, r.New.Version))
		case strings.HasPrefix(r.New.Path, "./staging/src/"):
			lines = append(lines, fmt.Sprintf("replace %s => %s %s", r.Old.Path, r.Old.Path, stagingVersion(t, version)))
		case publishedSiblings[r.Old.Path] != "":
			lines = append(lines, fmt.Sprintf("replace %s => %s %s", r.Old.Path, r.Old.Path, publishedSiblings[r.Old.Path]))
		default:
			t.Fatalf("%s: replace %s => %s cannot be reproduced outside its repository", f.Module.Mod, r.Old.Path, r.New.Path)
		}
	}
	return lines
}

// stagingVersion maps k8s.io/kubernetes v1.X.Y to its staging modules' v0.X.Y.
func stagingVersion(t testing.TB, v string) string {
	t.Helper()
	if !strings.HasPrefix(v, "v1.") {
		t.Fatalf("unexpected Kubernetes version %q", v)
	}
	return "v0." + strings.TrimPrefix(v, "v1.")
}

// buildWrapped builds main packages of mod@version in a throwaway module
// that requires it, so that neither k8s.io/kubernetes nor the sidecar ever
// enters the repository's go.mod.
func buildWrapped(t testing.TB, dir, mod, version string, pkgs []string, ldflags string, static bool) {
	t.Helper()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	up := upstreamGoMod(t, src, mod, version)
	goVer := "1.24.0"
	if up.Go != nil {
		goVer = up.Go.Version
	}
	var gomod strings.Builder
	fmt.Fprintf(&gomod, "module %s\n\ngo %s\n\nrequire %s %s\n\n", wrapperModuleName, goVer, mod, version)
	for _, l := range wrapperReplaces(t, up, version) {
		gomod.WriteString(l + "\n")
	}
	if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte(gomod.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// go mod tidy needs the packages imported somewhere to keep their
	// dependencies; a build-tagged file does that without compiling.
	var tools strings.Builder
	tools.WriteString("//go:build tools\n\npackage tools\n\nimport (\n")
	for _, p := range pkgs {
		fmt.Fprintf(&tools, "\t_ %q\n", p)
	}
	tools.WriteString(")\n")
	if err := os.WriteFile(filepath.Join(src, "tools.go"), []byte(tools.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	runCmd(t, src, goEnv(), "go", "mod", "tidy")
	env := goEnv()
	if static {
		env = append(env, "CGO_ENABLED=0")
	}
	// No -trimpath: the build cache is shared with anyone who has built
	// these packages plainly, and Kubernetes is the slowest part of a run.
	args := append([]string{"build", "-ldflags", ldflags, "-o", filepath.Join(dir, "bin") + "/"}, pkgs...)
	runCmd(t, src, env, "go", args...)
}

type binaries struct {
	k8s         string // directory with kube-apiserver ... kubectl
	provisioner string // csi-provisioner binary
	snapshotter string // directory with csi-snapshotter and snapshot-controller
	// snapshotCRDs is external-snapshotter's client/config/crd in the Go
	// module cache: the VolumeSnapshot CRDs of the same release.
	snapshotCRDs string
	helm         string
}

func buildBinaries(t testing.TB) binaries {
	t.Helper()
	v := k8sVersion()
	var b binaries
	b.k8s = cached(t, "kubernetes-"+v, func(dir string) {
		pkgs := []string{}
		for _, c := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"} {
			pkgs = append(pkgs, kubernetesModule+"/cmd/"+c)
		}
		buildWrapped(t, dir, kubernetesModule, v, pkgs, "-s -w -X "+componentBaseGitVer+"="+v, false)
	})
	b.provisioner = filepath.Join(cached(t, "external-provisioner-"+provisionerVersion, func(dir string) {
		buildWrapped(t, dir, provisionerModule, provisionerVersion, []string{provisionerModule + "/cmd/csi-provisioner"},
			"-s -w -X main.version="+provisionerVersion, true)
	}), "csi-provisioner")
	b.snapshotter = cached(t, "external-snapshotter-"+snapshotterVersion, func(dir string) {
		buildWrapped(t, dir, snapshotterModule, snapshotterVersion, []string{
			snapshotterModule + "/cmd/csi-snapshotter", snapshotterModule + "/cmd/snapshot-controller",
		}, "-s -w -X main.version="+snapshotterVersion, true)
	})
	b.snapshotCRDs = snapshotCRDDir(t)
	b.helm = filepath.Join(cached(t, "helm-"+helmVersion, func(dir string) {
		runCmd(t, dir, goEnv("GOBIN="+filepath.Join(dir, "bin"), "CGO_ENABLED=0"), "go", "install", "helm.sh/helm/v3/cmd/helm@"+helmVersion)
	}), "helm")
	return b
}

// buildLocal builds a static binary from this module or the main one.
func buildLocal(t testing.TB, dir, pkg, out string, ldflags string) {
	t.Helper()
	runCmd(t, dir, goEnv("CGO_ENABLED=0"), "go", "build", "-trimpath", "-ldflags", ldflags, "-o", out, pkg)
}

// snapshotCRDDir is client/config/crd of external-snapshotter's client
// module at snapshotterVersion, from the Go module cache (go mod download
// is a no-op once it is there). Asked for on every run rather than copied
// into the build cache, so a cleaned module cache is filled again.
func snapshotCRDDir(t testing.TB) string {
	t.Helper()
	out := runCmd(t, os.TempDir(), goEnv(), "go", "mod", "download", "-json", snapshotClientMod+"@"+snapshotterVersion)
	var info struct{ Dir, Error string }
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.Dir == "" {
		t.Fatalf("go mod download %s@%s: %v %s\n%s", snapshotClientMod, snapshotterVersion, err, info.Error, out)
	}
	dir := filepath.Join(info.Dir, "config", "crd")
	if _, err := os.Stat(filepath.Join(dir, "snapshot.storage.k8s.io_volumesnapshots.yaml")); err != nil {
		t.Fatalf("%s@%s has no VolumeSnapshot CRD: %v", snapshotClientMod, snapshotterVersion, err)
	}
	return dir
}
