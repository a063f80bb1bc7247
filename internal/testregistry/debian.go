package testregistry

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// DebianBinary is Debian's docker-registry (package docker-registry).
const DebianBinary = "/usr/bin/docker-registry"

// DebianOptions configure StartDebian.
type DebianOptions struct {
	// User and Password enable htpasswd (bcrypt) basic auth.
	User, Password string
	// TLS serves HTTPS with a self-signed certificate for 127.0.0.1 and
	// localhost (trust it with Debian.CertPool).
	TLS bool
}

// Debian is a running docker-registry.
type Debian struct {
	host  string
	opts  DebianOptions
	pool  *x509.CertPool
	rt    http.RoundTripper
	cmd   *exec.Cmd
	out   *syncBuffer
	done  chan struct{}
	state error
}

// StartDebian runs `docker-registry serve` on 127.0.0.1 with a free port
// and storage in a temporary directory, and waits until /v2/ answers. The
// process is killed and waited for in t.Cleanup. It skips the test when
// the binary (or, for auth, htpasswd) is not installed.
func StartDebian(t testing.TB, opts DebianOptions) *Debian {
	t.Helper()
	testenv.RequireFile(t, DebianBinary, "apt-get install docker-registry")
	dir := t.TempDir()
	var auth, tlsConf string
	if opts.User != "" {
		htpasswd := testenv.RequireTool(t, "htpasswd", "apt-get install apache2-utils")
		out, err := exec.Command(htpasswd, "-Bbn", opts.User, opts.Password).Output()
		if err != nil {
			t.Fatalf("testregistry: htpasswd: %v", err)
		}
		pw := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(pw, bytes.TrimSpace(out), 0o600); err != nil {
			t.Fatal(err)
		}
		auth = fmt.Sprintf("auth:\n  htpasswd:\n    realm: testregistry\n    path: %s\n", pw)
	}
	d := &Debian{opts: opts}
	base := http.DefaultTransport.(*http.Transport).Clone()
	if opts.TLS {
		certPEM, keyPEM, pool := selfSigned(t)
		cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
		if err := os.WriteFile(cert, certPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(key, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		tlsConf = fmt.Sprintf("  tls:\n    certificate: %s\n    key: %s\n", cert, key)
		d.pool = pool
		base.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	base.Proxy = nil
	d.rt = base
	t.Cleanup(base.CloseIdleConnections)

	// A free port can be taken between our probe and the server's bind:
	// try a few times.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port := freePort(t)
		d.host = fmt.Sprintf("127.0.0.1:%d", port)
		conf := filepath.Join(dir, "config.yml")
		yml := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: testregistry-secret
%s%s`, filepath.Join(dir, "storage"), d.host, tlsConf, auth)
		if err := os.WriteFile(conf, []byte(yml), 0o600); err != nil {
			t.Fatal(err)
		}
		if lastErr = d.start(t, conf); lastErr == nil {
			return d
		}
	}
	t.Fatalf("testregistry: docker-registry did not start: %v", lastErr)
	return nil
}

func (d *Debian) start(t testing.TB, conf string) error {
	d.out = &syncBuffer{}
	d.cmd = exec.Command(DebianBinary, "serve", conf)
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		return err
	}
	d.done = make(chan struct{})
	go func() {
		d.state = d.cmd.Wait()
		close(d.done)
	}()
	stop := func() {
		select {
		case <-d.done:
			return
		default:
		}
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(5 * time.Second):
			_ = d.cmd.Process.Kill()
			<-d.done
		}
	}
	scheme := "http"
	if d.opts.TLS {
		scheme = "https"
	}
	client := &http.Client{Transport: d.rt, Timeout: 2 * time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			return fmt.Errorf("exited (%v): %s", d.state, d.out.String())
		default:
		}
		resp, err := client.Get(scheme + "://" + d.host + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				t.Cleanup(func() {
					stop()
					if t.Failed() {
						t.Logf("docker-registry output:\n%s", d.out.String())
					}
				})
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	return fmt.Errorf("no answer on %s within 20s: %s", d.host, d.out.String())
}

// Host is "127.0.0.1:port".
func (d *Debian) Host() string { return d.host }

// Ref is Host()+"/"+repoAndTag.
func (d *Debian) Ref(repoAndTag string) string { return d.host + "/" + repoAndTag }

// CertPool trusts the self-signed certificate (nil without TLS).
func (d *Debian) CertPool() *x509.CertPool { return d.pool }

// Push writes img as repoAndTag with the configured credentials and
// returns the pinned reference.
func (d *Debian) Push(t testing.TB, repoAndTag string, img v1.Image) string {
	t.Helper()
	return push(t, d.Ref(repoAndTag), img, d.auth(), d.rt, !d.opts.TLS)
}

// PushIndex writes idx as repoAndTag and returns the pinned reference.
func (d *Debian) PushIndex(t testing.TB, repoAndTag string, idx v1.ImageIndex) string {
	t.Helper()
	return push(t, d.Ref(repoAndTag), idx, d.auth(), d.rt, !d.opts.TLS)
}

func (d *Debian) auth() authn.Authenticator {
	if d.opts.User == "" {
		return authn.Anonymous
	}
	return &authn.Basic{Username: d.opts.User, Password: d.opts.Password}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testregistry: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// selfSigned makes a CA-style self-signed ECDSA certificate for 127.0.0.1
// and localhost.
func selfSigned(t testing.TB) (certPEM, keyPEM []byte, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "testregistry", Organization: []string{"boxlite-csi tests"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), pool
}

// syncBuffer collects process output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.b.Len() > 1<<20 {
		return len(p), nil
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.TrimSpace(s.b.String())
}
