package testregistry

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
)

func TestInProcess(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []Option
	}{
		{"plain", nil},
		{"tls+auth", []Option{WithTLS(), WithBasicAuth("alice", "s3cret")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewInProcess(t, tc.opts...)
			img := testimage.Random(t, 1, 2, 10, 10000)
			pinned := r.Push(t, "test/img:1", img)
			want, _ := img.Digest()
			if !strings.HasSuffix(pinned, "@"+want.String()) || !strings.HasPrefix(pinned, r.Host()+"/test/img@") {
				t.Fatalf("pinned %s", pinned)
			}
			r.Reset()

			ref, err := name.ParseReference(pinned)
			if err != nil {
				t.Fatal(err)
			}
			var auth authn.Authenticator = authn.Anonymous
			if len(tc.opts) > 0 {
				auth = &authn.Basic{Username: "alice", Password: "s3cret"}
			}
			got, err := remote.Image(ref, remote.WithAuth(auth), remote.WithTransport(r.Transport()))
			if err != nil {
				t.Fatal(err)
			}
			layers, _ := got.Layers()
			for _, l := range layers {
				rc, err := l.Compressed()
				if err != nil {
					t.Fatal(err)
				}
				rc.Close()
				d, _ := l.Digest()
				if n := r.BlobGETs(d); n != 1 {
					t.Errorf("layer %s fetched %d times", d, n)
				}
			}
			if n := r.ManifestGETs(); n != 1 {
				t.Errorf("%d manifest GETs, log %v", n, r.Requests())
			}
			if len(r.Requests()) == 0 {
				t.Error("empty log")
			}
		})
	}
}

func TestInProcessAuthChallenge(t *testing.T) {
	r := NewInProcess(t, WithBasicAuth("alice", "s3cret"))
	resp, err := http.Get(r.URL() + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") != `Basic realm="testregistry"` {
		t.Errorf("status %d, challenge %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	if got := r.Requests(); len(got) != 1 || got[0] != "GET /v2/ 401" {
		t.Errorf("log %v", got)
	}
}

func TestDebian(t *testing.T) {
	var pid int
	var dir string
	t.Run("run", func(t *testing.T) {
		d := StartDebian(t, DebianOptions{User: "bob", Password: "hunter2", TLS: true})
		pid = d.cmd.Process.Pid
		dir = filepath.Dir(d.cmd.Args[2])
		if d.CertPool() == nil {
			t.Fatal("no cert pool")
		}
		img := testimage.Random(t, 3, 1, 5, 5000)
		pinned := d.Push(t, "x/y:z", img)
		ref, err := name.ParseReference(pinned)
		if err != nil {
			t.Fatal(err)
		}
		got, err := remote.Image(ref, remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}), remote.WithTransport(d.rt))
		if err != nil {
			t.Fatal(err)
		}
		if h, _ := got.Digest(); pinned != d.Host()+"/x/y@"+h.String() {
			t.Errorf("pinned %s, pulled %s", pinned, h)
		}
		if _, err := remote.Image(ref, remote.WithTransport(d.rt)); err == nil {
			t.Error("anonymous pull worked")
		}
	})
	if pid == 0 {
		return // skipped
	}
	// After the subtest's cleanups: no process, no directory.
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("docker-registry %d still running", pid)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s left behind: %v", dir, err)
	}
}
