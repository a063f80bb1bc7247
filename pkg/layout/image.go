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
// Obtain it from Home.Images.
type Image struct {
	dir string
}

// Root returns <home>/images.
func (i Image) Root() string { return i.dir }

// LayersDir returns <images>/layers.
func (i Image) LayersDir() string { return filepath.Join(i.dir, layersDirName) }

// ExtractedDir returns <images>/extracted.
func (i Image) ExtractedDir() string { return filepath.Join(i.dir, extractedDirName) }

// DiskImagesDir returns <images>/disk-images. It must share a filesystem
// with <home>/tmp; see Home.Prepare.
func (i Image) DiskImagesDir() string { return filepath.Join(i.dir, diskImagesDirName) }

// ManifestsDir returns <images>/manifests.
func (i Image) ManifestsDir() string { return filepath.Join(i.dir, manifestsDirName) }

// ConfigsDir returns <images>/configs.
func (i Image) ConfigsDir() string { return filepath.Join(i.dir, configsDirName) }

// Prepare creates the layers, extracted, disk-images, manifests and configs
// directories. It is idempotent.
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
			return fmt.Errorf("layout: create images/%s dir %s: %w", d.name, d.path, err)
		}
	}
	return nil
}

// LocalBundleCacheDir returns the cache directory for a local OCI bundle:
// <images>/local/<path8>-<digest8>, where path8 is the first 8 hex digits
// of SHA-256(bundlePath) and digest8 the first 8 bytes of manifestDigest
// with any "sha256:" prefix removed. Keying on both means the same bundle
// path with new content gets a fresh cache entry instead of stale data.
//
// manifestDigest must already be a validated OCI digest: like upstream, it
// is used verbatim, so a value containing '/' would not stay in local/.
func (i Image) LocalBundleCacheDir(bundlePath, manifestDigest string) string {
	sum := sha256.Sum256([]byte(bundlePath))
	pathShort := hex.EncodeToString(sum[:4])
	digest := strings.TrimPrefix(manifestDigest, "sha256:")
	if len(digest) > 8 {
		digest = digest[:8]
	}
	return filepath.Join(i.dir, localDirName, pathShort+"-"+digest)
}
