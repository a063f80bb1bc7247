package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestUnmet runs a test that calls Unmet in a child process, once as CI
// and once not: under CI=true it must fail, elsewhere it must skip.
func TestUnmet(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		Unmet(t, "the child's requirement is missing")
		return
	}
	for _, tc := range []struct {
		ci       string
		wantFail bool
		wantOut  string
	}{
		{ci: "true", wantFail: true, wantOut: "--- FAIL: TestUnmet"},
		{ci: "", wantFail: false, wantOut: "--- SKIP: TestUnmet"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestUnmet$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTENV_CHILD=1", "CI="+tc.ci)
		out, err := cmd.CombinedOutput()
		if failed := err != nil; failed != tc.wantFail {
			t.Errorf("CI=%q: child failed = %v, want %v\n%s", tc.ci, failed, tc.wantFail, out)
		}
		if !strings.Contains(string(out), tc.wantOut) || !strings.Contains(string(out), "the child's requirement is missing") {
			t.Errorf("CI=%q: child output lacks %q and the reason:\n%s", tc.ci, tc.wantOut, out)
		}
	}
}

func TestLookTool(t *testing.T) {
	if _, err := LookTool("sh"); err != nil {
		t.Errorf("LookTool(sh): %v", err)
	}
	if _, err := LookTool("no-such-tool-boxlite"); err == nil {
		t.Error("LookTool found a tool that does not exist")
	}
}

func TestWithin(t *testing.T) {
	for _, tc := range []struct {
		p, dir string
		want   bool
	}{
		{"/a/b", "/a", true},
		{"/a", "/a", true},
		{"/a", "/a/", true},
		{"/ab", "/a", false},
		{"/", "/a", false},
		{"/a/b/c", "/", true},
	} {
		if got := Within(tc.p, tc.dir); got != tc.want {
			t.Errorf("Within(%q, %q) = %v, want %v", tc.p, tc.dir, got, tc.want)
		}
	}
}
