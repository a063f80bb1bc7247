package source

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// Seeds beyond testdata/fuzz/FuzzParse.
var parseSeeds = []string{
	"busybox", "busybox:1", "127.0.0.1:5000/busybox:1", "repo@" + dgst, "host/repo:tag@" + dgst,
	"oci:/dir", "oci:/dir:v1", "oci:/dir@" + dgst, "oci-archive:/a.tar:x", "docker-archive:/a.tar:busybox:1",
	"docker://busybox", "oci:rel", "oci:/dir:", "[::1]:5000/x", "a:/b", "oci:5000/x",
}

func FuzzParse(f *testing.F) {
	for _, s := range parseSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := Parse(s)
		if err != nil {
			var ie *InvalidReferenceError
			if !errors.As(err, &ie) {
				t.Fatalf("Parse(%q): %T %v, want *InvalidReferenceError", s, err, err)
			}
			if len(err.Error()) > 2*maxRefInMessage+1024 {
				t.Fatalf("message of %d bytes", len(err.Error()))
			}
			return
		}
		s2 := r.String()
		r2, err := Parse(s2)
		if err != nil {
			t.Fatalf("Parse(%q) ok, but Parse(String() = %q): %v", s, s2, err)
		}
		if r2 != r {
			t.Fatalf("round trip of %q: %+v != %+v", s, r2, r)
		}
		if r.IsDigest() {
			if err := validDigest(r.Digest()); err != nil {
				t.Fatalf("%q: digest %q: %v", s, r.Digest(), err)
			}
			// The pinned form parses back to the same place.
			p, err := Parse(r.pinned(r.Digest()))
			if err != nil || p.Transport() != r.Transport() || p.Digest() != r.Digest() || p.Path() != r.Path() || p.Repository() != r.Repository() {
				t.Fatalf("pinned %q of %q: %+v %v", r.pinned(r.Digest()), s, p, err)
			}
		}
	})
}

// hostOfKey is an independent, simpler reading of a config key's host.
func hostOfKey(k string) string {
	l := strings.ToLower(k)
	l = strings.TrimPrefix(strings.TrimPrefix(l, "https://"), "http://")
	h, _, _ := strings.Cut(l, "/")
	if dockerHubAliases[h] {
		h = dockerHubHost
	}
	return h
}

func FuzzDockerConfigJSON(f *testing.F) {
	f.Add([]byte(`{"auths":{"127.0.0.1:5000":{"username":"u","password":"p"}}}`), "127.0.0.1:5000", "busybox")
	f.Add([]byte(`{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}}}`), "index.docker.io", "library/busybox")
	f.Add([]byte(`{"*.example.com":{"auth":"dTpw"}}`), "a.example.com", "x")
	f.Add([]byte(`{"auths":{"host/team":{"identitytoken":"t"}},"credsStore":"x"}`), "host", "team/app")
	f.Add([]byte(`{"auths":{"h":{"auth":"!!"}}}`), "h", "x")
	f.Fuzz(func(t *testing.T, payload []byte, registry, repo string) {
		dc, err := parseDockerConfig(payload, secretSource, true)
		if err != nil {
			var de *InvalidDockerConfigError
			if !errors.As(err, &de) {
				t.Fatalf("%T %v, want *InvalidDockerConfigError", err, err)
			}
			return
		}
		a, ok := dc.lookup(registry, repo)
		if !ok {
			return
		}
		if a.cfg.Username == "" && a.cfg.Password == "" && a.cfg.IdentityToken == "" && a.cfg.RegistryToken == "" {
			t.Fatalf("empty credential returned for %q", registry)
		}
		// The credential's key is in the payload...
		var top map[string]json.RawMessage
		if err := json.Unmarshal(payload, &top); err != nil {
			t.Fatalf("accepted payload does not decode: %v", err)
		}
		keys := top
		if raw, ok := top["auths"]; ok {
			keys = nil
			_ = json.Unmarshal(raw, &keys)
		}
		if _, ok := keys[a.key]; !ok {
			t.Fatalf("credential key %q is not in the payload", a.key)
		}
		// ...and names this registry: the same host, or a glob of as many
		// labels with the same port.
		want := strings.ToLower(registry)
		if dockerHubAliases[want] {
			want = dockerHubHost
		}
		h := hostOfKey(a.key)
		if h != want {
			hh, hp := splitPort(h)
			wh, wp := splitPort(want)
			if !strings.Contains(hh, "*") || hp != wp || strings.Count(hh, ".") != strings.Count(wh, ".") {
				t.Fatalf("credential for %q (key %q) returned for registry %q", h, a.key, registry)
			}
		}
	})
}
