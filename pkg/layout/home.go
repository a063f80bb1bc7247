// Package layout names the directories and files of a boxlite-csi home and
// of the per-volume box directories inside it. Directory names match the
// upstream BoxLite runtime, so tooling and operators see the same tree.
// Some accessors exist only because upstream has them, and their doc
// comments say that the plugin does not use them yet.
//
// Path methods are pure and never touch the filesystem. Only the Prepare,
// Cleanup and BoxIDs methods do I/O.
package layout

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

const (
	dbDirName         = "db"
	imagesDirName     = "images"
	logsDirName       = "logs"
	layersDirName     = "layers"
	manifestsDirName  = "manifests"
	boxesDirName      = "boxes"
	basesDirName      = "bases"
	locksDirName      = "locks"
	tmpDirName        = "tmp"
	diskImagesDirName = "disk-images"
)

// dirPerm is the mode of every directory Prepare creates, before the umask
// applies.
const dirPerm = 0o755

// Config describes what the host supports. It corresponds to upstream's
// FsLayoutConfig.
type Config struct {
	// BindMountSupported gates per-box mount isolation. Without bind mounts
	// a box cannot have a private mounts/ tree, so boxes fall back to the
	// shared/ directory.
	BindMountSupported bool
}

// Home is the plugin's state directory (upstream FilesystemLayout). The zero
// value is not useful, so use NewHome.
type Home struct {
	dir string
	cfg Config
}

// NewHome returns the layout rooted at dir. dir should be absolute, because
// box paths derived from it are handed to other processes (qemu, the
// kubelet) whose working directory differs from ours.
func NewHome(dir string, cfg Config) Home {
	return Home{dir: filepath.Clean(dir), cfg: cfg}
}

// Dir returns the home directory itself.
func (h Home) Dir() string { return h.dir }

// DBDir returns <home>/db.
//
// Part of the upstream layout. The plugin does not use it yet.
func (h Home) DBDir() string { return filepath.Join(h.dir, dbDirName) }

// ImagesDir returns <home>/images.
//
// Part of the upstream layout. The plugin reaches this directory through
// Images instead.
func (h Home) ImagesDir() string { return filepath.Join(h.dir, imagesDirName) }

// LogsDir returns <home>/logs.
//
// Part of the upstream layout. The plugin does not use it yet.
func (h Home) LogsDir() string { return filepath.Join(h.dir, logsDirName) }

// ImageLayersDir returns <home>/images/layers.
//
// Part of the upstream layout. Prepare creates it, but nothing else in the
// plugin uses it yet.
func (h Home) ImageLayersDir() string { return filepath.Join(h.ImagesDir(), layersDirName) }

// ImageManifestsDir returns <home>/images/manifests.
//
// Part of the upstream layout. Prepare creates it, but nothing else in the
// plugin uses it yet.
func (h Home) ImageManifestsDir() string { return filepath.Join(h.ImagesDir(), manifestsDirName) }

// BoxesDir returns <home>/boxes, the parent of every box directory.
func (h Home) BoxesDir() string { return filepath.Join(h.dir, boxesDirName) }

// BasesDir returns <home>/bases.
//
// Part of the upstream layout. The plugin keeps its cached base disks in
// images/disk-images instead. Prepare still creates bases/ and checks that
// it shares a filesystem with tmp/, as upstream does.
func (h Home) BasesDir() string { return filepath.Join(h.dir, basesDirName) }

// LocksDir returns <home>/locks.
func (h Home) LocksDir() string { return filepath.Join(h.dir, locksDirName) }

// TempDir returns <home>/tmp, the staging area for files that are later
// renamed into bases/ or images/disk-images/.
func (h Home) TempDir() string { return filepath.Join(h.dir, tmpDirName) }

// Images returns the image layout under <home>/images.
func (h Home) Images() Image { return Image{dir: h.ImagesDir()} }

// Prepare creates the home tree and then checks that tmp/, bases/,
// images/disk-images/ and boxes/ are on one filesystem. Base disks are
// built in tmp/ and published with rename(2), and boxes hard-link their
// base. Neither works across filesystems, so checking at startup turns
// what would be an EXDEV in the middle of provisioning into a clear
// configuration error.
func (h Home) Prepare() error {
	dirs := []struct{ name, path string }{
		{"home", h.dir},
		{"boxes", h.BoxesDir()},
		{"bases", h.BasesDir()},
		{"tmp", h.TempDir()},
		{"locks", h.LocksDir()},
		{"images/layers", h.ImageLayersDir()},
		{"images/manifests", h.ImageManifestsDir()},
		{"images/disk-images", h.Images().DiskImagesDir()},
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d.path, dirPerm); err != nil {
			return fmt.Errorf("cannot create the %s directory %s: %w", d.name, d.path, err)
		}
	}
	return h.validateSameFilesystem()
}

func (h Home) validateSameFilesystem() error {
	// Upstream checks the first three. boxes/ is added because a box
	// hard-links its base from images/disk-images, and hard links cannot
	// cross filesystems either.
	dirs := []struct{ name, path string }{
		{"tmp", h.TempDir()},
		{"bases", h.BasesDir()},
		{"images/disk-images", h.Images().DiskImagesDir()},
		{"boxes", h.BoxesDir()},
	}
	devs := make([]uint64, len(dirs))
	same := true
	for i, d := range dirs {
		dev, err := deviceOf(d.path)
		if err != nil {
			return err
		}
		devs[i] = dev
		same = same && dev == devs[0]
	}
	if same {
		return nil
	}
	var found []string
	for i, d := range dirs {
		found = append(found, fmt.Sprintf("%s (%s)", d.name, formatDev(devs[i])))
	}
	return fmt.Errorf("the directories %s under home %s must be on one filesystem, because base disks are published with rename(2) and boxes hard-link them",
		strings.Join(found, ", "), h.dir)
}

// deviceOf returns st_dev of path. It follows symlinks, because a symlinked
// tmp/ on another filesystem breaks rename just the same.
func deviceOf(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("cannot check the filesystem of %s: %w", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("cannot check the filesystem of %s: stat gives no device number on this platform", path)
	}
	// The conversion is needed where Dev is narrower than uint64, as on
	// darwin.
	return uint64(st.Dev), nil
}

// Box returns the layout of the box for volumeID, at <home>/boxes/<volumeID>.
// The ID is checked with ValidateVolumeID and never rewritten. An invalid ID
// yields an *InvalidVolumeIDError. Nothing is created on disk.
func (h Home) Box(volumeID string, opts ...BoxOption) (Box, error) {
	if err := ValidateVolumeID(volumeID); err != nil {
		return Box{}, err
	}
	var o boxOptions
	for _, opt := range opts {
		opt(&o)
	}
	return Box{
		id:  volumeID,
		dir: filepath.Join(h.BoxesDir(), volumeID),
		// Upstream logs a warning when it falls back. We fall back silently,
		// and Box.IsolateMounts reports the outcome.
		isolateMounts: o.isolateMounts && h.cfg.BindMountSupported,
	}, nil
}

// BoxIDs lists the volume IDs that have a box directory, sorted. The driver
// rebuilds its state from this after a restart. BoxIDs skips entries that
// are not directories (symlinks included), dot-entries (the plugin's
// temporary entries) and any other name ValidateVolumeID rejects, so every
// returned ID can be passed back to Box.
//
// A missing boxes/ directory is an error, not an empty list. Reporting
// "no volumes" for a home that is not prepared or not mounted would make
// the driver forget volumes that still exist.
func (h Home) BoxIDs() ([]string, error) {
	entries, err := os.ReadDir(h.BoxesDir())
	if err != nil {
		return nil, fmt.Errorf("cannot list the boxes in %s: %w", h.BoxesDir(), err)
	}
	ids := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.Type()&fs.ModeType != fs.ModeDir {
			continue
		}
		if ValidateVolumeID(e.Name()) != nil {
			continue
		}
		ids = append(ids, e.Name())
	}
	return ids, nil
}
