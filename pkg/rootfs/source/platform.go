package source

import (
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func normArch(a string) string {
	switch a = strings.ToLower(a); a {
	case "x86_64", "x86-64":
		return "amd64"
	case "aarch64":
		return "arm64"
	}
	return a
}

func normVariant(arch, v string) string {
	v = strings.ToLower(v)
	if arch == "arm64" && v == "" {
		return "v8"
	}
	return v
}

// platformString renders os/arch[/variant][:osversion].
func platformString(p v1.Platform) string {
	s := p.OS
	if s == "" {
		s = "unknown"
	}
	if p.Architecture != "" {
		s += "/" + p.Architecture
	}
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	if p.OSVersion != "" {
		s += ":" + p.OSVersion
	}
	return s
}

// platformMatches tells whether an image for have runs on want. An empty
// want variant accepts any variant (but arm64 defaults to v8, and "" and
// "v8" are the same there); an empty want OS version accepts any.
func platformMatches(want, have v1.Platform) bool {
	if !strings.EqualFold(want.OS, have.OS) {
		return false
	}
	arch := normArch(want.Architecture)
	if arch != normArch(have.Architecture) {
		return false
	}
	if wv := normVariant(arch, want.Variant); wv != "" && wv != normVariant(arch, have.Variant) {
		return false
	}
	return want.OSVersion == "" || want.OSVersion == have.OSVersion
}

// isAttestation tells BuildKit attestation manifests apart: they sit in
// indexes with platform unknown/unknown.
func isAttestation(d v1.Descriptor) bool {
	if d.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
		return true
	}
	return d.Platform != nil && d.Platform.OS == "unknown" && d.Platform.Architecture == "unknown"
}

// pickPlatform chooses the image manifest for want from an index. It
// returns the platforms offered when nothing matches.
func pickPlatform(m *v1.IndexManifest, want v1.Platform) (v1.Descriptor, []string, bool) {
	var offered []string
	seen := map[string]bool{}
	offer := func(s string) {
		if !seen[s] {
			seen[s] = true
			offered = append(offered, s)
		}
	}
	for _, d := range m.Manifests {
		if isAttestation(d) {
			continue
		}
		if d.MediaType != "" && !d.MediaType.IsImage() {
			if d.MediaType.IsIndex() {
				offer("(nested index " + d.Digest.String() + ")")
			}
			continue
		}
		if d.Platform == nil {
			offer("(image without platform " + d.Digest.String() + ")")
			continue
		}
		if platformMatches(want, *d.Platform) {
			return d, nil, true
		}
		offer(platformString(*d.Platform))
	}
	return v1.Descriptor{}, offered, false
}

// checkConfigPlatform checks a lone image (not from an index) against
// want, when its config says what it is built for.
func checkConfigPlatform(ref Ref, cf *v1.ConfigFile, want v1.Platform) error {
	if cf == nil || cf.OS == "" || cf.Architecture == "" {
		return nil
	}
	have := v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant, OSVersion: cf.OSVersion}
	if platformMatches(want, have) {
		return nil
	}
	return &PlatformNotFoundError{Ref: ref.String(), Want: platformString(want), Offered: []string{platformString(have)}, single: true}
}
