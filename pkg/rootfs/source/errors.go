package source

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// maxRefInMessage bounds how much of a reference an error message quotes.
const maxRefInMessage = 256

// InvalidReferenceError is returned by Parse (and by Resolve when a
// reference is syntactically fine but does not say enough, e.g. a layout
// holding several images and no name). The driver maps it to
// InvalidArgument.
type InvalidReferenceError struct {
	Ref    string
	Reason string
}

func (e *InvalidReferenceError) Error() string {
	return fmt.Sprintf("invalid image reference %q: %s", truncate(e.Ref, maxRefInMessage), truncate(e.Reason, 2*maxRefInMessage))
}

// InvalidDockerConfigError reports a malformed docker config: the pull
// secret payload (Source "pull secret") or the node's config.json (Source
// is its path). Its message never contains credentials.
type InvalidDockerConfigError struct {
	Source string
	Reason string
}

func (e *InvalidDockerConfigError) Error() string {
	return fmt.Sprintf("invalid docker config in %s: %s", e.Source, e.Reason)
}

// PlatformNotFoundError is returned when an index has no image for the
// requested platform, or a single image is built for another platform.
type PlatformNotFoundError struct {
	Ref     string
	Want    string
	Offered []string
	single  bool // a lone image, not an index
}

func (e *PlatformNotFoundError) Error() string {
	if e.single && len(e.Offered) == 1 {
		return fmt.Sprintf("image %q is built for %s, not %s", truncate(e.Ref, maxRefInMessage), e.Offered[0], e.Want)
	}
	offers := "nothing"
	if len(e.Offered) > 0 {
		offers = strings.Join(e.Offered, ", ")
	}
	return fmt.Sprintf("no %s image in index %q; it offers %s", e.Want, truncate(e.Ref, maxRefInMessage), offers)
}

// ManifestTooLargeError is returned when a document that is read whole is
// larger than Options.MaxManifestBytes. That is an image manifest, an
// index, an image config, an OCI layout's index.json or oci-layout file, or
// a docker-archive's manifest.json (its list of images). It is detected
// before the document is read whole.
type ManifestTooLargeError struct {
	What  string // such as "manifest", "index", "image config sha256:…", "index.json", "manifest.json"
	Size  int64  // -1 if unknown (no Content-Length)
	Limit int64
}

func (e *ManifestTooLargeError) Error() string {
	size := "more"
	if e.Size >= 0 {
		size = fmt.Sprintf("%d bytes", e.Size)
	}
	return fmt.Sprintf("%s is too large: %s, limit %d bytes (Options.MaxManifestBytes)", e.What, size, e.Limit)
}

// PlainHTTPError is a plain-HTTP request refused because Options.PlainHTTP
// is not set.
type PlainHTTPError struct{ Host string }

func (e *PlainHTTPError) Error() string {
	return fmt.Sprintf("plain HTTP to %s refused (allow it with Options.PlainHTTP)", e.Host)
}

// notFoundError is a missing tag, name or digest in a local source.
type notFoundError struct{ msg string }

func (e *notFoundError) Error() string { return e.msg }

// Error is what Resolve returns for failures that are not one of the typed
// errors above (those are wrapped in it too). It names the reference and,
// for registries, the registry; Unwrap gives the cause.
type Error struct {
	Ref      string // the reference as given
	Registry string // registry host, "" for local sources
	Err      error
	hint     string // a sentence saying what to do, or ""
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "image %q", truncate(e.Ref, maxRefInMessage))
	if e.hint != "" {
		b.WriteString(": ")
		b.WriteString(e.hint)
	}
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// credInfo says which credentials were sent, for error messages.
type credInfo struct {
	source string // "pull secret", a config.json path, or "" (anonymous)
	user   string // may be "" for token credentials
	looked []string
}

// wrap turns err into an *Error naming ref and registry, with a hint that
// says what the failure means.
func wrap(ref Ref, registry string, cred credInfo, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	e = &Error{Ref: ref.String(), Registry: registry, Err: err}
	switch classify(err) {
	case kindUnauthorized:
		status := "access denied"
		var te *transport.Error
		if errors.As(err, &te) {
			status = fmt.Sprintf("access denied (HTTP %d)", te.StatusCode)
		}
		switch {
		case cred.source == "":
			e.hint = fmt.Sprintf("unauthorized: registry %s: %s and no credentials for it were found (looked in: %s)",
				registry, status, strings.Join(cred.looked, ", "))
		case cred.user != "":
			e.hint = fmt.Sprintf("unauthorized: registry %s: %s with the credentials of user %q from %s (wrong credentials, or no pull access)",
				registry, status, cred.user, cred.source)
		default:
			e.hint = fmt.Sprintf("unauthorized: registry %s: %s with the token from %s (wrong credentials, or no pull access)",
				registry, status, cred.source)
		}
	case kindNotFound:
		e.hint = "not found"
	case kindUnavailable:
		var le *LayerError
		switch {
		case errors.As(err, &le) && classify(le.Err) == kindOther:
			e.hint = fmt.Sprintf("registry %s served a corrupt or truncated blob for layer %s (nothing of it was kept; a retry fetches it again)", registry, le.Digest)
		case isCertError(err):
			e.hint = fmt.Sprintf("registry %s unavailable: its TLS certificate is not trusted; add its CA to Options.RootCAs", registry)
		case isPlainHTTPAnswer(err):
			e.hint = fmt.Sprintf("registry %s unavailable: it answered HTTPS with plain HTTP; plain-HTTP registries must be allowed with Options.PlainHTTP", registry)
		case registry != "":
			e.hint = fmt.Sprintf("registry %s unavailable", registry)
		default:
			e.hint = "unavailable"
		}
	}
	return e
}

type kind int

const (
	kindOther kind = iota
	kindInvalid
	kindNotFound
	kindUnauthorized
	kindUnavailable
)

// IsInvalidArgument tells whether err comes from a malformed reference or
// pull secret (gRPC InvalidArgument).
func IsInvalidArgument(err error) bool { return classify(err) == kindInvalid }

// IsNotFound tells whether the image, tag, repository, blob, local file or
// local name does not exist (gRPC NotFound).
func IsNotFound(err error) bool { return classify(err) == kindNotFound }

// IsUnauthorized tells whether the registry refused the credentials sent,
// or wants credentials and none were found (HTTP 401/403).
func IsUnauthorized(err error) bool { return classify(err) == kindUnauthorized }

// IsUnavailable tells whether the registry could not be reached or is
// failing: connection refused, DNS failure, timeouts, 5xx and 429, TLS
// failures (untrusted certificate, HTTPS to a plain-HTTP server). Context
// cancellation and deadlines of the caller's ctx are not "unavailable":
// check ctx.Err() first.
func IsUnavailable(err error) bool { return classify(err) == kindUnavailable }

func classify(err error) kind {
	if err == nil {
		return kindOther
	}
	var ir *InvalidReferenceError
	var dc *InvalidDockerConfigError
	if errors.As(err, &ir) {
		return kindInvalid
	}
	if errors.As(err, &dc) {
		// A broken node config.json is the node's problem, not the
		// caller's argument.
		if dc.Source == secretSource {
			return kindInvalid
		}
		return kindOther
	}
	var te *transport.Error
	if errors.As(err, &te) {
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return kindNotFound
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return kindUnauthorized
			case transport.TooManyRequestsErrorCode, transport.UnavailableErrorCode:
				return kindUnavailable
			}
		}
		switch c := te.StatusCode; {
		case c == http.StatusNotFound:
			return kindNotFound
		case c == http.StatusUnauthorized || c == http.StatusForbidden:
			return kindUnauthorized
		case c == http.StatusRequestTimeout || c == http.StatusTooManyRequests || c >= 500:
			return kindUnavailable
		}
		return kindOther
	}
	var nf *notFoundError
	if errors.As(err, &nf) || errors.Is(err, fs.ErrNotExist) {
		return kindNotFound
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return kindOther
	}
	// A request whose connection closed before a whole answer came back:
	// the registry (or something in front of it) dropped it.
	var ue *url.Error
	if errors.As(err, &ue) && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
		return kindUnavailable
	}
	var ph *PlainHTTPError
	if errors.As(err, &ph) || isPlainHTTPAnswer(err) || isCertError(err) {
		return kindUnavailable
	}
	var rh tls.RecordHeaderError
	var ne net.Error
	var op *net.OpError
	var dns *net.DNSError
	switch {
	case errors.As(err, &rh), errors.As(err, &op), errors.As(err, &dns):
		return kindUnavailable
	case errors.As(err, &ne) && ne.Timeout():
		return kindUnavailable
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EPIPE):
		return kindUnavailable
	}
	// Reached only when the cause is none of the above: a layer body that
	// does not hash to its digest or ends early.
	var le *LayerError
	if errors.As(err, &le) {
		return kindUnavailable
	}
	return kindOther
}

// isPlainHTTPAnswer: an HTTPS request got a plain-HTTP answer. net/http
// reports it only as text.
func isPlainHTTPAnswer(err error) bool {
	return strings.Contains(err.Error(), "server gave HTTP response to HTTPS client")
}

func isCertError(err error) bool {
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	return errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci)
}
