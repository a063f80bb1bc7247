package source

import (
	"errors"
	"strings"
	"testing"
)

const (
	dgst  = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	dgst2 = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
)

func TestParseValid(t *testing.T) {
	for _, tc := range []struct {
		in        string
		transport Transport
		repo      string // registry
		path      string // local
		tag       string
		digest    string
	}{
		{in: "127.0.0.1:5000/busybox:1", transport: TransportRegistry, repo: "127.0.0.1:5000/busybox", tag: "1"},
		{in: "localhost:5000/a/b/c:v1.2-3", transport: TransportRegistry, repo: "localhost:5000/a/b/c", tag: "v1.2-3"},
		{in: "busybox", transport: TransportRegistry, repo: "index.docker.io/library/busybox", tag: "latest"},
		{in: "docker.io/library/busybox:1.36", transport: TransportRegistry, repo: "index.docker.io/library/busybox", tag: "1.36"},
		{in: "myorg/app:2", transport: TransportRegistry, repo: "index.docker.io/myorg/app", tag: "2"},
		{in: "busybox@" + dgst, transport: TransportRegistry, repo: "index.docker.io/library/busybox", digest: dgst},
		{in: "ghcr.io/o/r:tag@" + dgst, transport: TransportRegistry, repo: "ghcr.io/o/r", tag: "tag", digest: dgst},
		{in: "127.0.0.1:5000/x@" + dgst, transport: TransportRegistry, repo: "127.0.0.1:5000/x", digest: dgst},
		{in: "docker:5000/foo:1", transport: TransportRegistry, repo: "docker:5000/foo", tag: "1"},
		{in: "oci:5000/foo", transport: TransportRegistry, repo: "oci:5000/foo", tag: "latest"},
		{in: "[::1]:5000/foo:1", transport: TransportRegistry, repo: "[::1]:5000/foo", tag: "1"},
		{in: "oci:/var/lib/images/busybox", transport: TransportOCI, path: "/var/lib/images/busybox"},
		{in: "oci:/var/lib/images/busybox/", transport: TransportOCI, path: "/var/lib/images/busybox"},
		{in: "oci:/a/./b/../c:v1", transport: TransportOCI, path: "/a/c", tag: "v1"},
		{in: "oci:/img:docker.io/library/busybox:1", transport: TransportOCI, path: "/img", tag: "docker.io/library/busybox:1"},
		{in: "oci:/img@" + dgst, transport: TransportOCI, path: "/img", digest: dgst},
		{in: "oci:/with space/d ir:a--b", transport: TransportOCI, path: "/with space/d ir", tag: "a--b"},
		{in: "oci-archive:/tmp/x.tar", transport: TransportOCIArchive, path: "/tmp/x.tar"},
		{in: "oci-archive:/tmp/x.tar:latest", transport: TransportOCIArchive, path: "/tmp/x.tar", tag: "latest"},
		{in: "oci-archive:/tmp/x.tar@" + dgst2, transport: TransportOCIArchive, path: "/tmp/x.tar", digest: dgst2},
		{in: "docker-archive:/tmp/b.tar", transport: TransportDockerArchive, path: "/tmp/b.tar"},
		{in: "docker-archive:/tmp/b.tar:busybox:1", transport: TransportDockerArchive, path: "/tmp/b.tar", tag: "busybox:1"},
		{in: "docker-archive:/tmp/b.tar:localhost:5000/busybox:1", transport: TransportDockerArchive, path: "/tmp/b.tar", tag: "localhost:5000/busybox:1"},
		{in: "docker-archive:/tmp/b.tar@" + dgst, transport: TransportDockerArchive, path: "/tmp/b.tar", digest: dgst},
	} {
		t.Run(tc.in, func(t *testing.T) {
			r, err := Parse(tc.in)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if r.Transport() != tc.transport || r.Repository() != tc.repo || r.Path() != tc.path || r.Tag() != tc.tag || r.Digest() != tc.digest {
				t.Errorf("got transport %q repo %q path %q tag %q digest %q", r.Transport(), r.Repository(), r.Path(), r.Tag(), r.Digest())
			}
			if r.IsDigest() != (tc.digest != "") {
				t.Errorf("IsDigest %v", r.IsDigest())
			}
			r2, err := Parse(r.String())
			if err != nil || r2 != r {
				t.Errorf("round trip %q -> %+v, %v; want %+v", r.String(), r2, err, r)
			}
		})
	}
}

func TestParseInvalid(t *testing.T) {
	for _, tc := range []struct {
		in, reason string
	}{
		{"", "empty"},
		{strings.Repeat("a", MaxRefLen+1), "longer than 4096"},
		{"busybox\x00:1", "control character"},
		{"busybox:1\n", "control character"},
		{"oci:/a\tb", "control character"},
		{"oci:/a /b", "white space"},
		{"busy\u0085box", "control character"},
		{"\xff\xfe", "UTF-8"},
		{" busybox", "white space"},
		{"oci:relative/dir", "not absolute"},
		{"oci:./dir", "not absolute"},
		{"oci:", "needs a path"},
		{"oci-archive:x.tar", "not absolute"},
		{"docker-archive:~/x.tar", "not absolute"},
		{"oci:/dir:", "empty name"},
		{"oci:/dir:bad name", "ref.name"},
		{"oci:/dir:-x", "ref.name"},
		{"oci:/dir:a//b", "ref.name"},
		{"oci:/dir:tag@" + dgst, "not both"},
		{"oci:/dir@sha256:abc", "64 hex"},
		{"oci:/dir@md5:0123", "algorithm"},
		{"oci:/dir@" + strings.ToUpper(dgst), "algorithm"},
		{"oci:/dir@sha256:" + strings.Repeat("G", 64), "lower-case hex"},
		{"docker-archive:/x.tar:Bad:Tag", "repo:tag"},
		{"docker://busybox", "unsupported transport"},
		{"docker-daemon:busybox:latest", "unsupported transport"},
		{"containers-storage:busybox", "unsupported transport"},
		{"dir:/tmp/x", "unsupported transport"},
		{"https://registry/x", "unsupported transport"},
		{"foo:/tmp/x", "unknown transport"},
		{"Busybox:1", "repository"},
		{"a/b__c___d:1", "component"},
		{"a/-b:1", "component"},
		{"busybox:", "tag"},
		{"busybox@sha256:123", "digest"},
		{"a/b/../c", "component"},
		{"host:99999999/x", "port"},
		{"host:0/x", "port"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			r, err := Parse(tc.in)
			var ie *InvalidReferenceError
			if !errors.As(err, &ie) {
				t.Fatalf("Parse(%q) = %+v, %v; want *InvalidReferenceError", tc.in, r, err)
			}
			if !strings.Contains(ie.Reason, tc.reason) {
				t.Errorf("reason %q does not mention %q", ie.Reason, tc.reason)
			}
			if !IsInvalidArgument(err) {
				t.Errorf("not IsInvalidArgument")
			}
			if len(err.Error()) > 1200 {
				t.Errorf("message not truncated: %d bytes", len(err.Error()))
			}
		})
	}
}

func TestParseEnv(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []EnvVar
	}{
		{nil, nil},
		{[]string{"A=b"}, []EnvVar{{"A", "b"}}},
		{[]string{"A=b=c"}, []EnvVar{{"A", "b=c"}}},
		{[]string{"NOEQ"}, nil},
		{[]string{"=x"}, nil},
		{[]string{"="}, nil},
		{[]string{"EMPTY="}, []EnvVar{{"EMPTY", ""}}},
		{[]string{"B=1", "NOEQ", "A=2", "B=3"}, []EnvVar{{"B", "1"}, {"A", "2"}, {"B", "3"}}},
		{[]string{"SP ACE= v "}, []EnvVar{{"SP ACE", " v "}}},
	} {
		got := parseEnv(tc.in)
		if len(got) != len(tc.want) {
			t.Errorf("parseEnv(%q) = %q, want %q", tc.in, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("parseEnv(%q) = %q, want %q", tc.in, got, tc.want)
			}
		}
	}
}
