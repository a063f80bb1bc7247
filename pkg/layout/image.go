package layout

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

const (
	extractedDirName = "extracted"
	configsDirName   = "configs"
	localDirName     = "local"
)

// Image is the layout of <home>/images (upstream ImageFilesystemLayout).
// Get it from Home.Images.
type Image struct {
	dir string
}

// Root returns <home>/images.
//
// Part of the upstream layout. The plugin does not use it yet.
func (i Image) Root() string { return i.dir }

// LayersDir returns <images>/layers. Home.ImageLayersDir is the same path.
//
// Part of the upstream layout. The plugin does not use it yet.
func (i Image) LayersDir() string { return filepath.Join(i.dir, layersDirName) }

// ExtractedDir returns <images>/extracted.
//
// Part of the upstream layout. The plugin does not use it yet.
func (i Image) ExtractedDir() string { return filepath.Join(i.dir, extractedDirName) }

// DiskImagesDir returns <images>/disk-images, where the plugin keeps its
// cached base disks. It must be on the same filesystem as <home>/tmp, which
// Home.Prepare checks.
func (i Image) DiskImagesDir() string { return filepath.Join(i.dir, diskImagesDirName) }

// ManifestsDir returns <images>/manifests. Home.ImageManifestsDir is the
// same path.
//
// Part of the upstream layout. The plugin does not use it yet.
func (i Image) ManifestsDir() string { return filepath.Join(i.dir, manifestsDirName) }

// ConfigsDir returns <images>/configs.
//
// Part of the upstream layout. The plugin does not use it yet.
func (i Image) ConfigsDir() string { return filepath.Join(i.dir, configsDirName) }

// Prepare creates the layers, extracted, disk-images, manifests and configs
// directories. It is idempotent.
//
// Part of the upstream layout. The plugin does not use it yet, because
// Home.Prepare creates the image directories it needs.
func (i Image) Prepare() error {
	dirs := []struct{ name, path string }{
		{"layers", i.LayersDir()},
		{"extracted", i.ExtractedDir()},
		{"disk-images", i.DiskImagesDir()},
		{"manifests", i.ManifestsDir()},
		{"configs", i.ConfigsDir()},
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d.path, dirPerm); err != nil {
			return fmt.Errorf("cannot create the images/%s directory %s: %w", d.name, d.path, err)
		}
	}
	return nil
}

// LocalBundleCacheDir returns the cache directory for a local OCI bundle,
// <images>/local/<path8>-<digest8>. path8 is the first 8 hex digits of
// SHA-256(bundlePath), and digest8 is the first 8 bytes of manifestDigest
// with any "sha256:" prefix removed. Because the key holds both, the same
// bundle path with new content gets a fresh cache entry instead of stale
// data.
//
// manifestDigest must already be a validated OCI digest. Like upstream,
// the function uses it verbatim, so a value containing '/' would not stay
// inside local/.
//
// Part of the upstream layout. The plugin does not use it yet.
func (i Image) LocalBundleCacheDir(bundlePath, manifestDigest string) string {
	sum := sha256.Sum256([]byte(bundlePath))
	pathShort := hex.EncodeToString(sum[:4])
	digest := strings.TrimPrefix(manifestDigest, "sha256:")
	if len(digest) > 8 {
		digest = digest[:8]
	}
	return filepath.Join(i.dir, localDirName, pathShort+"-"+digest)
}
