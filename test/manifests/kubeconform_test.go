package manifests

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// schemaTemplate is kubeconform's -schema-location for a directory of
// files named <lower-case kind><KindSuffix>.json (KindSuffix is
// "-<group's first label>-<version>", or "-<version>" for the core group).
const schemaTemplate = "{{.ResourceKind}}{{.KindSuffix}}.json"

// TestKubeconform renders the chart with several values files and checks
// every manifest, and every example, against strict schemas generated
// offline from the Kubernetes OpenAPI document. One test, so the schemas
// are generated (or found in the cache) once.
func TestKubeconform(t *testing.T) {
	requireTools(t, "helm", "kubeconform", "go")
	schemas := schemaDir(t)
	location := filepath.Join(schemas, schemaTemplate)

	t.Run("kinds covered", func(t *testing.T) {
		for _, f := range []string{
			"csidriver-storage-v1.json",
			"storageclass-storage-v1.json",
			"csistoragecapacity-storage-v1.json",
			"daemonset-apps-v1.json",
			"pod-v1.json",
			"persistentvolumeclaim-v1.json",
			"clusterrole-rbac-v1.json",
		} {
			if _, err := os.Stat(filepath.Join(schemas, f)); err != nil {
				t.Errorf("schema missing: %v", err)
			}
		}
	})

	t.Run("valid", func(t *testing.T) {
		renders := []struct {
			name string
			args []string
		}{
			{"defaults", nil},
			{"nosidecars", []string{"-f", filepath.Join("testdata", "values-nosidecars.yaml")}},
			{"pullsecret", []string{"--set", "storageClass.enabled=true,storageClass.image=registry.example.com/a/b:1,storageClass.pullSecret.name=regcred,hostNetwork=false"}},
			// The sidecar and its RBAC. Not the VolumeSnapshotClass: it is a
			// CRD's kind, which the Kubernetes OpenAPI document has no
			// schema for (TestHelmTemplate checks its fields).
			{"snapshotter", []string{"--set", "snapshotter.enabled=true"}},
		}
		dir := t.TempDir()
		var files []string
		var resources int
		for _, r := range renders {
			out := mustRun(t, ".", "helm", helmTemplateArgs(t, r.args...)...)
			p := filepath.Join(dir, r.name+".yaml")
			if err := os.WriteFile(p, []byte(out), 0o644); err != nil {
				t.Fatal(err)
			}
			files = append(files, p)
			resources += len(splitDocs(t, out))
		}
		for _, pattern := range []string{
			filepath.Join(repoRoot(t), "examples", "*.yaml"),
			filepath.Join("testdata", "valid", "*.yaml"),
		} {
			m, err := filepath.Glob(pattern)
			if err != nil || len(m) == 0 {
				t.Fatalf("no files match %s (%v)", pattern, err)
			}
			for _, f := range m {
				data, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				resources += len(splitDocs(t, string(data)))
			}
			files = append(files, m...)
		}

		args := append([]string{"-strict", "-summary", "-schema-location", location}, files...)
		r := run(t, ".", "kubeconform", args...)
		if r.err != nil {
			t.Fatalf("kubeconform: %v\n%s%s", r.err, r.stdout, r.stderr)
		}
		// Every resource found and validated: none skipped or missed.
		m := summaryRE.FindStringSubmatch(r.stdout)
		if m == nil {
			t.Fatalf("no summary in kubeconform output:\n%s", r.stdout)
		}
		got := strings.Join(m[1:], " ")
		want := strings.Join([]string{strconv.Itoa(resources), strconv.Itoa(len(files)), strconv.Itoa(resources), "0", "0", "0"}, " ")
		if got != want {
			t.Errorf("kubeconform found/files/valid/invalid/errors/skipped = %s, want %s:\n%s", got, want, r.stdout)
		}
		t.Logf("%s", strings.TrimSpace(r.stdout))
	})

	t.Run("invalid", func(t *testing.T) {
		tests := []struct {
			file, want string
		}{
			{"unknown-field.yaml", "additional properties 'volumeBindingMode' not allowed"},
			{"wrong-type.yaml", "at '/spec/podInfoOnMount': got string, want boolean"},
			{"bad-quantity.yaml", "'512MB' does not match pattern"},
			{"missing-required.yaml", "missing property 'provisioner'"},
			{"null-value.yaml", "at '/metadata/namespace': got null, want string"},
		}
		for _, tt := range tests {
			t.Run(tt.file, func(t *testing.T) {
				r := run(t, ".", "kubeconform", "-strict", "-schema-location", location, filepath.Join("testdata", "invalid", tt.file))
				if r.err == nil {
					t.Fatalf("kubeconform accepted %s:\n%s", tt.file, r.stdout)
				}
				if !strings.Contains(r.stdout, tt.want) {
					t.Errorf("kubeconform output lacks %q:\n%s%s", tt.want, r.stdout, r.stderr)
				}
			})
		}
	})
}

// schemaDir returns a directory of schemas for kubeVersion, generating it
// on first use. Generated schemas are cached under
// $XDG_CACHE_HOME/boxlite-csi/k8s-schemas/<version>/<generator hash>, so
// changing the generator regenerates them; the k8s.io/kubernetes module
// zip (~18 MB) stays in the Go module cache.
func schemaDir(t *testing.T) string {
	t.Helper()
	genDir := filepath.Join(repoRoot(t), "hack", "k8s-schemas")
	h := sha256.New()
	for _, f := range []string{"main.go", "go.mod"} {
		b, err := os.ReadFile(filepath.Join(genDir, f))
		if err != nil {
			t.Fatal(err)
		}
		h.Write(b)
	}
	hash := hex.EncodeToString(h.Sum(nil))[:16]

	cache, err := os.UserCacheDir() // honours XDG_CACHE_HOME
	if err != nil {
		cache = t.TempDir()
		t.Logf("no user cache directory (%v): generating schemas into %s", err, cache)
	}
	parent := filepath.Join(cache, "boxlite-csi", "k8s-schemas", kubeVersion)
	dir := filepath.Join(parent, hash)
	if _, err := os.Stat(filepath.Join(dir, "csidriver-storage-v1.json")); err == nil {
		t.Logf("using cached schemas in %s", dir)
		return dir
	}

	start := time.Now()
	swagger := swaggerPath(t, genDir)
	downloaded := time.Since(start)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(parent, ".gen-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	r := run(t, genDir, "go", "run", ".", "-swagger", swagger, "-out", tmp)
	if r.err != nil {
		t.Fatalf("generate schemas: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Another run got there first; its result is as good as ours.
		if _, statErr := os.Stat(filepath.Join(dir, "csidriver-storage-v1.json")); statErr != nil {
			t.Fatalf("install schemas: %v", err)
		}
	}
	t.Logf("generated schemas in %s: k8s.io/kubernetes@%s download %v, generation %v (%s)",
		dir, kubeVersion, downloaded.Round(time.Millisecond), (time.Since(start) - downloaded).Round(time.Millisecond), strings.TrimSpace(r.stderr))
	return dir
}

// swaggerPath downloads k8s.io/kubernetes@kubeVersion into the module
// cache (a no-op once it is there) and returns its swagger.json. It runs
// in the generator's module so the main module's go.mod is not involved.
func swaggerPath(t *testing.T, dir string) string {
	t.Helper()
	r := run(t, dir, "go", "mod", "download", "-json", "k8s.io/kubernetes@"+kubeVersion)
	var info struct {
		Dir, Error string
	}
	if err := json.Unmarshal([]byte(r.stdout), &info); err != nil || r.err != nil || info.Error != "" {
		t.Fatalf("go mod download k8s.io/kubernetes@%s: %v %s\n%s%s", kubeVersion, r.err, info.Error, r.stdout, r.stderr)
	}
	p := filepath.Join(info.Dir, "api", "openapi-spec", "swagger.json")
	if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("k8s.io/kubernetes@%s has no %s", kubeVersion, p)
	}
	return p
}

// summaryRE matches kubeconform's -summary line.
var summaryRE = regexp.MustCompile(`Summary: (\d+) resources? found in (\d+) files? - Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)`)
