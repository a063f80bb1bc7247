package source

import (
	"errors"
	"fmt"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// LayerError is a failure to fetch or read a layer blob. Layers are read
// long after Resolve returned (by the base builder), so without it their
// errors would name neither the image nor the registry, and would not be
// classified at all. A read that fails for no network or HTTP reason (the
// blob does not hash to its digest, or its body ends early) means the
// registry served a corrupt or truncated blob: IsUnavailable, because
// nothing of it is kept and a retry fetches it afresh.
type LayerError struct {
	Digest v1.Hash
	Err    error
}

func (e *LayerError) Error() string { return fmt.Sprintf("layer %s: %v", e.Digest, e.Err) }

func (e *LayerError) Unwrap() error { return e.Err }

// registryImage is a remote image whose layer errors are *Error naming the
// reference and registry, each wrapping a *LayerError.
type registryImage struct {
	v1.Image
	wrap func(error) error
}

func (i *registryImage) Layers() ([]v1.Layer, error) {
	ls, err := i.Image.Layers()
	if err != nil {
		return nil, i.wrap(err)
	}
	out := make([]v1.Layer, len(ls))
	for n, l := range ls {
		out[n] = i.layer(l)
	}
	return out, nil
}

func (i *registryImage) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	l, err := i.Image.LayerByDigest(h)
	if err != nil {
		return nil, i.wrap(err)
	}
	return i.layer(l), nil
}

func (i *registryImage) LayerByDiffID(h v1.Hash) (v1.Layer, error) {
	l, err := i.Image.LayerByDiffID(h)
	if err != nil {
		return nil, i.wrap(err)
	}
	return i.layer(l), nil
}

func (i *registryImage) layer(l v1.Layer) v1.Layer {
	return &registryLayer{Layer: l, wrap: func(err error) error {
		d, _ := l.Digest()
		return i.wrap(&LayerError{Digest: d, Err: err})
	}}
}

type registryLayer struct {
	v1.Layer
	wrap func(error) error
}

func (l *registryLayer) Compressed() (io.ReadCloser, error) {
	rc, err := l.Layer.Compressed()
	if err != nil {
		return nil, l.wrap(err)
	}
	return &layerReader{ReadCloser: rc, wrap: l.wrap}, nil
}

func (l *registryLayer) Uncompressed() (io.ReadCloser, error) {
	rc, err := l.Layer.Uncompressed()
	if err != nil {
		return nil, l.wrap(err)
	}
	return &layerReader{ReadCloser: rc, wrap: l.wrap}, nil
}

// layerReader wraps every read error but EOF, which readers must see as
// it is.
type layerReader struct {
	io.ReadCloser
	wrap func(error) error
}

func (r *layerReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		err = r.wrap(err)
	}
	return n, err
}
