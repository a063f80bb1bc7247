package source

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/google/go-containerregistry/pkg/name"
)

// MaxRefLen is the longest reference Parse accepts, in bytes.
const MaxRefLen = 4096

// Transport says where an image comes from.
type Transport string

// The transports Parse knows.
const (
	// TransportRegistry is a registry reference (no prefix).
	TransportRegistry Transport = "registry"
	// TransportOCI is an OCI image-layout directory ("oci:").
	TransportOCI Transport = "oci"
	// TransportOCIArchive is a tar of an OCI image layout ("oci-archive:").
	TransportOCIArchive Transport = "oci-archive"
	// TransportDockerArchive is a `docker save` tarball ("docker-archive:").
	TransportDockerArchive Transport = "docker-archive"
)

// transports that other tools know and we do not support: a reference
// starting with one of these followed by ':' is refused with a clear
// message instead of being read as repository:tag.
var foreignTransports = map[string]bool{
	"docker": true, "docker-daemon": true, "containers-storage": true,
	"dir": true, "ostree": true, "sif": true, "tarball": true,
	"http": true, "https": true, "file": true, "oci-dir": true,
}

// Ref is a parsed image reference. The zero Ref is invalid; get one from
// Parse. Refs are comparable with ==, and Parse(r.String()) == r.
type Ref struct {
	transport Transport
	// registry: the reference exactly as given.
	raw string
	// registry: fully qualified repository, e.g. index.docker.io/library/busybox.
	repo string
	// local transports: the cleaned absolute path.
	path string
	// registry: tag if the reference names one ("latest" if it names neither
	// tag nor digest); oci/oci-archive: the ref.name; docker-archive: repo:tag.
	tag string
	// "algo:hex" if the reference pins a digest.
	digest string
}

// Transport returns where the image comes from.
func (r Ref) Transport() Transport { return r.transport }

// Repository returns the fully qualified repository of a registry
// reference (e.g. "index.docker.io/library/busybox"), "" otherwise.
func (r Ref) Repository() string { return r.repo }

// Path returns the file or directory of a local reference, "" otherwise.
func (r Ref) Path() string { return r.path }

// Tag returns the tag of a registry reference, the ref.name of an OCI
// layout reference or the repo:tag of a docker-archive reference; "" if
// there is none.
func (r Ref) Tag() string { return r.tag }

// Digest returns the pinned digest ("sha256:…"), or "".
func (r Ref) Digest() string { return r.digest }

// IsDigest tells whether the reference already pins a digest.
func (r Ref) IsDigest() bool { return r.digest != "" }

// String returns the reference in the form Parse accepts.
func (r Ref) String() string {
	switch r.transport {
	case TransportRegistry:
		return r.raw
	case TransportOCI, TransportOCIArchive, TransportDockerArchive:
		s := string(r.transport) + ":" + r.path
		if r.digest != "" {
			return s + "@" + r.digest
		}
		if r.tag != "" {
			return s + ":" + r.tag
		}
		return s
	}
	return ""
}

// PinnedTo names the image with the given digest in the same place as r,
// in the form Image.Pinned has: "<registry>/<repo>@<digest>" (fully
// qualified) or "<transport>:<path>@<digest>".
func (r Ref) PinnedTo(digest string) string { return r.pinned(digest) }

// pinned returns the reference to the given digest in the same place.
func (r Ref) pinned(digest string) string {
	if r.transport == TransportRegistry {
		return r.repo + "@" + digest
	}
	return string(r.transport) + ":" + r.path + "@" + digest
}

// Parse parses an image reference; see the package documentation for the
// accepted forms. Errors are *InvalidReferenceError.
func Parse(s string) (Ref, error) {
	bad := func(format string, a ...any) (Ref, error) {
		return Ref{}, &InvalidReferenceError{Ref: s, Reason: fmt.Sprintf(format, a...)}
	}
	switch {
	case s == "":
		return bad("empty reference")
	case len(s) > MaxRefLen:
		return bad("longer than %d bytes (%d)", MaxRefLen, len(s))
	case !utf8.ValidString(s):
		return bad("not valid UTF-8")
	}
	for _, c := range s {
		if unicode.IsControl(c) {
			return bad("contains control character %U", c)
		}
	}
	if strings.TrimSpace(s) != s {
		return bad("leading or trailing white space")
	}

	if prefix, rest, ok := strings.Cut(s, ":"); ok && !strings.Contains(prefix, "/") && !looksLikePort(rest) {
		switch t := Transport(prefix); t {
		case TransportOCI, TransportOCIArchive, TransportDockerArchive:
			return parseLocal(s, t, rest)
		}
		if foreignTransports[strings.ToLower(prefix)] {
			return bad("unsupported transport %q (supported: registry references without a scheme, oci:, oci-archive:, docker-archive:)", prefix)
		}
		if strings.HasPrefix(rest, "/") {
			return bad("unknown transport %q (supported: registry references without a scheme, oci:, oci-archive:, docker-archive:)", prefix)
		}
	}
	return parseRegistry(s)
}

// looksLikePort tells whether the text after a "host:" is a port followed by
// a path, i.e. the prefix was a registry host.
func looksLikePort(rest string) bool {
	i := 0
	for i < len(rest) && rest[i] >= '0' && rest[i] <= '9' {
		i++
	}
	return i > 0 && i < len(rest) && rest[i] == '/'
}

func parseRegistry(s string) (Ref, error) {
	bad := func(format string, a ...any) (Ref, error) {
		return Ref{}, &InvalidReferenceError{Ref: s, Reason: fmt.Sprintf(format, a...)}
	}
	var ref name.Reference
	var err error
	if strings.Contains(s, "@") {
		ref, err = name.NewDigest(s)
	} else {
		ref, err = name.NewTag(s)
	}
	if err != nil {
		return bad("%s", err.Error())
	}
	repo := ref.Context()
	if _, port := splitPort(repo.RegistryStr()); port != "" {
		port = port[1:]
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return bad("registry port %q is out of range", truncate(port, 20))
		}
	}
	// go-containerregistry only checks the characters of the repository;
	// hold each path component to the distribution grammar.
	for _, comp := range strings.Split(repo.RepositoryStr(), "/") {
		if !validPathComponent(comp) {
			return bad("repository path component %q is not valid (lower-case letters and digits separated by '.', '_', '__' or '-')", truncate(comp, 100))
		}
	}
	r := Ref{transport: TransportRegistry, raw: s, repo: repo.Name()}
	switch v := ref.(type) {
	case name.Tag:
		r.tag = v.TagStr()
	case name.Digest:
		r.digest = v.DigestStr()
		// An informational tag in "repo:tag@digest".
		base, _, _ := strings.Cut(s, "@")
		if i := strings.LastIndexByte(base, ':'); i > strings.LastIndexByte(base, '/') {
			r.tag = base[i+1:]
		}
	}
	return r, nil
}

// validPathComponent: [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
func validPathComponent(c string) bool {
	if c == "" {
		return false
	}
	alnum := func(b byte) bool { return b >= 'a' && b <= 'z' || b >= '0' && b <= '9' }
	i := 0
	for {
		start := i
		for i < len(c) && alnum(c[i]) {
			i++
		}
		if i == start {
			return false
		}
		if i == len(c) {
			return true
		}
		switch {
		case c[i] == '.':
			i++
		case c[i] == '_':
			i++
			if i < len(c) && c[i] == '_' {
				i++
			}
		case c[i] == '-':
			for i < len(c) && c[i] == '-' {
				i++
			}
		default:
			return false
		}
	}
}

func parseLocal(s string, t Transport, rest string) (Ref, error) {
	bad := func(format string, a ...any) (Ref, error) {
		return Ref{}, &InvalidReferenceError{Ref: s, Reason: fmt.Sprintf(format, a...)}
	}
	i := strings.IndexAny(rest, ":@")
	p, suffix := rest, ""
	if i >= 0 {
		p, suffix = rest[:i], rest[i:]
	}
	if p == "" {
		return bad("%s: needs a path", t)
	}
	if !filepath.IsAbs(p) {
		return bad("%s: path %q is not absolute", t, truncate(p, 200))
	}
	for _, comp := range strings.Split(p, "/") {
		if strings.TrimSpace(comp) != comp {
			return bad("%s: path component %q begins or ends with white space", t, truncate(comp, 100))
		}
	}
	r := Ref{transport: t, path: filepath.Clean(p)}
	switch {
	case suffix == "":
	case suffix[0] == '@':
		d := suffix[1:]
		if err := validDigest(d); err != nil {
			return bad("%s: %v", t, err)
		}
		r.digest = d
	default: // ':'
		n := suffix[1:]
		if n == "" {
			return bad("%s: empty name after ':'", t)
		}
		if t == TransportDockerArchive {
			if strings.Contains(n, "@") {
				return bad("docker-archive: use either :<repo:tag> or @<digest>, not both")
			}
			if _, err := name.NewTag(n); err != nil {
				return bad("docker-archive: %q is not a valid repo:tag", truncate(n, 200))
			}
		} else {
			if strings.Contains(n, "@") {
				return bad("%s: use either :<name> or @<digest>, not both (a path may not contain '@')", t)
			}
			if !validRefName(n) {
				return bad("%s: %q is not a valid org.opencontainers.image.ref.name", t, truncate(n, 200))
			}
		}
		r.tag = n
	}
	return r, nil
}

// validDigest accepts sha256 and sha512 digests in lower-case hex.
func validDigest(d string) error {
	algo, hex, ok := strings.Cut(d, ":")
	if !ok {
		return fmt.Errorf("digest %q is not algorithm:hex", truncate(d, 200))
	}
	var n int
	switch algo {
	case "sha256":
		n = 64
	case "sha512":
		n = 128
	default:
		return fmt.Errorf("unsupported digest algorithm %q", truncate(algo, 40))
	}
	if len(hex) != n {
		return fmt.Errorf("%s digest must have %d hex digits, not %d", algo, n, len(hex))
	}
	for i := 0; i < len(hex); i++ {
		if c := hex[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("%s digest must be lower-case hex", algo)
		}
	}
	return nil
}

// validRefName checks the OCI image-layout ref.name grammar:
//
//	ref       ::= component ("/" component)*
//	component ::= alphanum (separator alphanum)*
//	alphanum  ::= [A-Za-z0-9]+
//	separator ::= [-._:@+] | "--"
//
// ('@' is refused by the caller: it separates the digest.)
func validRefName(s string) bool {
	if len(s) > 1024 {
		return false
	}
	for _, comp := range strings.Split(s, "/") {
		if comp == "" {
			return false
		}
		prevSep := true // a component must start with alphanum
		for i := 0; i < len(comp); i++ {
			c := comp[i]
			switch {
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
				prevSep = false
			case c == '-' && i+1 < len(comp) && comp[i+1] == '-':
				if prevSep {
					return false
				}
				i++
				prevSep = true
			case strings.IndexByte("-._:@+", c) >= 0:
				if prevSep {
					return false
				}
				prevSep = true
			default:
				return false
			}
		}
		if prevSep {
			return false
		}
	}
	return true
}

// truncate shortens s for error messages.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	// Do not cut a UTF-8 sequence in half.
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
