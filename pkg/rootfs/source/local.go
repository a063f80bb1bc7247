package source

import (
	"fmt"
	"os"
)

// Local sources are the oci:, oci-archive: and docker-archive: transports.
// This file holds what they share; ocistore.go and ocilayout.go read OCI
// image layouts, and dockerarchive.go reads `docker save` tarballs.
//
// OCI layouts are read by this package's own code, not by
// go-containerregistry's layout package, for these reasons:
//
//   - Bounded reads. The layout package reads index.json, manifests and
//     image configs whole with os.ReadFile and io.ReadAll, however large
//     they are. Here each one is refused before it is read if it is larger
//     than Options.MaxManifestBytes.
//   - Reading a tar in place. A layout.Path is a directory, so an
//     oci-archive would first have to be extracted to disk. Here the tar is
//     scanned once and each blob is read as a section of it (tarStore).
//   - Digest checks. The layout package hands out blobs as they are on
//     disk and never checks that a blob hashes to the digest it is stored
//     under. Here manifests, indexes and configs are checked when read, and
//     layers when their last byte is read (verifyReader).
//
// The layout package also finds images only among the entries of
// index.json. Here a digest may name any image manifest or index blob, such
// as a platform manifest inside an index, which is what Image.Pinned names.
//
// Docker archives are read by go-containerregistry's tarball package,
// which reads manifest.json and the image config without a size limit too.
// dockerarchive.go checks their sizes in the tar before tarball reads them.

// localFail returns the error helper of a local resolve. Local errors name
// the reference but no registry.
func localFail(ref Ref) func(error) (*Image, error) {
	return func(err error) (*Image, error) { return nil, wrap(ref, "", credInfo{}, err) }
}

// openRegular opens a file and returns it with its size. It refuses
// anything that is not a regular file, such as a directory or a device.
func openRegular(name string) (*os.File, int64, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, 0, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, fmt.Errorf("%s is not a regular file", name)
	}
	return f, st.Size(), nil
}

// checkSize returns a *ManifestTooLargeError if a document of size bytes
// is over limit. what names the document, such as "index.json" or
// "image config sha256:…".
func checkSize(what string, size, limit int64) error {
	if size > limit {
		return &ManifestTooLargeError{What: what, Size: size, Limit: limit}
	}
	return nil
}
