package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer lets the test read what the server goroutine writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRunFlags(t *testing.T) {
	cases := []struct {
		name   string
		args   []string
		code   int
		stdout []string
		stderr []string
	}{
		{name: "version", args: []string{"--version"}, stdout: []string{"boxlite-csi dev go1."}},
		{name: "help", args: []string{"--help"}, stderr: []string{
			"Usage: boxlite-csi", "-endpoint", "unix:///csi/csi.sock", "-node-id", "-home", "/var/lib/boxlite-csi",
			"-driver-name", "csi.boxlite.dev", "-max-volumes-per-node", "-kubelet-registration-path", "-cache-high-watermark", "-v value",
			"-metrics-address", "-image-max-bytes", "-image-max-file-size", "-image-max-files", "-max-concurrent-builds",
		}},
		{name: "unknown flag", args: []string{"--nope"}, code: 2, stderr: []string{"flag provided but not defined: -nope"}},
		{name: "stray argument", args: []string{"serve"}, code: 2, stderr: []string{`unexpected arguments ["serve"]`}},
		{name: "bad size", args: []string{"--capacity-reserve", "12XB"}, code: 2, stderr: []string{`size "12XB"`}},
		{name: "unusable home", args: []string{"--home", "/dev/null/home", "--endpoint", "unix:///tmp/x.sock"}, code: 1, stderr: []string{"/dev/null/home"}},
		{name: "no image file limit", args: []string{"--image-max-files", "0"}, code: 2, stderr: []string{"--image-max-files must be positive"}},
		{name: "no build slots", args: []string{"--max-concurrent-builds", "0"}, code: 2, stderr: []string{"--max-concurrent-builds must be positive"}},
		{name: "bad build slots", args: []string{"--max-concurrent-builds", "two"}, code: 2, stderr: []string{`invalid value "two" for flag -max-concurrent-builds`}},
		{name: "bad metrics address", args: []string{"--home", "{tmp}/home", "--endpoint", "unix://{tmp}/csi.sock", "--metrics-address", "127.0.0.1:99999"},
			code: 1, stderr: []string{"metrics: listen on 127.0.0.1:99999"}},
		{name: "relative home", args: []string{"--home", "rel"}, code: 1, stderr: []string{`home "rel" must be an absolute path`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr syncBuffer
			tmp := t.TempDir()
			args := make([]string, len(tc.args))
			for i, a := range tc.args {
				args[i] = strings.ReplaceAll(a, "{tmp}", tmp)
			}
			if code := run(context.Background(), args, &stdout, &stderr); code != tc.code {
				t.Fatalf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			for _, w := range tc.stdout {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout %q lacks %q", stdout.String(), w)
				}
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
		})
	}
}

// TestRunServesUntilCancelled starts the plugin on a temp home and socket,
// waits for the socket, then stops it the way SIGTERM does.
func TestRunServesUntilCancelled(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	// A socket file left by a dead plugin must not stop start-up.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var stderr syncBuffer
	done := make(chan int)
	go func() {
		done <- run(ctx, []string{"--home", filepath.Join(dir, "home"), "--endpoint", "unix://" + sock, "--node-id", "n1"}, &stderr, &stderr)
	}()
	waitSocket(t, sock, &stderr)
	for _, d := range []string{"boxes", "tmp", "images/disk-images", "locks"} {
		if _, err := os.Stat(filepath.Join(dir, "home", d)); err != nil {
			t.Errorf("home not prepared: %v", err)
		}
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("exit %d after cancel; output:\n%s", code, stderr.String())
	}
}

// waitSocket waits for a plugin started by run to listen on sock.
func waitSocket(t *testing.T, sock string, output *syncBuffer) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket never appeared; output:\n%s", output.String())
		}
	}
}

func TestByteSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true}, {"4096", 4096, true}, {"2Gi", 2 << 30, true}, {"1Ti", 1 << 40, true},
		{"5M", 5e6, true}, {"-1", 0, false}, {"1.5Gi", 0, false}, {"Gi", 0, false}, {"9999999Ti", 0, false},
	}
	for _, tc := range cases {
		var b byteSize
		err := b.Set(tc.in)
		if (err == nil) != tc.ok || tc.ok && int64(b) != tc.want {
			t.Errorf("%q: %d, %v; want %d ok=%v", tc.in, b, err, tc.want, tc.ok)
		}
	}
}
