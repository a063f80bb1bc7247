// Command image builds the boxlite-csi container image without a container
// engine, from an already-built static binary: the same image the
// repository's Dockerfile builds (FROM scratch, a CA bundle, /boxlite-csi,
// entrypoint /boxlite-csi, user 0, the same labels).
//
// It writes either an OCI archive (a tar of an OCI image layout, the
// default) or a docker archive (`docker save` format). Both import with
//
//	ctr -n k8s.io images import boxlite-csi.tar
//
// into the containerd that kubelet uses. The OCI archive names the image
// through two index annotations: org.opencontainers.image.ref.name and
// io.containerd.image.name, both the full name (docker.io/... for Docker
// Hub names), which ctr keeps as the image name; the docker archive names
// it through manifest.json's RepoTags.
//
// Usage:
//
//	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=v0.1.0" -o bin/boxlite-csi ./cmd/boxlite-csi
//	go run ./hack/image -binary bin/boxlite-csi -image ghcr.io/boxlite-csi/boxlite-csi:v0.1.0 -out bin/boxlite-csi.tar
package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	// Formats of -out.
	formatOCI    = "oci-archive"
	formatDocker = "docker-archive"

	// Paths inside the image; the Dockerfile uses the same.
	binaryPath = "boxlite-csi"
	caPath     = "etc/ssl/certs/ca-certificates.crt"

	// defaultPath is the PATH BuildKit sets when an image has none.
	defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

	// annotationContainerdName is the full image name containerd's importer
	// prefers over org.opencontainers.image.ref.name.
	annotationContainerdName = "io.containerd.image.name"
)

// labels are the image labels; the Dockerfile sets the same ones.
func labels(version string) map[string]string {
	return map[string]string{
		"org.opencontainers.image.title":       "boxlite-csi",
		"org.opencontainers.image.description": "CSI node plugin for micro-VM sandboxes: qcow2 boxes over shared read-only base disks",
		"org.opencontainers.image.source":      "https://github.com/boxlite-csi/boxlite-csi",
		"org.opencontainers.image.version":     version,
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the command-line settings.
type options struct {
	binary   string
	image    string
	out      string
	platform string
	format   string
	caCerts  string
	version  string
}

func run(args []string, stderr io.Writer) int {
	var o options
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.binary, "binary", "", "static boxlite-csi binary to put at /boxlite-csi (CGO_ENABLED=0)")
	fs.StringVar(&o.image, "image", "ghcr.io/boxlite-csi/boxlite-csi:dev", "image name:tag the archive names")
	fs.StringVar(&o.out, "out", "", "archive to write")
	fs.StringVar(&o.platform, "platform", "linux/amd64", "os/arch[/variant] of the binary and the image")
	fs.StringVar(&o.format, "format", formatOCI, "archive format: "+formatOCI+" or "+formatDocker)
	fs.StringVar(&o.caCerts, "ca-certs", "/etc/ssl/certs/ca-certificates.crt",
		"CA bundle to put at /"+caPath+" (the plugin pulls from TLS registries); empty for none")
	fs.StringVar(&o.version, "version", "", "org.opencontainers.image.version label (default: the image tag)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: image -binary FILE -image NAME:TAG -out FILE [flags]\n\n"+
			"Builds the boxlite-csi image from a static binary, without a container engine.\n"+
			"Timestamps come from SOURCE_DATE_EPOCH (default 0), so equal inputs give equal archives.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if o.binary == "" || o.out == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	created, err := sourceDateEpoch()
	if err != nil {
		fmt.Fprintf(stderr, "image: %v\n", err)
		return 2
	}
	ref, err := build(o, created)
	if err != nil {
		fmt.Fprintf(stderr, "image: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "image: wrote %s (%s, %s)\n", o.out, ref, o.format)
	return 0
}

// sourceDateEpoch is the reproducible-builds timestamp, 0 when unset.
func sourceDateEpoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: %w", s, err)
	}
	return time.Unix(n, 0).UTC(), nil
}

// build writes the archive and returns the image's full name.
func build(o options, created time.Time) (string, error) {
	if o.format != formatOCI && o.format != formatDocker {
		return "", fmt.Errorf("-format %q: want %s or %s", o.format, formatOCI, formatDocker)
	}
	tag, err := name.NewTag(o.image)
	if err != nil {
		return "", fmt.Errorf("-image: %w", err)
	}
	full := fullName(tag)
	platform, err := v1.ParsePlatform(o.platform)
	if err != nil {
		return "", fmt.Errorf("-platform: %w", err)
	}
	bin, err := os.ReadFile(o.binary)
	if err != nil {
		return "", err
	}
	if err := checkStatic(bin, platform); err != nil {
		return "", fmt.Errorf("%s: %w", o.binary, err)
	}
	files := []file{{path: binaryPath, mode: 0o755, data: bin}}
	if o.caCerts != "" {
		ca, err := os.ReadFile(o.caCerts)
		if err != nil {
			return "", fmt.Errorf("-ca-certs: %w", err)
		}
		files = append(files, file{path: caPath, mode: 0o644, data: ca})
	}
	version := o.version
	if version == "" {
		version = tag.TagStr()
	}
	img, err := image(files, platform, version, created, o.format == formatOCI)
	if err != nil {
		return "", err
	}

	// Write next to the destination, then rename: no half-written archive
	// under the final name.
	tmp, err := os.CreateTemp(filepath.Dir(o.out), "."+filepath.Base(o.out)+".*")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", err
	}
	if o.format == formatOCI {
		err = writeOCIArchive(tmp, img, platform, full, created)
	} else {
		err = tarball.Write(tag, img, tmp)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("write %s: %w", o.out, err)
	}
	if err := os.Rename(tmp.Name(), o.out); err != nil {
		return "", err
	}
	return full, nil
}

// fullName is the name containerd (and so kubelet) uses for tag: Docker
// Hub names get the docker.io registry and library/ prefix that kubelet
// adds to an image field like "boxlite-csi:dev".
func fullName(tag name.Tag) string {
	registry := tag.RegistryStr()
	if registry == name.DefaultRegistry {
		registry = "docker.io"
	}
	return registry + "/" + tag.RepositoryStr() + ":" + tag.TagStr()
}

// elfMachine is the ELF machine of binaries for GOARCH arch.
func elfMachine(arch string) (elf.Machine, bool) {
	switch arch {
	case "amd64":
		return elf.EM_X86_64, true
	case "arm64":
		return elf.EM_AARCH64, true
	case "arm":
		return elf.EM_ARM, true
	case "386":
		return elf.EM_386, true
	case "ppc64le":
		return elf.EM_PPC64, true
	case "s390x":
		return elf.EM_S390, true
	case "riscv64":
		return elf.EM_RISCV, true
	}
	return elf.EM_NONE, false
}

// checkStatic refuses what would fail only once the image runs: a binary
// for another architecture, or one that needs a dynamic loader and libc,
// which a scratch image does not have.
func checkStatic(bin []byte, p *v1.Platform) error {
	if p.OS != "linux" {
		return fmt.Errorf("platform %s: only linux images are supported", p)
	}
	want, ok := elfMachine(p.Architecture)
	if !ok {
		return fmt.Errorf("platform %s: unknown architecture", p)
	}
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return fmt.Errorf("not an ELF executable: %w", err)
	}
	defer f.Close()
	if f.Machine != want {
		return fmt.Errorf("built for %s, but the platform is %s (%s)", f.Machine, p, want)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return errors.New("not statically linked (it has an ELF interpreter): build it with CGO_ENABLED=0")
		}
	}
	return nil
}

// file is one regular file of the layer.
type file struct {
	path string
	mode int64
	data []byte
}

// image assembles the single-layer image.
func image(files []file, p *v1.Platform, version string, created time.Time, oci bool) (v1.Image, error) {
	layerTar, err := layerTar(files, created)
	if err != nil {
		return nil, err
	}
	// Compress once: digesting and writing the layer would each gzip the
	// ~15 MB binary again.
	layerOpts := []tarball.LayerOption{tarball.WithCompressedCaching}
	base := empty.Image
	if oci {
		layerOpts = append(layerOpts, tarball.WithMediaType(types.OCILayer))
		base = mutate.MediaType(base, types.OCIManifestSchema1)
		base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, layerOpts...)
	if err != nil {
		return nil, err
	}
	img, err := mutate.Append(base, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "hack/image: /" + binaryPath + " and the CA bundle",
		},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
	cf.Created = v1.Time{Time: created}
	cf.Config.Entrypoint = []string{"/" + binaryPath}
	// What BuildKit gives a FROM scratch image, so both builds agree.
	cf.Config.Env = []string{defaultPath}
	// Root, explicitly: the plugin makes bind mounts.
	cf.Config.User = "0"
	cf.Config.Labels = labels(version)
	return mutate.ConfigFile(img, cf)
}

// layerTar is the layer's uncompressed tar: the files with their parent
// directories, owned by root, stamped with created.
func layerTar(files []file, created time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	for _, f := range files {
		var parents []string
		for d := filepath.Dir(f.path); d != "."; d = filepath.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: created, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: f.path, Mode: f.mode, Size: int64(len(f.data)), ModTime: created, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeOCIArchive writes img as a tar of an OCI image layout whose index
// names it, for `ctr images import` and `skopeo copy oci-archive:`.
func writeOCIArchive(w io.Writer, img v1.Image, p *v1.Platform, full string, created time.Time) error {
	dir, err := os.MkdirTemp("", "boxlite-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	// WriteImage and AppendDescriptor rather than AppendImage, whose
	// descriptor carries an artifactType, which an image manifest's
	// descriptor should not have.
	if err := lp.WriteImage(img); err != nil {
		return err
	}
	desc, err := partial.Descriptor(img)
	if err != nil {
		return err
	}
	desc.ArtifactType = ""
	desc.Platform = p
	desc.Annotations = map[string]string{
		// The OCI spec means a tag here, but containerd's and skopeo's
		// importers take a full reference as the image name.
		"org.opencontainers.image.ref.name": full,
		annotationContainerdName:            full,
	}
	if err := lp.AppendDescriptor(*desc); err != nil {
		return err
	}
	return tarDir(w, dir, created)
}

// tarDir writes dir's tree as a tar with relative names, in lexical order
// and with fixed timestamps so equal layouts give equal archives.
func tarDir(w io.Writer, dir string, created time.Time) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, ModTime: created, Format: tar.FormatPAX})
		}
		if !info.Mode().IsRegular() {
			return fmt.Errorf("%s: not a regular file", p)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: info.Size(), ModTime: created, Format: tar.FormatPAX}); err != nil {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
