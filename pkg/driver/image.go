package driver

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// resolveTimeout bounds the registry round trips of CreateVolume: it only
// resolves a tag and reads the image config, and never pulls layers.
const resolveTimeout = 60 * time.Second

// dockerConfigSecretKey is the key of a kubernetes.io/dockerconfigjson
// Secret, which is what a node-stage or provisioner secret reference hands
// over.
const dockerConfigSecretKey = ".dockerconfigjson"

// resolve pins the image to a digest. Credentials come from the call's
// secrets (a dockerconfigjson payload) first, then from the node's docker
// config.
func (d *Driver) resolve(ctx context.Context, p volumeParams, secrets map[string]string, inline bool) (*source.Image, error) {
	ref, err := source.Parse(p.Image)
	if err != nil {
		return nil, err
	}
	return source.Resolve(ctx, ref, d.sourceOptions(p, secrets, inline))
}

// newRecord resolves the image the parameters name and returns the
// record of a new volume for it. The caller fills in name and capacity.
func (d *Driver) newRecord(ctx context.Context, id string, p volumeParams, params, secrets map[string]string, inline bool) (*volumeRecord, error) {
	rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	img, err := d.resolve(rctx, p, secrets, inline)
	if err != nil {
		return nil, err
	}
	cfg, err := img.Config()
	if err != nil {
		return nil, err
	}
	return &volumeRecord{
		Version:  recordVersion,
		VolumeID: id,
		Params:   userParams(params),
		Image:    p.Image,
		Digest:   img.Digest.String(),
		Pinned:   img.Pinned,
		Config:   cfg,
	}, nil
}

// sourceOptions are the registry options for a volume. An inline volume
// is asked for by whoever wrote the pod, so it pulls with the pull secret
// the pod names and not with the node's credentials, unless the admin
// allows that: otherwise any pod author could have the node fetch, and
// then hand out, another tenant's private image.
func (d *Driver) sourceOptions(p volumeParams, secrets map[string]string, inline bool) source.Options {
	return source.Options{
		NoNodeCredentials:     inline && !d.cfg.InlineNodeCredentials,
		PlainHTTP:             p.PlainHTTP,
		InsecureSkipTLSVerify: p.InsecureSkipTLSVerify,
		DockerConfigJSON:      []byte(secrets[dockerConfigSecretKey]),
		RetryBackoff:          d.cfg.RegistryRetry,
		Transports:            d.transports,
	}
}

// ensureBase returns the cached base for the volume's digest, building it
// if needed and allowed. The build goes on if the caller gives up, so
// that the caller's retry joins it.
func (d *Driver) ensureBase(ctx context.Context, m *volumeRecord, p volumeParams, secrets map[string]string) (rootfs.Base, error) {
	key := rootfs.Key{Digest: m.Digest, Builder: d.builder.Version()}
	if b, ok, err := d.cache.Lookup(key); err != nil || ok {
		return b, err
	}
	if p.PullPolicy == PullNever {
		return rootfs.Base{}, status.Errorf(codes.FailedPrecondition, "base for %s (%s) is not in the node cache and pullPolicy is %s", m.Image, m.Digest, PullNever)
	}
	return d.cache.Ensure(ctx, key, func(ctx context.Context, out *os.File) error {
		ref, err := source.Parse(m.Pinned)
		if err != nil {
			return err
		}
		img, err := source.Resolve(ctx, ref, d.sourceOptions(p, secrets, m.Ephemeral))
		if err != nil {
			return err
		}
		if got := img.Digest.String(); got != m.Digest {
			return fmt.Errorf("image %s resolved to %s, but the volume was created for %s", m.Pinned, got, m.Digest)
		}
		return d.builder.Build(ctx, img.V1, out)
	})
}
