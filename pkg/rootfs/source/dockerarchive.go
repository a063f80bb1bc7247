package source

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// dockerArchive is a docker-archive being resolved: a `docker save`
// tarball. Its manifest.json is not an image manifest. It lists the
// archive's images, each with its image config file, its layer files and
// its tags (a tarball.Manifest). go-containerregistry's tarball package
// reads the images and builds a Docker image manifest for each. max is
// Options.MaxManifestBytes.
type dockerArchive struct {
	file   string
	max    int64
	images tarball.Manifest // the parsed manifest.json
}

func (a *dockerArchive) opener() (io.ReadCloser, error) { return os.Open(a.file) }

func resolveDockerArchive(ctx context.Context, ref Ref, opts *Options) (*Image, error) {
	fail := localFail(ref)
	st, err := os.Stat(ref.path)
	if err != nil {
		return fail(err)
	}
	if !st.Mode().IsRegular() {
		return fail(fmt.Errorf("%s is not a regular file", ref.path))
	}
	a := &dockerArchive{file: ref.path, max: opts.MaxManifestBytes}
	if err := a.readImageList(); err != nil {
		return fail(err)
	}
	var img v1.Image
	switch {
	case ref.tag != "":
		img, err = a.imageByTag(ref)
	case ref.digest != "":
		img, err = a.imageByDigest(ctx, ref)
	default:
		img, err = a.onlyImage(ref)
	}
	if err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	return finish(ref, img, v1.Hash{}, nil, opts, fail)
}

// readImageList reads manifest.json, after checking that it is not larger
// than a.max.
func (a *dockerArchive) readImageList() error {
	notArchive := func(err error) error {
		return fmt.Errorf("not a docker-archive, because its manifest.json cannot be read: %w", err)
	}
	size, found, err := archiveFileSize(a.file, "manifest.json")
	if err != nil {
		return notArchive(err)
	}
	if found {
		if err := checkSize("manifest.json", size, a.max); err != nil {
			return err
		}
	}
	if a.images, err = tarball.LoadManifest(a.opener); err != nil {
		return notArchive(err)
	}
	return nil
}

// tags lists every tag in the archive, for messages.
func (a *dockerArchive) tags() string {
	var all []string
	for _, d := range a.images {
		all = append(all, d.RepoTags...)
	}
	if len(all) == 0 {
		return "no tags"
	}
	return strings.Join(all, ", ")
}

// image has the tarball package read the image that d describes, after
// checking that its image config is not larger than a.max. tag is the tag
// tarball finds d by, or nil if d is the archive's only image.
func (a *dockerArchive) image(d tarball.Descriptor, tag *name.Tag) (v1.Image, error) {
	size, found, err := archiveFileSize(a.file, d.Config)
	if err != nil {
		return nil, err
	}
	if found {
		if err := checkSize("image config "+d.Config, size, a.max); err != nil {
			return nil, err
		}
	}
	return tarball.Image(a.opener, tag)
}

func (a *dockerArchive) imageByTag(ref Ref) (v1.Image, error) {
	want, err := name.NewTag(ref.tag)
	if err != nil {
		return nil, &InvalidReferenceError{Ref: ref.String(), Reason: err.Error()}
	}
	for _, d := range a.images {
		for _, t := range d.RepoTags {
			if have, err := name.NewTag(t); err == nil && have.Name() == want.Name() {
				return a.image(d, &want)
			}
		}
	}
	return nil, &notFoundError{msg: fmt.Sprintf("no image tagged %q in the archive; it has: %s", ref.tag, a.tags())}
}

// imageByDigest finds the image whose manifest, as go-containerregistry
// builds it, has digest ref.digest. An untagged image can be found only if
// it is the archive's only image, because tarball finds images by tag.
func (a *dockerArchive) imageByDigest(ctx context.Context, ref Ref) (v1.Image, error) {
	var tooLarge error
	for _, d := range a.images {
		var tag *name.Tag
		if len(d.RepoTags) > 0 {
			t, err := name.NewTag(d.RepoTags[0])
			if err != nil {
				continue
			}
			tag = &t
		} else if len(a.images) != 1 {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		cand, err := a.image(d, tag)
		if errors.As(err, new(*ManifestTooLargeError)) {
			// Its digest cannot be known without reading the config, so it
			// may be the image wanted. Say so if no other image is.
			tooLarge = err
			continue
		}
		if err != nil {
			return nil, err
		}
		if h, err := cand.Digest(); err == nil && h.String() == ref.digest {
			return cand, nil
		}
	}
	if tooLarge != nil {
		return nil, tooLarge
	}
	return nil, &notFoundError{msg: fmt.Sprintf("no image with manifest digest %s in the archive", ref.digest)}
}

// onlyImage returns the archive's image when the reference names none.
func (a *dockerArchive) onlyImage(ref Ref) (v1.Image, error) {
	if len(a.images) != 1 {
		return nil, &InvalidReferenceError{Ref: ref.String(), Reason: fmt.Sprintf(
			"the archive holds %d images (%s); name one with :<repo:tag> or @<digest>", len(a.images), a.tags())}
	}
	return a.image(a.images[0], nil)
}

// archiveFileSize returns the size of the file that the tarball package
// reads when it is asked for name. That is the first entry whose cleaned
// name is name, with links followed the way tarball follows them: relative
// to name's directory, for hard and symbolic links alike. found is false if
// there is no such file or the links form a cycle; tarball then fails on
// its own.
func archiveFileSize(file, name string) (size int64, found bool, err error) {
	visited := map[string]bool{}
	for !visited[name] {
		visited[name] = true
		hdr, err := firstArchiveEntry(file, name)
		if err != nil || hdr == nil {
			return 0, false, err
		}
		if hdr.Typeflag != tar.TypeSymlink && hdr.Typeflag != tar.TypeLink {
			return hdr.Size, true, nil
		}
		name = path.Join(path.Dir(name), path.Clean(hdr.Linkname))
	}
	return 0, false, nil
}

// firstArchiveEntry returns the header of the first entry of the tar file
// whose cleaned name is name, or nil if there is none. It reads headers
// only: archive/tar seeks past the data of other entries.
func firstArchiveEntry(file, name string) (*tar.Header, error) {
	f, _, err := openRegular(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if path.Clean(hdr.Name) == path.Clean(name) {
			return hdr, nil
		}
	}
}
