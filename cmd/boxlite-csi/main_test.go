package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	home := filepath.Join(t.TempDir(), "home")
	cases := []struct {
		name       string
		args       []string
		code       int
		stdout     []string
		stderr     []string
		homeExists bool
	}{
		{name: "version", args: []string{"--version"}, stdout: []string{"boxlite-csi dev go1."}},
		{name: "help", args: []string{"--help"}, stderr: []string{"Usage: boxlite-csi", "-home", "/var/lib/boxlite-csi", "-version"}},
		{name: "unknown flag", args: []string{"--nope"}, code: 2, stderr: []string{"flag provided but not defined: -nope"}},
		{name: "stray argument", args: []string{"serve"}, code: 2, stderr: []string{`unexpected arguments ["serve"]`}},
		{name: "prepares the home", args: []string{"--home", home}, stderr: []string{"home " + home + " prepared"}, homeExists: true},
		{name: "unusable home", args: []string{"--home", "/dev/null/home"}, code: 1, stderr: []string{"/dev/null/home"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), tc.args, &stdout, &stderr); code != tc.code {
				t.Fatalf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			for _, w := range tc.stdout {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout %q lacks %q", stdout.String(), w)
				}
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr %q lacks %q", stderr.String(), w)
				}
			}
			if tc.homeExists {
				for _, d := range []string{"boxes", "tmp", "images/disk-images", "locks"} {
					if _, err := os.Stat(filepath.Join(home, d)); err != nil {
						t.Errorf("home not prepared: %v", err)
					}
				}
			}
		})
	}
}
