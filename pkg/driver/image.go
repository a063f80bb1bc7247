package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// resolveTimeout bounds the registry round trips of CreateVolume: it only
// resolves a tag and reads the image config, and never pulls layers.
const resolveTimeout = 60 * time.Second

// dockerConfigSecretKey is the key of a kubernetes.io/dockerconfigjson
// Secret, which is what a node-stage or provisioner secret reference hands
// over.
const dockerConfigSecretKey = ".dockerconfigjson"

// newRecord resolves the image the parameters name and returns the
// record of a new volume for it. The caller fills in name and capacity.
//
// Resolving with the caller's credentials is what stops a caller from
// being handed a cached base it may not pull: the cache is keyed by
// digest, so naming another tenant's digest must still get past the
// registry. Under pullPolicy Never no registry is asked; cachedRecord
// applies the rule instead.
func (d *Driver) newRecord(ctx context.Context, id string, p volumeParams, params, secrets map[string]string, inline bool) (*volumeRecord, error) {
	ref, err := source.Parse(p.Image)
	if err != nil {
		return nil, err
	}
	if p.PullPolicy == PullNever && ref.Transport() == source.TransportRegistry {
		return d.cachedRecord(ctx, id, ref, p, params, inline)
	}
	rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	img, err := source.Resolve(rctx, ref, d.sourceOptions(p, secrets, inline))
	if err != nil {
		return nil, err
	}
	cfg, err := img.Config()
	if err != nil {
		return nil, err
	}
	d.repairBaseInfo(ctx, img, cfg)
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

// cachedRecord is newRecord under pullPolicy Never for a registry image:
// it contacts no registry, so the volume can be created on an air-gapped
// node, and takes the image config from the record kept with the cached
// base. Without a registry there is no way to check the caller's
// credentials, so a base is handed out only when that check is not
// needed: the image was served anonymously when it was pulled, or the
// volume comes from a StorageClass, which the admin writes. An inline
// volume is written by whoever writes the pod.
func (d *Driver) cachedRecord(ctx context.Context, id string, ref source.Ref, p volumeParams, params map[string]string, inline bool) (*volumeRecord, error) {
	want := ref.Digest()
	key := rootfs.Key{Digest: want, Builder: d.builder.Version()}
	refuse := func(why, fix string) error {
		return status.Errorf(codes.FailedPrecondition, "image %s (%s): %s, and pullPolicy is %s, so no registry is asked; %s", p.Image, want, why, PullNever, fix)
	}
	rewrite := fmt.Sprintf("a volume of this image with pullPolicy %s writes the record", PullIfNotPresent)
	var info rootfs.BaseInfo
	cached := false
	if key.Validate() == nil {
		_, ok, err := d.cache.Lookup(key)
		if err != nil {
			return nil, err
		}
		cached = ok
	}
	if cached {
		bi, err := d.cache.Info(key)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil, refuse(fmt.Sprintf("the node cache holds its base but no record of how it was pulled (%s; bases cached by an earlier release have none)", d.cache.InfoPath(key)), rewrite)
		case err != nil:
			klog.FromContext(ctx).Error(err, "Unusable base record", "image", p.Image, "digest", want)
			return nil, refuse(fmt.Sprintf("the node cache holds its base, but the record of how it was pulled is unusable (%v)", err), rewrite)
		}
		info = bi
	} else {
		// The digest may name an index whose image for this node was
		// cached under its own manifest digest.
		b, bi, ok, err := d.cache.FindByIndex(want, d.builder.Version())
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, refuse("the node cache has no base for it", fmt.Sprintf("create a volume of it with pullPolicy %s first", PullIfNotPresent))
		}
		key, info = b.Key, bi
	}
	if inline && !info.Anonymous {
		return nil, status.Errorf(codes.PermissionDenied, "inline volume image %s (%s) is in the node cache, but it was pulled with credentials (or from a local path), and with pullPolicy %s the plugin cannot check that this pod may pull it; use pullPolicy %s with a pull secret that can pull it (nodePublishSecretRef), or a StorageClass", p.Image, want, PullNever, PullIfNotPresent)
	}
	return &volumeRecord{
		Version:  recordVersion,
		VolumeID: id,
		Params:   userParams(params),
		Image:    p.Image,
		Digest:   key.Digest,
		Pinned:   ref.PinnedTo(key.Digest),
		Config:   info.Config,
	}, nil
}

// repairBaseInfo gives a cached base that has no usable record (one
// cached by an earlier release, or a damaged record) a record made from
// the resolve just done, so that pullPolicy Never can use it afterwards.
// It records the image as not anonymous: this resolve fetched the
// manifest and config only, which says nothing about who may pull the
// layers. Failing to write it costs only that, so it is logged, not
// returned.
func (d *Driver) repairBaseInfo(ctx context.Context, img *source.Image, cfg source.Config) {
	key := rootfs.Key{Digest: img.Digest.String(), Builder: d.builder.Version()}
	if key.Validate() != nil {
		return
	}
	_, err := d.cache.Info(key)
	if err == nil {
		return
	}
	info := rootfs.BaseInfo{Config: cfg}
	if img.IndexDigest != (v1.Hash{}) {
		info.IndexDigest = img.IndexDigest.String()
	}
	log := klog.FromContext(ctx)
	ok, werr := d.cache.RecordInfo(key, info)
	switch {
	case werr != nil:
		log.Error(werr, "Cannot record how a cached base was pulled", "image", img.Ref.String(), "digest", key.Digest)
	case ok:
		log.Info("Recorded how a cached base was pulled", "image", img.Ref.String(), "digest", key.Digest, "path", d.cache.InfoPath(key), "was", err.Error())
	}
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
	b, err := d.cache.Ensure(ctx, key, func(ctx context.Context, out *os.File) (rootfs.BaseInfo, error) {
		ref, err := source.Parse(m.Pinned)
		if err != nil {
			return rootfs.BaseInfo{}, err
		}
		img, err := source.Resolve(ctx, ref, d.sourceOptions(p, secrets, m.Ephemeral))
		if err != nil {
			return rootfs.BaseInfo{}, err
		}
		if got := img.Digest.String(); got != m.Digest {
			return rootfs.BaseInfo{}, fmt.Errorf("image %s resolved to %s, but the volume was created for %s", m.Pinned, got, m.Digest)
		}
		if err := d.builder.Build(ctx, img.V1, out); err != nil {
			return rootfs.BaseInfo{}, err
		}
		cfg, err := img.Config()
		if err != nil {
			return rootfs.BaseInfo{}, err
		}
		return rootfs.BaseInfo{
			IndexDigest: indexDigestOf(m),
			Anonymous:   d.servedAnonymously(ctx, img, p),
			Config:      cfg,
		}, nil
	})
	var building *rootfs.BuildingError
	if errors.As(err, &building) {
		// What kubelet shows the user (kubectl describe pod) while the pod
		// waits: answered just before kubelet's deadline, so that it says
		// how far the build got rather than only DeadlineExceeded.
		return b, status.Errorf(codes.Aborted, "building the base for %s (%s): %s; the build goes on, and the next retry joins it",
			m.Image, m.Digest, building.Progress)
	}
	return b, err
}

// deterministicBuildFailure says which build failures the cache remembers
// rather than pull again for on every retry: the image is over the
// builder's limits, has entries the builder refuses, or is for another
// platform. None of that changes for a digest until the node's limits do,
// which takes a restart, which forgets them.
func deterministicBuildFailure(err error) bool {
	var limit *ext4.LimitError
	var entry *ext4.EntryError
	var platform *source.PlatformNotFoundError
	return errors.As(err, &limit) || errors.As(err, &entry) || errors.As(err, &platform)
}

// indexDigestOf is the digest of the index the volume's image was picked
// from, when the volume names its image by a digest other than the
// manifest's (the record was made by resolving that reference), so that
// pullPolicy Never finds the base by the digest users write.
func indexDigestOf(m *volumeRecord) string {
	ref, err := source.Parse(m.Image)
	if err != nil || !ref.IsDigest() || ref.Digest() == m.Digest {
		return ""
	}
	return ref.Digest()
}

// servedAnonymously tells whether the registry hands img to anyone. If no
// credentials were sent for it, it does. Otherwise one manifest HEAD with
// no credentials finds out: a node that holds credentials for a registry
// sends them for its public images too, and those should be shared under
// pullPolicy Never like any public image. Any failure answers no, which
// only keeps the base from inline volumes that cannot be checked.
func (d *Driver) servedAnonymously(ctx context.Context, img *source.Image, p volumeParams) bool {
	if img.Ref.Transport() != source.TransportRegistry {
		return false
	}
	if img.Anonymous {
		return true
	}
	ref, err := source.Parse(img.Pinned)
	if err != nil {
		return false
	}
	cctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	opts := source.Options{
		NoNodeCredentials:     true,
		PlainHTTP:             p.PlainHTTP,
		InsecureSkipTLSVerify: p.InsecureSkipTLSVerify,
		RetryBackoff:          d.cfg.RegistryRetry,
		Transports:            d.transports,
	}
	err = source.Check(cctx, ref, opts)
	klog.FromContext(ctx).V(2).Info("Checked whether an image pulled with credentials is public", "image", img.Pinned, "public", err == nil, "answer", err)
	return err == nil
}
