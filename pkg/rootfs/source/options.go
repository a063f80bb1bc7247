package source

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"runtime"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// DefaultMaxManifestBytes is the default Options.MaxManifestBytes.
const DefaultMaxManifestBytes = 4 << 20

// Options tune Resolve. The zero value is safe: HTTPS only with the
// system's trusted CAs, credentials from the node's docker config if any,
// platform linux/runtime.GOARCH, and a MaxManifestBytes of 4 MiB.
type Options struct {
	// PlainHTTP allows talking plain HTTP to the registry (HTTPS is still
	// tried first). Without it every request is HTTPS, including to
	// localhost and private addresses.
	PlainHTTP bool
	// InsecureSkipTLSVerify accepts any TLS certificate.
	InsecureSkipTLSVerify bool
	// RootCAs are CAs trusted in addition to the system's.
	RootCAs *x509.CertPool
	// DockerConfigJSON is a pull secret payload: the value of a
	// kubernetes.io/dockerconfigjson secret ({"auths":{host:{…}}}) or of a
	// legacy kubernetes.io/dockercfg one ({host:{…}}). Its credentials come
	// first.
	DockerConfigJSON []byte
	// DockerConfigDir holds the node's docker config.json, consulted after
	// the pull secret. Default: $DOCKER_CONFIG, else ~/.docker.
	DockerConfigDir string
	// NoNodeCredentials leaves the node's docker config out: only the pull
	// secret's credentials, or none, are used. It is for requests made on
	// behalf of whoever wrote a pod (an inline volume), who must not get
	// the node's access to private images.
	NoNodeCredentials bool
	// Platform to pick from an index. Default linux/runtime.GOARCH; for
	// arm64 an absent variant and "v8" are the same thing.
	Platform *v1.Platform
	// Transport replaces the HTTP transport (tests). When set,
	// InsecureSkipTLSVerify and RootCAs are not applied to it; PlainHTTP
	// and MaxManifestBytes still are.
	Transport http.RoundTripper
	// MaxManifestBytes bounds each small document that is read whole:
	// image manifests, indexes and image configs, an OCI layout's
	// index.json and oci-layout files, and a docker-archive's manifest.json
	// (its list of images, not an image manifest). Layers are not bounded.
	// Default DefaultMaxManifestBytes.
	MaxManifestBytes int64
	// Transports, if set, pools connections across calls; without it each
	// call gets its own transport. Ignored when Transport is set.
	Transports *Transports
	// RetryBackoff replaces go-containerregistry's retry schedule for
	// requests that fail transiently (connection refused or dropped, 5xx,
	// 429): by default three tries, 1 s and 3 s apart.
	RetryBackoff *remote.Backoff
}

func (o Options) withDefaults() Options {
	if o.MaxManifestBytes <= 0 {
		o.MaxManifestBytes = DefaultMaxManifestBytes
	}
	if o.Platform == nil {
		o.Platform = &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	}
	return o
}

// Transports shares registry connections between calls with the same TLS
// settings. A transport per call keeps its idle keep-alive connection (a
// socket and two goroutines) open for the idle timeout after the call: one
// per CreateVolume, hundreds on a busy node. Credentials go with each
// request, so sharing connections shares nothing else. The zero value is
// ready to use.
type Transports struct {
	m sync.Map // transportKey -> http.RoundTripper
}

type transportKey struct {
	insecure bool
	roots    *x509.CertPool
}

func (p *Transports) get(insecure bool, roots *x509.CertPool) http.RoundTripper {
	k := transportKey{insecure, roots}
	if t, ok := p.m.Load(k); ok {
		return t.(http.RoundTripper)
	}
	t, _ := p.m.LoadOrStore(k, newTLSTransport(insecure, roots))
	return t.(http.RoundTripper)
}

// roundTripper builds the transport for one Resolve, over pooled
// connections when Options.Transports is set.
func (o *Options) roundTripper() http.RoundTripper {
	inner := o.Transport
	switch {
	case inner != nil:
	case o.Transports != nil:
		inner = o.Transports.get(o.InsecureSkipTLSVerify, o.RootCAs)
	default:
		inner = newTLSTransport(o.InsecureSkipTLSVerify, o.RootCAs)
	}
	return &policyTransport{inner: inner, plainHTTP: o.PlainHTTP, maxBytes: o.MaxManifestBytes}
}

func baseTransport() *http.Transport {
	if t, ok := remote.DefaultTransport.(*http.Transport); ok {
		return t.Clone()
	}
	return http.DefaultTransport.(*http.Transport).Clone()
}

func newTLSTransport(insecure bool, extra *x509.CertPool) http.RoundTripper {
	switch {
	case insecure:
		t := baseTransport()
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: true} //nolint:gosec // explicit option
		return t
	case extra != nil:
		return &extraCATransport{extra: extra}
	default:
		t := baseTransport()
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		return t
	}
}

// extraCATransport trusts the system CAs plus extra ones. crypto/x509 has
// no way to merge two pools, so each host gets a transport that verifies
// the chain itself, against the system roots and then the extra ones, and
// checks the certificate names that host (crypto/tls does not tell
// VerifyConnection the host when it is an IP address, hence one transport
// per host).
type extraCATransport struct {
	extra *x509.CertPool
	hosts sync.Map // host -> *http.Transport
}

func (t *extraCATransport) RoundTrip(req *http.Request) (*http.Response, error) {
	host := req.URL.Hostname()
	if rt, ok := t.hosts.Load(host); ok {
		return rt.(*http.Transport).RoundTrip(req)
	}
	ht := baseTransport()
	ht.TLSClientConfig = &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         host,
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyChain(cs.PeerCertificates, host, t.extra)
		},
	}
	rt, _ := t.hosts.LoadOrStore(host, ht)
	return rt.(*http.Transport).RoundTrip(req)
}

func verifyChain(certs []*x509.Certificate, host string, extra *x509.CertPool) error {
	if len(certs) == 0 {
		return &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}
	}
	opts := x509.VerifyOptions{DNSName: host, Intermediates: x509.NewCertPool()}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, sysErr := certs[0].Verify(opts) // Roots nil: the system pool
	if sysErr == nil {
		return nil
	}
	opts.Roots = extra
	if _, err := certs[0].Verify(opts); err == nil {
		return nil
	} else if _, unknown := sysErr.(x509.UnknownAuthorityError); unknown {
		// Known to the extra pool but wrong otherwise (name, expiry):
		// report that rather than "unknown authority".
		sysErr = err
	}
	return &tls.CertificateVerificationError{UnverifiedCertificates: certs, Err: sysErr}
}

// policyTransport is the innermost transport. It refuses anything but
// https:// unless plain HTTP is allowed. It also refuses an answer from
// the registry's /manifests/ endpoint, which serves image manifests and
// indexes, that is larger than maxBytes. It does so before reading more
// than maxBytes+1 bytes of it.
//
// go-containerregistry pings localhost, 127.0.0.1 and RFC 1918 registries
// over HTTPS and HTTP at once and then uses whichever answered; refusing
// the HTTP attempt here leaves HTTPS. Requests to the registry after the
// ping are rewritten to the scheme the ping settled on, so they are HTTPS
// too; other hosts (token servers, blob redirects) must be HTTPS.
type policyTransport struct {
	inner     http.RoundTripper
	plainHTTP bool
	maxBytes  int64 // Options.MaxManifestBytes
}

func (p *policyTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" && !p.plainHTTP {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, &PlainHTTPError{Host: req.URL.Host}
	}
	resp, err := p.inner.RoundTrip(req)
	if err != nil || req.Method != http.MethodGet || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	what := manifestKind(req.URL.Path, resp.Header.Get("Content-Type"))
	if what == "" {
		return resp, nil
	}
	if resp.ContentLength > p.maxBytes {
		resp.Body.Close()
		return nil, &ManifestTooLargeError{What: what, Size: resp.ContentLength, Limit: p.maxBytes}
	}
	resp.Body = &limitBody{rc: resp.Body, left: p.maxBytes, err: &ManifestTooLargeError{What: what, Size: -1, Limit: p.maxBytes}}
	return resp, nil
}

// manifestKind names the answer to a GET of path for messages. It returns
// "" if path is not /v2/<repo>/manifests/<ref>. Otherwise it returns
// "index" if contentType is an index type, and "manifest" if it is not:
// an image manifest, or a type that is checked later.
func manifestKind(path, contentType string) string {
	if !strings.HasPrefix(path, "/v2/") || !strings.Contains(path, "/manifests/") {
		return ""
	}
	if types.MediaType(contentType).IsIndex() {
		return "index"
	}
	return "manifest"
}

// limitBody fails with err once more than left bytes have been read.
type limitBody struct {
	rc   io.ReadCloser
	left int64
	err  error
}

func (l *limitBody) Read(b []byte) (int, error) {
	if l.left < 0 {
		return 0, l.err
	}
	if int64(len(b)) > l.left {
		b = b[:l.left+1]
	}
	n, err := l.rc.Read(b)
	l.left -= int64(n)
	if l.left < 0 {
		return 0, l.err
	}
	return n, err
}

func (l *limitBody) Close() error { return l.rc.Close() }
