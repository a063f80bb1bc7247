package source

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestDockerConfigLookup(t *testing.T) {
	payload := `{"auths":{
		"https://index.docker.io/v1/": {"auth": "` + b64("hub:hubpw") + `"},
		"reg.example.com": {"username": "plain", "password": "p1"},
		"https://tls.example.com": {"username": "scheme", "password": "p2"},
		"v1.example.com/v1/": {"username": "apiv1", "password": "p3"},
		"v2.example.com/v2/": {"username": "apiv2", "password": "p4"},
		"ports.example.com:5000": {"username": "port", "password": "p5"},
		"paths.example.com": {"username": "host", "password": "p6"},
		"paths.example.com/team": {"username": "team", "password": "p7"},
		"paths.example.com/team/app": {"username": "app", "password": "p8"},
		"*.glob.example.com": {"username": "glob", "password": "p9"},
		"exact.glob.example.com": {"username": "exact", "password": "p10"},
		"token.example.com": {"identitytoken": "idtok"},
		"AUTHWINS.example.com": {"username": "ignored", "password": "ignored", "auth": "` + b64("authuser:pass:with:colons") + `"},
		"empty.example.com": {},
		"127.0.0.1:5000": {"username": "local", "password": "p11"}
	}}`
	dc, err := parseDockerConfig([]byte(payload), secretSource, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		registry, repo string
		user, pass     string // "" user and pass: no match
		token          string
	}{
		{"index.docker.io", "library/busybox", "hub", "hubpw", ""},
		{"docker.io", "library/busybox", "hub", "hubpw", ""},
		{"reg.example.com", "x", "plain", "p1", ""},
		{"REG.example.com", "x", "plain", "p1", ""},
		{"tls.example.com", "x", "scheme", "p2", ""},
		{"v1.example.com", "a/b", "apiv1", "p3", ""},
		{"v2.example.com", "a/b", "apiv2", "p4", ""},
		{"ports.example.com:5000", "x", "port", "p5", ""},
		{"ports.example.com", "x", "", "", ""},
		{"ports.example.com:5001", "x", "", "", ""},
		{"paths.example.com", "other/app", "host", "p6", ""},
		{"paths.example.com", "team/other", "team", "p7", ""},
		{"paths.example.com", "team/app", "app", "p8", ""},
		{"paths.example.com", "team/app/sub", "app", "p8", ""},
		{"paths.example.com", "teamx/app", "host", "p6", ""},
		{"a.glob.example.com", "x", "glob", "p9", ""},
		{"exact.glob.example.com", "x", "exact", "p10", ""},
		{"a.b.glob.example.com", "x", "", "", ""},
		{"glob.example.com", "x", "", "", ""},
		{"token.example.com", "x", "", "", "idtok"},
		{"authwins.example.com", "x", "authuser", "pass:with:colons", ""},
		{"empty.example.com", "x", "", "", ""},
		{"127.0.0.1:5000", "x", "local", "p11", ""},
		{"127.0.0.1", "x", "", "", ""},
		{"example.com", "x", "", "", ""},
		{"evil-reg.example.com", "x", "", "", ""},
	} {
		a, ok := dc.lookup(tc.registry, tc.repo)
		want := tc.user != "" || tc.token != ""
		if ok != want || a.cfg.Username != tc.user || a.cfg.Password != tc.pass || a.cfg.IdentityToken != tc.token {
			t.Errorf("lookup(%s, %s) = %+v %v; want user %q pass %q token %q", tc.registry, tc.repo, a.cfg, ok, tc.user, tc.pass, tc.token)
		}
	}
}

func TestDockerConfigLegacy(t *testing.T) {
	dc, err := parseDockerConfig([]byte(`{"https://legacy.example.com":{"auth":"`+b64("old:pw")+`","email":"a@b"}}`), secretSource, true)
	if err != nil {
		t.Fatal(err)
	}
	a, ok := dc.lookup("legacy.example.com", "x")
	if !ok || a.cfg.Username != "old" || a.cfg.Password != "pw" {
		t.Errorf("legacy lookup: %+v %v", a, ok)
	}
}

func TestDockerConfigMalformed(t *testing.T) {
	const secret = "TOPSECRETVALUE"
	for _, tc := range []struct {
		name, payload, reason string
	}{
		{"syntax", `{"auths":{"h":{"password":"` + secret + `"}`, "not valid JSON"},
		{"garbage", secret, "not valid JSON"},
		{"array", `["` + secret + `"]`, "JSON object"},
		{"null", `null`, "not a JSON object"},
		{"password type", `{"auths":{"h":{"password":123,"username":"` + secret + `"}}}`, "must not be a JSON number"},
		{"auths type", `{"auths":"` + secret + `"}`, "expected a JSON object"},
		{"bad base64", `{"auths":{"h":{"auth":"` + secret + `!!"}}}`, "not valid base64"},
		{"no colon", `{"auths":{"h":{"auth":"` + b64(secret) + `"}}}`, "user:password"},
		{"empty host", `{"auths":{"":{"username":"u","password":"` + secret + `"}}}`, "not a registry host"},
		{"legacy string", `{"h":"` + secret + `"}`, "expected a JSON object"},
		{"too big", `{"auths":{"h":{"password":"` + strings.Repeat("x", maxDockerConfigBytes) + `"}}}`, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseDockerConfig([]byte(tc.payload), secretSource, true)
			var de *InvalidDockerConfigError
			if !errors.As(err, &de) {
				t.Fatalf("err = %v, want *InvalidDockerConfigError", err)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("%q does not say %q", err, tc.reason)
			}
			if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), b64(secret)) || strings.Contains(err.Error(), "xxxx") {
				t.Errorf("message leaks the secret: %q", err)
			}
			if !IsInvalidArgument(err) {
				t.Error("not IsInvalidArgument")
			}
		})
	}
}

func TestParseAuthKey(t *testing.T) {
	for _, tc := range []struct{ key, host, path string }{
		{"host", "host", ""},
		{"https://host", "host", ""},
		{"http://Host:5000/", "host:5000", ""},
		{"host/v1/", "host", ""},
		{"host/v2", "host", ""},
		{"https://index.docker.io/v1/", "index.docker.io", ""},
		{"docker.io", "index.docker.io", ""},
		{"registry-1.docker.io/org", "index.docker.io", "org"},
		{"host/v2/team/app/", "host", "team/app"},
		{"host/team", "host", "team"},
	} {
		h, p, _, ok := parseAuthKey(tc.key)
		if !ok || h != tc.host || p != tc.path {
			t.Errorf("parseAuthKey(%q) = %q %q %v, want %q %q", tc.key, h, p, ok, tc.host, tc.path)
		}
	}
}

func TestNodeConfigIgnoresOtherKeys(t *testing.T) {
	for _, payload := range []string{
		`{"currentContext":"default","psFormat":"table"}`,
		`{"auths":{"h":{"username":"u","password":"p"}},"detachKeys":"ctrl-x","proxies":{"default":{}}}`,
	} {
		dc, err := parseDockerConfig([]byte(payload), "/node/config.json", false)
		if err != nil {
			t.Errorf("%s: %v", payload, err)
			continue
		}
		if len(dc.auths) > 1 {
			t.Errorf("%s: %+v", payload, dc.auths)
		}
	}
	// The same as a pull secret is a legacy payload with bad entries.
	if _, err := parseDockerConfig([]byte(`{"currentContext":"default"}`), secretSource, true); err == nil {
		t.Error("legacy secret with a string entry accepted")
	}
}
