package source

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/docker/cli/cli/config"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// secretSource names the pull secret in messages and errors.
const secretSource = "pull secret"

// maxDockerConfigBytes bounds a docker config (secret payload or file).
const maxDockerConfigBytes = 4 << 20

// dockerHubHost is how go-containerregistry names Docker Hub.
const dockerHubHost = name.DefaultRegistry // "index.docker.io"

// dockerAuth is one credential of a docker config.
type dockerAuth struct {
	key  string // as written in the config
	host string // lower-case host[:port], Docker Hub aliases folded
	path string // repository prefix it is restricted to, "" for the host
	glob bool   // host has '*' labels
	cfg  authn.AuthConfig
}

// dockerConfig is a parsed docker config.json / pull secret payload.
type dockerConfig struct {
	auths       []dockerAuth
	credsStore  string
	credHelpers map[string]string
}

// dockerEntry is one value of "auths". encoding/json matches the field
// names case-insensitively, as Docker and kubelet do.
type dockerEntry struct {
	Username      string `json:"username"`
	Password      string `json:"password"`
	Auth          string `json:"auth"`
	IdentityToken string `json:"identitytoken"`
	RegistryToken string `json:"registrytoken"`
}

// parseDockerConfig parses a kubernetes.io/dockerconfigjson payload
// ({"auths":{host:entry}}), a docker config.json (the same plus
// credsStore/credHelpers; other keys are ignored) or, if legacy is set and
// there is no "auths", a legacy .dockercfg payload ({host:entry}).
// Entries carrying no credential are ignored. Errors never quote the
// payload.
func parseDockerConfig(data []byte, source string, legacy bool) (*dockerConfig, error) {
	bad := func(format string, a ...any) (*dockerConfig, error) {
		return nil, &InvalidDockerConfigError{Source: source, Reason: fmt.Sprintf(format, a...)}
	}
	if len(data) > maxDockerConfigBytes {
		return bad("larger than %d bytes", maxDockerConfigBytes)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return bad("%s", describeJSONError(err))
	}
	if top == nil {
		return bad("not a JSON object")
	}
	dc := &dockerConfig{}
	var entries map[string]json.RawMessage
	if _, hasAuths := top["auths"]; hasAuths || !legacy {
		if raw, ok := top["auths"]; ok && !isJSONNull(raw) {
			if err := json.Unmarshal(raw, &entries); err != nil {
				return bad("\"auths\": %s", describeJSONError(err))
			}
		}
		if raw, ok := top["credsStore"]; ok && !isJSONNull(raw) {
			if err := json.Unmarshal(raw, &dc.credsStore); err != nil {
				return bad("\"credsStore\" is not a string")
			}
		}
		if raw, ok := top["credHelpers"]; ok && !isJSONNull(raw) {
			if err := json.Unmarshal(raw, &dc.credHelpers); err != nil {
				return bad("\"credHelpers\" is not an object of strings")
			}
		}
	} else {
		entries = top // legacy .dockercfg
	}

	keys := make([]string, 0, len(entries))
	for k := range entries {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		raw := entries[k]
		if isJSONNull(raw) {
			continue
		}
		var e dockerEntry
		if err := json.Unmarshal(raw, &e); err != nil {
			return bad("entry %q: %s", truncate(k, 100), describeJSONError(err))
		}
		host, p, glob, ok := parseAuthKey(k)
		if !ok {
			return bad("entry %q is not a registry host", truncate(k, 100))
		}
		cfg := authn.AuthConfig{
			Username:      e.Username,
			Password:      e.Password,
			IdentityToken: e.IdentityToken,
			RegistryToken: e.RegistryToken,
		}
		if e.Auth != "" {
			dec, err := base64.StdEncoding.DecodeString(strings.TrimSpace(e.Auth))
			if err != nil {
				return bad("entry %q: \"auth\" is not valid base64", truncate(k, 100))
			}
			user, pass, found := strings.Cut(string(dec), ":")
			if !found {
				return bad("entry %q: \"auth\" does not decode to user:password", truncate(k, 100))
			}
			cfg.Username, cfg.Password = user, pass
		}
		if cfg == (authn.AuthConfig{}) {
			continue
		}
		dc.auths = append(dc.auths, dockerAuth{key: k, host: host, path: p, glob: glob, cfg: cfg})
	}
	return dc, nil
}

func isJSONNull(raw json.RawMessage) bool {
	return string(bytes.TrimSpace(raw)) == "null"
}

// describeJSONError says what is wrong without quoting the input
// (json.SyntaxError messages quote a character of it).
func describeJSONError(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("not valid JSON (syntax error at byte %d)", se.Offset)
	case errors.As(err, &te):
		if te.Field != "" {
			return fmt.Sprintf("field %q must not be a JSON %s", truncate(te.Field, 100), te.Value)
		}
		return fmt.Sprintf("expected a JSON object, found a JSON %s", te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "not valid JSON (truncated)"
	}
	return "not valid JSON"
}

// dockerHubAliases are the names Docker Hub goes by in config keys.
var dockerHubAliases = map[string]bool{
	"docker.io": true, "index.docker.io": true, "registry-1.docker.io": true,
	"registry.hub.docker.com": true,
}

// parseAuthKey normalises a config key the way kubelet and Docker read
// them: an optional http:// or https:// scheme, a host[:port], an optional
// "/v1/" or "/v2/" API suffix (ignored) and an optional repository path
// the credential is restricted to. Host labels may be '*' globs
// ("*.example.com"), as kubelet allows.
func parseAuthKey(key string) (host, repoPath string, glob, ok bool) {
	k := key
	if l := strings.ToLower(k); strings.HasPrefix(l, "https://") {
		k = k[len("https://"):]
	} else if strings.HasPrefix(l, "http://") {
		k = k[len("http://"):]
	}
	host, repoPath, _ = strings.Cut(k, "/")
	host = strings.ToLower(host)
	repoPath = strings.Trim(repoPath, "/")
	for _, api := range []string{"v1", "v2"} {
		if repoPath == api {
			repoPath = ""
		} else if strings.HasPrefix(repoPath, api+"/") {
			repoPath = strings.Trim(repoPath[len(api)+1:], "/")
		}
	}
	if host == "" || strings.ContainsAny(host, " \t@?#") {
		return "", "", false, false
	}
	if dockerHubAliases[host] {
		host = dockerHubHost
	}
	return host, repoPath, strings.Contains(host, "*"), true
}

// splitPort splits "host:port" ("[v6]:port") into host and ":port" ("" if
// there is no colon; an empty port is ":", not the same as none).
func splitPort(h string) (string, string) {
	if strings.HasPrefix(h, "[") {
		if i := strings.IndexByte(h, ']'); i >= 0 {
			return h[:i+1], h[i+1:]
		}
		return h, ""
	}
	if i := strings.LastIndexByte(h, ':'); i >= 0 {
		return h[:i], h[i:]
	}
	return h, ""
}

// hostMatches tells whether a config host (maybe with '*' labels) matches
// a registry host. Ports must be equal (both absent counts as equal).
func hostMatches(pattern, host string, glob bool) bool {
	ph, pp := splitPort(pattern)
	hh, hp := splitPort(host)
	if pp != hp {
		return false
	}
	if !glob {
		return ph == hh
	}
	pl, hl := strings.Split(ph, "."), strings.Split(hh, ".")
	if len(pl) != len(hl) {
		return false
	}
	for i := range pl {
		if ok, err := path.Match(pl[i], hl[i]); err != nil || !ok {
			return false
		}
	}
	return true
}

// lookup returns the most specific credential for registry/repo: exact
// hosts beat globs, longer repository prefixes beat shorter ones.
func (dc *dockerConfig) lookup(registry, repo string) (dockerAuth, bool) {
	registry = strings.ToLower(registry)
	if dockerHubAliases[registry] {
		registry = dockerHubHost
	}
	var best dockerAuth
	found := false
	better := func(a, b dockerAuth) bool {
		if a.glob != b.glob {
			return !a.glob
		}
		if len(a.path) != len(b.path) {
			return len(a.path) > len(b.path)
		}
		return a.key < b.key
	}
	for _, a := range dc.auths {
		if !hostMatches(a.host, registry, a.glob) {
			continue
		}
		if a.path != "" && repo != a.path && !strings.HasPrefix(repo, a.path+"/") {
			continue
		}
		if !found || better(a, best) {
			best, found = a, true
		}
	}
	return best, found
}

// nodeConfigPath is the node's docker config.json.
func (o *Options) nodeConfigPath() string {
	dir := o.DockerConfigDir
	if dir == "" {
		dir = os.Getenv("DOCKER_CONFIG")
	}
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		dir = filepath.Join(home, ".docker")
	}
	return filepath.Join(dir, "config.json")
}

// authenticator picks the credentials for repo: the pull secret, then the
// node's docker config.json (its credential helpers, then its auths), then
// anonymous.
func (o *Options) authenticator(repo name.Repository) (authn.Authenticator, credInfo, error) {
	registry, repoPath := repo.RegistryStr(), repo.RepositoryStr()
	var info credInfo
	if len(o.DockerConfigJSON) > 0 {
		dc, err := parseDockerConfig(o.DockerConfigJSON, secretSource, true)
		if err != nil {
			return nil, info, err
		}
		if a, ok := dc.lookup(registry, repoPath); ok {
			return authn.FromConfig(a.cfg), credInfo{source: secretSource, user: a.cfg.Username}, nil
		}
		info.looked = append(info.looked, secretSource)
	}
	if o.NoNodeCredentials {
		return authn.Anonymous, info, nil
	}
	p := o.nodeConfigPath()
	if p == "" {
		return authn.Anonymous, info, nil
	}
	info.looked = append(info.looked, p)
	data, err := readFileLimit(p, maxDockerConfigBytes)
	if errors.Is(err, fs.ErrNotExist) {
		return authn.Anonymous, info, nil
	}
	if err != nil {
		return nil, info, &InvalidDockerConfigError{Source: p, Reason: err.Error()}
	}
	dc, err := parseDockerConfig(data, p, false)
	if err != nil {
		return nil, info, err
	}
	if dc.credHelpers[registry] != "" || dc.credsStore != "" {
		cf, err := config.LoadFromReader(bytes.NewReader(data))
		if err != nil {
			return nil, info, &InvalidDockerConfigError{Source: p, Reason: "cannot be loaded"}
		}
		key := registry
		if key == dockerHubHost {
			key = authn.DefaultAuthKey
		}
		ac, err := cf.GetAuthConfig(key)
		if err != nil {
			return nil, info, fmt.Errorf("credential helper of %s for %s: %w", p, registry, err)
		}
		cfg := authn.AuthConfig{
			Username:      ac.Username,
			Password:      ac.Password,
			Auth:          ac.Auth,
			IdentityToken: ac.IdentityToken,
			RegistryToken: ac.RegistryToken,
		}
		if cfg != (authn.AuthConfig{}) {
			return authn.FromConfig(cfg), credInfo{source: p + " (credential helper)", user: cfg.Username}, nil
		}
	}
	if a, ok := dc.lookup(registry, repoPath); ok {
		return authn.FromConfig(a.cfg), credInfo{source: p, user: a.cfg.Username}, nil
	}
	return authn.Anonymous, info, nil
}

// readFileLimit reads a file, refusing one larger than limit.
func readFileLimit(p string, limit int64) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", p, limit)
	}
	return data, nil
}
