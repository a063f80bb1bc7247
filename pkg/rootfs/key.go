// Package rootfs turns OCI images into shared read-only base disks in a
// node-level cache, and gives each box a copy-on-write overlay over one.
//
// The cache lives in <home>/images/disk-images. A base is built under
// <home>/tmp, synced and renamed into place exactly once per key, with a
// per-key flock under <home>/locks serialising builders across processes.
// A base never changes once installed: a new builder version gets a new
// key, and eviction only unlinks files nobody references. Beside each base
// is its record (info.go): its image config and whether its image was
// served anonymously, which decides who may be handed it without asking a
// registry.
package rootfs

import (
	"fmt"
	"regexp"
	"strings"
)

// Key names one cached base: the image manifest digest and the version of
// the builder that turned it into a disk. Two builder versions may lay out
// the same image differently, and an overlay is only valid over the exact
// bytes it was created on, so both are part of the key.
type Key struct {
	// Digest is the image manifest digest, "sha256:<64 hex>".
	Digest string
	// Builder is the builder version, [a-z0-9]+.
	Builder string
}

var (
	digestRE  = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	builderRE = regexp.MustCompile(`^[a-z0-9]{1,32}$`)
	fileRE    = regexp.MustCompile(`^sha256-([0-9a-f]{64})\.([a-z0-9]{1,32})\.ext4$`)
)

// Validate refuses anything that could not be a file name under
// disk-images: the digest comes from a registry and must not be trusted.
func (k Key) Validate() error {
	if !digestRE.MatchString(k.Digest) {
		return fmt.Errorf("rootfs: invalid image digest %q: want sha256:<64 lowercase hex>", k.Digest)
	}
	if !builderRE.MatchString(k.Builder) {
		return fmt.Errorf("rootfs: invalid builder version %q", k.Builder)
	}
	return nil
}

// FileName is the base's name in disk-images: sha256-<hex>.<builder>.ext4.
func (k Key) FileName() string {
	return "sha256-" + strings.TrimPrefix(k.Digest, "sha256:") + "." + k.Builder + ".ext4"
}

// lockName is the key's lock file name under locks/.
func (k Key) lockName() string { return k.FileName() + ".lock" }

func (k Key) String() string { return k.Digest + "/" + k.Builder }

// parseFileName recovers the key of a file in disk-images, so the cache
// state is read from the directory itself.
func parseFileName(name string) (Key, bool) {
	m := fileRE.FindStringSubmatch(name)
	if m == nil {
		return Key{}, false
	}
	return Key{Digest: "sha256:" + m[1], Builder: m[2]}, true
}
