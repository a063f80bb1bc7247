package driver

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// StorageClass parameters and volume attributes.
const (
	ParamImage                 = "image"
	ParamPullPolicy            = "pullPolicy"
	ParamPlainHTTP             = "plainHTTP"
	ParamInsecureSkipTLSVerify = "insecureSkipTLSVerify"

	// reservedPrefix marks keys the CO adds (pod info, PVC names, the
	// ephemeral flag); they are not the user's parameters.
	reservedPrefix = "csi.storage.k8s.io/"
	ephemeralKey   = "csi.storage.k8s.io/ephemeral"

	// Volume context keys returned by CreateVolume.
	ctxImage  = "image"
	ctxDigest = "digest"
	ctxPinned = "pinned"

	// PullIfNotPresent builds a missing base from the registry.
	PullIfNotPresent = "IfNotPresent"
	// PullNever only uses bases already in the node cache.
	PullNever = "Never"

	maxParamLen = 4096
	maxNameLen  = 1024
)

// errInvalidParam marks a parameter or attribute the user got wrong.
var errInvalidParam = errors.New("invalid volume parameter")

// volumeParams are the user's parameters, validated.
type volumeParams struct {
	Image                 string
	PullPolicy            string
	PlainHTTP             bool
	InsecureSkipTLSVerify bool
}

// parseParams validates StorageClass parameters or inline volume
// attributes. Unknown keys are refused, so that a typo does not silently
// fall back to a default. Keys under csi.storage.k8s.io/ belong to the CO
// and are ignored.
func parseParams(m map[string]string) (volumeParams, error) {
	p := volumeParams{PullPolicy: PullIfNotPresent}
	var unknown []string
	for k, v := range m {
		if strings.HasPrefix(k, reservedPrefix) {
			continue
		}
		if len(v) > maxParamLen {
			return p, fmt.Errorf("%w: parameter %q is %d bytes, at most %d allowed", errInvalidParam, k, len(v), maxParamLen)
		}
		known, err := p.set(k, v)
		if err != nil {
			return p, err
		}
		if !known {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return p, fmt.Errorf("%w: unknown parameters %q; known: %s, %s, %s, %s", errInvalidParam, unknown, ParamImage, ParamPullPolicy, ParamPlainHTTP, ParamInsecureSkipTLSVerify)
	}
	if p.Image == "" {
		return p, fmt.Errorf("%w: parameter %q is required", errInvalidParam, ParamImage)
	}
	ref, err := source.Parse(p.Image)
	if err != nil {
		return p, err
	}
	if p.PullPolicy == PullNever && !ref.IsDigest() {
		return p, fmt.Errorf("%w: %s=%s needs an image pinned by digest, got %q", errInvalidParam, ParamPullPolicy, PullNever, p.Image)
	}
	return p, nil
}

// set applies one parameter. It reports false for a key it does not know.
func (p *volumeParams) set(k, v string) (known bool, err error) {
	switch k {
	case ParamImage:
		p.Image = v
	case ParamPullPolicy:
		if v != PullIfNotPresent && v != PullNever {
			return true, fmt.Errorf("%w: parameter %s=%q: want %s or %s", errInvalidParam, ParamPullPolicy, v, PullIfNotPresent, PullNever)
		}
		p.PullPolicy = v
	case ParamPlainHTTP:
		p.PlainHTTP, err = strconv.ParseBool(v)
	case ParamInsecureSkipTLSVerify:
		p.InsecureSkipTLSVerify, err = strconv.ParseBool(v)
	default:
		return false, nil
	}
	if err != nil {
		return true, fmt.Errorf("%w: parameter %s=%q: want true or false", errInvalidParam, k, v)
	}
	return true, nil
}

// userParams returns the parameters that define the volume, for comparing
// a repeated CreateVolume with the first one.
func userParams(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		if !strings.HasPrefix(k, reservedPrefix) {
			out[k] = v
		}
	}
	return out
}
