package source

import (
	"bytes"
	"context"
	"fmt"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// userAgent is sent to registries.
const userAgent = "boxlite-csi"

// Image is a resolved image: everything about it is fixed by Digest.
type Image struct {
	// Ref is the reference Resolve was given.
	Ref Ref
	// Digest is the digest of the platform image manifest: the cache key.
	Digest v1.Hash
	// IndexDigest is the digest of the index the platform was picked
	// from; the zero Hash if the reference named an image manifest.
	IndexDigest v1.Hash
	// Pinned names exactly this image: "<registry>/<repo>@<digest>" (fully
	// qualified, e.g. index.docker.io/library/busybox@sha256:…) or
	// "<transport>:<path>@<digest>". Parse accepts it.
	Pinned string
	// Platform is the platform of the image, from the index entry or the
	// image config (may be empty for a lone image whose config says
	// nothing).
	Platform v1.Platform
	// MediaType of the image manifest.
	MediaType types.MediaType
	// V1 gives the manifest, config and layers. All its fetches are by
	// digest. For registries they use the ctx given to Resolve, which must
	// stay alive until the layers have been read.
	V1 v1.Image
	// Anonymous is true when the image came from a registry that served it
	// to requests carrying no credentials at all: anyone who can reach the
	// registry can pull it. It is false for local sources, and whenever
	// credentials were sent, even if the registry did not need them (see
	// Check to find that out).
	Anonymous bool

	config *v1.ConfigFile
}

// Config returns the parts of the image config a box needs.
func (i *Image) Config() (Config, error) {
	cf := i.config
	if cf == nil {
		var err error
		if cf, err = i.V1.ConfigFile(); err != nil {
			return Config{}, wrap(i.Ref, "", credInfo{}, fmt.Errorf("image config: %w", err))
		}
	}
	return configFrom(cf), nil
}

// Resolve resolves ref to one image manifest, once: a tag is looked up
// with a single manifest GET and everything after that is fetched by
// digest, so a tag that moves later does not change the returned Image.
// An index is narrowed to opts.Platform (*PlatformNotFoundError if it has
// no such image); a lone image whose config names another platform is
// refused the same way.
//
// The config is fetched (bounded by MaxManifestBytes) so that Config does
// not fail later. For a docker-archive, the image manifest is one that
// go-containerregistry builds from the archive's manifest.json (its list
// of images). When the archive holds uncompressed layers, as `docker save`
// writes them, they are gzipped to compute it. So resolving reads every
// layer once, and the digest differs from the registry's copy of the same
// image. It is stable for a given archive and go-containerregistry
// version.
//
// Errors name the reference; see IsNotFound, IsUnauthorized,
// IsUnavailable and IsInvalidArgument for their classes.
func Resolve(ctx context.Context, ref Ref, opts Options) (*Image, error) {
	opts = opts.withDefaults()
	switch ref.transport {
	case TransportRegistry:
		return resolveRegistry(ctx, ref, &opts)
	case TransportOCI, TransportOCIArchive:
		return resolveLayout(ctx, ref, &opts)
	case TransportDockerArchive:
		return resolveDockerArchive(ctx, ref, &opts)
	}
	return nil, &InvalidReferenceError{Ref: ref.String(), Reason: "zero Ref (use Parse)"}
}

func resolveRegistry(ctx context.Context, ref Ref, opts *Options) (*Image, error) {
	nref, err := parseRemote(ref, opts)
	if err != nil {
		return nil, err
	}
	repo := nref.Context()
	registry := repo.RegistryStr()
	auth, cred, err := opts.authenticator(repo)
	if err != nil {
		return nil, wrap(ref, registry, cred, err)
	}
	fail := func(err error) (*Image, error) { return nil, wrap(ref, registry, cred, err) }
	// The layers are read later, by whoever builds the base: their errors
	// must still say which image, which registry, and what kind.
	withLayers := func(img *Image, err error) (*Image, error) {
		if err == nil {
			img.V1 = &registryImage{Image: img.V1, wrap: func(err error) error { return wrap(ref, registry, cred, err) }}
			img.Anonymous = cred.source == ""
		}
		return img, err
	}

	puller, err := remote.NewPuller(opts.remoteOptions(auth)...)
	if err != nil {
		return fail(err)
	}
	desc, err := puller.Get(ctx, nref)
	if err != nil {
		return fail(err)
	}
	switch mt := desc.MediaType; {
	case mt.IsImage():
		img, err := desc.Image()
		if err != nil {
			return fail(err)
		}
		return withLayers(finish(ref, img, v1.Hash{}, nil, opts, fail))
	case mt.IsIndex():
		im, err := v1.ParseIndexManifest(bytes.NewReader(desc.Manifest))
		if err != nil {
			return fail(fmt.Errorf("index %s: %w", desc.Digest, err))
		}
		child, offered, ok := pickPlatform(im, *opts.Platform)
		if !ok {
			return fail(&PlatformNotFoundError{Ref: ref.String(), Want: platformString(*opts.Platform), Offered: offered})
		}
		if child.Size > opts.MaxManifestBytes {
			return fail(&ManifestTooLargeError{What: "manifest " + child.Digest.String(), Size: child.Size, Limit: opts.MaxManifestBytes})
		}
		cdesc, err := puller.Get(ctx, repo.Digest(child.Digest.String()))
		if err != nil {
			return fail(err)
		}
		if !cdesc.MediaType.IsImage() {
			return fail(fmt.Errorf("index entry %s for %s is a %s, not an image manifest", child.Digest, platformString(*child.Platform), cdesc.MediaType))
		}
		img, err := cdesc.Image()
		if err != nil {
			return fail(err)
		}
		return withLayers(finish(ref, img, desc.Digest, child.Platform, opts, fail))
	case mt.IsSchema1():
		return fail(fmt.Errorf("manifest %s is Docker schema 1 (%s), which is not supported; re-push the image with a current client", desc.Digest, mt))
	default:
		return fail(fmt.Errorf("manifest %s has media type %q, which is neither an image manifest nor an index", desc.Digest, mt))
	}
}

// finish checks the config and fills in an Image. platform is the index
// entry's platform, nil for a lone image.
func finish(ref Ref, img v1.Image, index v1.Hash, platform *v1.Platform, opts *Options, fail func(error) (*Image, error)) (*Image, error) {
	digest, err := img.Digest()
	if err != nil {
		return fail(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		return fail(err)
	}
	m, err := img.Manifest()
	if err != nil {
		return fail(fmt.Errorf("manifest %s: %w", digest, err))
	}
	if m.Config.Size > opts.MaxManifestBytes {
		return fail(&ManifestTooLargeError{What: "image config " + m.Config.Digest.String(), Size: m.Config.Size, Limit: opts.MaxManifestBytes})
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fail(fmt.Errorf("image config %s: %w", m.Config.Digest, err))
	}
	out := &Image{
		Ref:         ref,
		Digest:      digest,
		IndexDigest: index,
		Pinned:      ref.pinned(digest.String()),
		MediaType:   mt,
		V1:          img,
		config:      cf,
	}
	if platform != nil {
		out.Platform = *platform
	} else {
		if err := checkConfigPlatform(ref, cf, *opts.Platform); err != nil {
			return fail(err)
		}
		out.Platform = v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant, OSVersion: cf.OSVersion}
	}
	return out, nil
}

// parseRemote turns a registry Ref into go-containerregistry's reference,
// insecure (plain HTTP allowed) only if opts allow it.
func parseRemote(ref Ref, opts *Options) (name.Reference, error) {
	var nopts []name.Option
	if opts.PlainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	nref, err := name.ParseReference(ref.raw, nopts...)
	if err != nil {
		return nil, &InvalidReferenceError{Ref: ref.raw, Reason: err.Error()}
	}
	return nref, nil
}

// remoteOptions are the go-containerregistry options every registry
// request is made with.
func (o *Options) remoteOptions(auth authn.Authenticator) []remote.Option {
	ropts := []remote.Option{
		remote.WithTransport(o.roundTripper()),
		remote.WithAuth(auth),
		remote.WithPlatform(*o.Platform),
		remote.WithUserAgent(userAgent),
	}
	if o.RetryBackoff != nil {
		ropts = append(ropts, remote.WithRetryBackoff(*o.RetryBackoff))
	}
	return ropts
}

// Check asks the registry whether it serves the manifest ref names to the
// credentials opts pick, with one manifest HEAD (and the authentication
// handshake before it), fetching nothing else. It returns nil if so, and
// otherwise an error classified like Resolve's (IsUnauthorized when the
// registry refuses those credentials). Only registry references can be
// checked; a local one is an *InvalidReferenceError.
//
// The driver uses it to learn whether an image it pulled with credentials
// is also served anonymously, which decides who else may be handed the
// base built from it.
func Check(ctx context.Context, ref Ref, opts Options) error {
	opts = opts.withDefaults()
	if ref.transport != TransportRegistry {
		return &InvalidReferenceError{Ref: ref.String(), Reason: "only registry images can be checked against a registry"}
	}
	nref, err := parseRemote(ref, &opts)
	if err != nil {
		return err
	}
	repo := nref.Context()
	auth, cred, err := opts.authenticator(repo)
	if err != nil {
		return wrap(ref, repo.RegistryStr(), cred, err)
	}
	ropts := append(opts.remoteOptions(auth), remote.WithContext(ctx))
	if _, err := remote.Head(nref, ropts...); err != nil {
		return wrap(ref, repo.RegistryStr(), cred, err)
	}
	return nil
}
