package driver

import (
	"errors"
	"strings"
	"testing"
)

// These tests need neither root nor a registry: `go test ./...` as any
// user still exercises the driver's input checks.

func TestParseParams(t *testing.T) {
	const img = "registry.example/app:1"
	const pinned = "registry.example/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for _, tc := range []struct {
		name    string
		in      map[string]string
		want    volumeParams
		wantErr string // substring; "" means success
	}{
		{"image only", map[string]string{ParamImage: img}, volumeParams{Image: img, PullPolicy: PullIfNotPresent}, ""},
		{"all set", map[string]string{ParamImage: img, ParamPlainHTTP: "true", ParamInsecureSkipTLSVerify: "1", ParamPullPolicy: PullIfNotPresent},
			volumeParams{Image: img, PullPolicy: PullIfNotPresent, PlainHTTP: true, InsecureSkipTLSVerify: true}, ""},
		{"CO keys ignored", map[string]string{ParamImage: img, ephemeralKey: "true", "csi.storage.k8s.io/pod.name": "p"}, volumeParams{Image: img, PullPolicy: PullIfNotPresent}, ""},
		{"never with digest", map[string]string{ParamImage: pinned, ParamPullPolicy: PullNever}, volumeParams{Image: pinned, PullPolicy: PullNever}, ""},
		{"never with tag", map[string]string{ParamImage: img, ParamPullPolicy: PullNever}, volumeParams{}, "needs an image pinned by digest"},
		{"missing image", map[string]string{ParamPlainHTTP: "true"}, volumeParams{}, `parameter "image" is required`},
		{"unknown key", map[string]string{ParamImage: img, "imag": "x", "zz": "y"}, volumeParams{}, `unknown parameters ["imag" "zz"]`},
		{"bad bool", map[string]string{ParamImage: img, ParamPlainHTTP: "yes please"}, volumeParams{}, "want true or false"},
		{"bad policy", map[string]string{ParamImage: img, ParamPullPolicy: "Always"}, volumeParams{}, "want IfNotPresent or Never"},
		{"too long", map[string]string{ParamImage: strings.Repeat("a", maxParamLen+1)}, volumeParams{}, "at most 4096 allowed"},
		{"bad reference", map[string]string{ParamImage: "UPPER/Case:tag"}, volumeParams{}, "UPPER/Case"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseParams(tc.in)
			if tc.wantErr == "" {
				if err != nil || got != tc.want {
					t.Fatalf("parseParams = %+v, %v; want %+v", got, err, tc.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("parseParams error = %v, want one containing %q", err, tc.wantErr)
			}
			if !strings.Contains(tc.name, "reference") && !errors.Is(err, errInvalidParam) {
				t.Errorf("error %v does not wrap errInvalidParam, so it would not be InvalidArgument", err)
			}
		})
	}
}

func TestUserParams(t *testing.T) {
	got := userParams(map[string]string{ParamImage: "a", "csi.storage.k8s.io/pvc/name": "c"})
	if len(got) != 1 || got[ParamImage] != "a" {
		t.Errorf("userParams = %v, want only the image", got)
	}
}
