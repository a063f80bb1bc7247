// Package manifests checks the Helm chart and the examples offline: helm
// lint and template with several values files, the values schema's
// rejections, and kubeconform against JSON schemas generated from the
// Kubernetes OpenAPI document (see hack/k8s-schemas). helm and kubeconform
// must be on PATH; the tests skip, saying so, when they are not.
package manifests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

const (
	// kubeVersion is the Kubernetes release the chart is rendered for and
	// whose OpenAPI document the schemas come from. helm template needs it
	// explicitly: a helm built with `go install` assumes v1.20, below the
	// chart's kubeVersion.
	kubeVersion = "v1.34.4"
	releaseName = "boxlite"
	releaseNS   = "boxlite-system"
	// cmdTimeout bounds any one helm, kubeconform or go invocation.
	cmdTimeout = 5 * time.Minute
)

// repoRoot is the module root, two levels above this package.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func chartDir(t *testing.T) string {
	return filepath.Join(repoRoot(t), "charts", "boxlite-csi")
}

// requireTools stops the test when a tool is not on PATH.
func requireTools(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		testenv.RequireTool(t, n, "make deps installs it")
	}
}

// result is one finished command.
type result struct {
	stdout, stderr string
	err            error
}

// run executes name with args in dir and returns its output.
func run(t *testing.T, dir, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return result{stdout: stdout.String(), stderr: stderr.String(), err: err}
}

// mustRun is run that fails the test on a non-zero exit.
func mustRun(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	r := run(t, dir, name, args...)
	if r.err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// helmTemplateArgs renders the chart with the given extra arguments
// (-f files, --set flags).
func helmTemplateArgs(t *testing.T, extra ...string) []string {
	return append([]string{"template", releaseName, chartDir(t), "--namespace", releaseNS, "--kube-version", kubeVersion}, extra...)
}

// manifest is one rendered YAML document.
type manifest struct {
	kind, name, text string
}

var (
	kindRE = regexp.MustCompile(`(?m)^kind: (\S+)$`)
	// The object's own name: the first two-space-indented name under the
	// top-level metadata key.
	nameRE = regexp.MustCompile(`(?m)^metadata:\n(?:  .*\n|\s*#.*\n)*?  name: (\S+)$`)
)

// splitDocs splits helm template output (or any multi-document YAML) into
// its documents, skipping empty ones.
func splitDocs(t *testing.T, out string) []manifest {
	t.Helper()
	var docs []manifest
	for _, d := range regexp.MustCompile(`(?m)^---\s*$`).Split(out, -1) {
		if strings.TrimSpace(d) == "" {
			continue
		}
		k := kindRE.FindStringSubmatch(d)
		n := nameRE.FindStringSubmatch(d)
		if k == nil || n == nil {
			t.Fatalf("document without kind or metadata.name:\n%s", d)
		}
		docs = append(docs, manifest{kind: k[1], name: n[1], text: d})
	}
	return docs
}

// block returns the YAML block that starts with the line whose trimmed
// text is header (e.g. "- name: boxlite-csi"): that line and every
// following line indented deeper than it. ok is false if there is none.
func block(text, header string) (string, bool) {
	lines := strings.Split(text, "\n")
	for i, l := range lines {
		if strings.TrimSpace(l) != header {
			continue
		}
		indent := len(l) - len(strings.TrimLeft(l, " "))
		if strings.HasPrefix(strings.TrimLeft(l, " "), "- ") {
			// Keys of a list item line up with the text after "- ".
			indent += 1
		}
		end := i + 1
		for ; end < len(lines); end++ {
			t := strings.TrimLeft(lines[end], " ")
			if t == "" {
				continue
			}
			if len(lines[end])-len(t) <= indent {
				break
			}
		}
		return strings.Join(lines[i:end], "\n"), true
	}
	return "", false
}

// writeTemp writes data to a new file in t's temporary directory.
func writeTemp(t *testing.T, name, data string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
