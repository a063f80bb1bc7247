// Package source is the front end of the rootfs builder: it names an OCI
// image, resolves it to a manifest digest exactly once, picks the platform,
// authenticates, and hands back a go-containerregistry v1.Image whose layers
// the builder streams. Everything after resolution is keyed by
// Image.Digest, the digest of the platform image manifest.
//
// # References
//
// Parse accepts four forms:
//
//   - a registry reference, e.g. "127.0.0.1:5000/busybox:1",
//     "busybox@sha256:…" or "host/repo:tag@sha256:…" (the tag of a
//     tag+digest reference is informational: the digest wins). Parsing is
//     go-containerregistry's name.ParseReference with its standard defaults,
//     which are Docker's: a first path element without '.' or ':' that is
//     not "localhost" is a repository on Docker Hub ("index.docker.io"), a
//     single-element Hub repository gets "library/", and a missing tag is
//     "latest". So "myregistry/app:1" is Docker Hub's myregistry/app, not a
//     host called myregistry. Image.Pinned is always fully qualified so the
//     defaulting is visible in logs.
//   - "oci:<dir>[:<name>|@<digest>]": an OCI image-layout directory. <name>
//     is matched against the org.opencontainers.image.ref.name annotation
//     (or io.containerd.image.name) of the entries of index.json; with
//     neither name nor digest the layout must hold exactly one entry. A
//     digest may name any image manifest or index blob in the layout,
//     including a platform manifest nested in an index.
//   - "oci-archive:<file.tar>[:<name>|@<digest>]": a tar of an OCI layout,
//     read in place (no extraction).
//   - "docker-archive:<file.tar>[:<repo:tag>|@<digest>]": a `docker save`
//     tarball, read by go-containerregistry's tarball package. The digest
//     form matches the manifest digest go-containerregistry computes for
//     the archive (see Resolve).
//
// Local paths must be absolute and may not contain ':' or '@' (those
// separate the path from the name or digest); they are cleaned
// (filepath.Clean). A registry host literally named "oci", "oci-archive" or
// "docker-archive" must be written with its port ("oci:5000/repo") or a
// domain.
//
// # Transport security
//
// Registries are always contacted over HTTPS unless Options.PlainHTTP is
// set. go-containerregistry on its own silently falls back to plain HTTP
// for localhost, 127.0.0.1, *.localhost and RFC 1918 addresses; this
// package turns that off (every http:// request is refused with a
// *PlainHTTPError), so a private registry on 10.x or 127.0.0.1 that only
// speaks HTTP needs PlainHTTP, and then credentials travel in clear text
// by explicit choice. With PlainHTTP set, HTTPS is still tried first and
// HTTP is the fallback; token servers and blob redirects may then be HTTP
// too.
package source
