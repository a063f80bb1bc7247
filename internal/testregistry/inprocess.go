// Package testregistry runs container registries for tests: an in-process
// go-containerregistry registry with request counting, optional basic
// auth and optional TLS, and Debian's docker-registry (distribution) as a
// real external server.
package testregistry

import (
	"crypto/subtle"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Option configures NewInProcess.
type Option func(*config)

type config struct {
	user, pass string
	tls        bool
	middleware []func(http.Handler) http.Handler
}

// WithBasicAuth requires HTTP basic auth with user and password; other
// requests get 401 with a `WWW-Authenticate: Basic realm=…` challenge.
func WithBasicAuth(user, password string) Option {
	return func(c *config) { c.user, c.pass = user, password }
}

// WithTLS serves HTTPS with a certificate for 127.0.0.1 from a test CA
// (see CertPool).
func WithTLS() Option { return func(c *config) { c.tls = true } }

// WithMiddleware wraps the registry handler (inside auth and counting), to
// inject failures or odd responses.
func WithMiddleware(mw func(http.Handler) http.Handler) Option {
	return func(c *config) { c.middleware = append(c.middleware, mw) }
}

// Registry is an in-process registry on 127.0.0.1.
type Registry struct {
	srv  *httptest.Server
	cfg  config
	mu   sync.Mutex
	log  []string
	blob map[string]int // digest -> authorised GETs
	man  int            // authorised manifest GETs
}

// NewInProcess starts a go-containerregistry registry on an httptest
// server; it is closed in t.Cleanup.
func NewInProcess(t testing.TB, opts ...Option) *Registry {
	t.Helper()
	r := &Registry{blob: map[string]int{}}
	for _, o := range opts {
		o(&r.cfg)
	}
	var h http.Handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	for _, mw := range r.cfg.middleware {
		h = mw(h)
	}
	h = r.count(h)
	if r.cfg.user != "" {
		h = r.basicAuth(h)
	}
	r.srv = httptest.NewUnstartedServer(h)
	r.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // TLS handshake failures are expected in tests
	if r.cfg.tls {
		r.srv.StartTLS()
	} else {
		r.srv.Start()
	}
	t.Cleanup(r.srv.Close)
	return r
}

func (r *Registry) basicAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		u, p, ok := req.BasicAuth()
		if !ok || subtle.ConstantTimeCompare([]byte(u), []byte(r.cfg.user)) != 1 ||
			subtle.ConstantTimeCompare([]byte(p), []byte(r.cfg.pass)) != 1 {
			r.record(req, "401")
			w.Header().Set("WWW-Authenticate", `Basic realm="testregistry"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		next.ServeHTTP(w, req)
	})
}

func (r *Registry) record(req *http.Request, note string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, req.Method+" "+req.URL.Path+" "+note)
}

// count logs every request and counts authorised blob and manifest GETs.
func (r *Registry) count(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.record(req, "")
		if req.Method == http.MethodGet {
			p := req.URL.Path
			r.mu.Lock()
			if i := strings.LastIndex(p, "/blobs/"); strings.HasPrefix(p, "/v2/") && i > 0 && !strings.Contains(p, "/uploads/") {
				r.blob[p[i+len("/blobs/"):]]++
			} else if strings.HasPrefix(p, "/v2/") && strings.Contains(p, "/manifests/") {
				r.man++
			}
			r.mu.Unlock()
		}
		next.ServeHTTP(w, req)
	})
}

// Host is "127.0.0.1:port".
func (r *Registry) Host() string { return r.srv.Listener.Addr().String() }

// Ref is Host()+"/"+repoAndTag.
func (r *Registry) Ref(repoAndTag string) string { return r.Host() + "/" + repoAndTag }

// URL is the base URL (http:// or https://).
func (r *Registry) URL() string { return r.srv.URL }

// CertPool trusts the registry's TLS certificate (nil without WithTLS).
func (r *Registry) CertPool() *x509.CertPool {
	if !r.cfg.tls {
		return nil
	}
	p := x509.NewCertPool()
	p.AddCert(r.srv.Certificate())
	return p
}

// Transport reaches the registry (trusting its certificate with WithTLS).
func (r *Registry) Transport() http.RoundTripper { return r.srv.Client().Transport }

// BlobGETs counts authorised GET /v2/<repo>/blobs/<digest> for digest.
func (r *Registry) BlobGETs(digest v1.Hash) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.blob[digest.String()]
}

// ManifestGETs counts authorised GET /v2/<repo>/manifests/<ref>.
func (r *Registry) ManifestGETs() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.man
}

// Requests returns the log: "METHOD /path" plus " 401" for refused ones.
func (r *Registry) Requests() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.log...)
}

// Reset clears the counters and the log.
func (r *Registry) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log, r.blob, r.man = nil, map[string]int{}, 0
}

// Push writes img as repoAndTag ("busybox:1") and returns the pinned
// reference (host/repo@digest). Pushes do not count as GETs of interest
// but are in the log; call Reset after pushing if that matters.
func (r *Registry) Push(t testing.TB, repoAndTag string, img v1.Image) string {
	t.Helper()
	return push(t, r.Ref(repoAndTag), img, r.auth(), r.Transport(), !r.cfg.tls)
}

// PushIndex writes idx as repoAndTag and returns the pinned reference.
func (r *Registry) PushIndex(t testing.TB, repoAndTag string, idx v1.ImageIndex) string {
	t.Helper()
	return push(t, r.Ref(repoAndTag), idx, r.auth(), r.Transport(), !r.cfg.tls)
}

func (r *Registry) auth() authn.Authenticator {
	if r.cfg.user == "" {
		return authn.Anonymous
	}
	return &authn.Basic{Username: r.cfg.user, Password: r.cfg.pass}
}

// push writes an image or index with remote.Write / remote.WriteIndex.
func push(t testing.TB, ref string, obj any, auth authn.Authenticator, rt http.RoundTripper, plainHTTP bool) string {
	t.Helper()
	var nopts []name.Option
	if plainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	tag, err := name.NewTag(ref, nopts...)
	if err != nil {
		t.Fatalf("testregistry: %v", err)
	}
	ropts := []remote.Option{remote.WithAuth(auth), remote.WithTransport(rt)}
	var d v1.Hash
	switch o := obj.(type) {
	case v1.Image:
		err = remote.Write(tag, o, ropts...)
		if err == nil {
			d, err = o.Digest()
		}
	case v1.ImageIndex:
		err = remote.WriteIndex(tag, o, ropts...)
		if err == nil {
			d, err = o.Digest()
		}
	default:
		t.Fatalf("testregistry: cannot push %T", obj)
	}
	if err != nil {
		t.Fatalf("testregistry: push %s: %v", ref, err)
	}
	return tag.Context().Name() + "@" + d.String()
}
