package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestLayerErrorClass(t *testing.T) {
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}
	ref, err := Parse("registry.example/app:1")
	if err != nil {
		t.Fatal(err)
	}
	layer := func(err error) error {
		return wrap(ref, "registry.example", credInfo{}, &LayerError{Digest: d, Err: err})
	}
	cases := []struct {
		name        string
		err         error
		unavailable bool
		hint        string
	}{
		{"body cut short", layer(io.ErrUnexpectedEOF), true, "corrupt or truncated"},
		{"digest mismatch", layer(errors.New("error verifying sha256 checksum")), true, "corrupt or truncated"},
		{"connection dropped", layer(&url.Error{Op: "Get", URL: "http://registry.example/v2/", Err: io.EOF}), true, "registry registry.example unavailable"},
		{"caller gave up", layer(fmt.Errorf("read: %w", context.Canceled)), false, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsUnavailable(tc.err); got != tc.unavailable {
				t.Fatalf("IsUnavailable(%v) = %v, want %v", tc.err, got, tc.unavailable)
			}
			if !strings.Contains(tc.err.Error(), tc.hint) || !strings.Contains(tc.err.Error(), d.String()) {
				t.Errorf("message %q lacks %q or the layer digest", tc.err, tc.hint)
			}
			if !tc.unavailable && !errors.Is(tc.err, context.Canceled) {
				t.Errorf("%v does not unwrap to context.Canceled", tc.err)
			}
		})
	}
}
