package layout

import (
	"fmt"
	"os"
	"path/filepath"
)

const (
	socketsDirName = "sockets"
	mountsDirName  = "mounts"
	sharedDirName  = "shared"
	binDirName     = "bin"
	caDirName      = "ca"
	boxLogsDirName = "logs"
	boxTmpDirName  = "tmp"
	disksDirName   = "disks"
	baseDirName    = "base"

	boxSocketName       = "box.sock"
	readySocketName     = "ready.sock"
	netSocketName       = "net.sock"
	containerDiskName   = "disk.qcow2"
	guestRootfsDiskName = "guest-rootfs.qcow2"
	consoleLogName      = "console.log"
	pidFileName         = "shim.pid"
	exitFileName        = "exit"
	stderrFileName      = "shim.stderr"
	baseRootfsName      = "rootfs.ext4"
	boxManifestName     = "box.json"
)

// BoxOption adjusts a Box returned by Home.Box.
type BoxOption func(*boxOptions)

type boxOptions struct {
	isolateMounts bool
}

// WithIsolatedMounts requests a private mounts/ directory for the box. It is
// only honoured when the home's Config.BindMountSupported is set; otherwise
// the box falls back to the shared/ directory. Box.IsolateMounts reports
// the outcome.
func WithIsolatedMounts() BoxOption {
	return func(o *boxOptions) { o.isolateMounts = true }
}

// Box is the layout of one volume's box directory (upstream
// BoxFilesystemLayout). Obtain it from Home.Box, which validates the volume
// ID; that validation is what keeps every path below inside Root.
type Box struct {
	id            string
	dir           string
	isolateMounts bool
}

// ID returns the volume ID the box was built for.
func (b Box) ID() string { return b.id }

// IsolateMounts reports whether mount isolation is in effect, i.e. it was
// requested and the host supports bind mounts.
func (b Box) IsolateMounts() bool { return b.isolateMounts }

// Root returns the box directory, <home>/boxes/<id>.
func (b Box) Root() string { return b.dir }

// SocketsDir returns <box>/sockets.
func (b Box) SocketsDir() string { return filepath.Join(b.dir, socketsDirName) }

// SocketPath returns <box>/sockets/box.sock.
func (b Box) SocketPath() string { return filepath.Join(b.SocketsDir(), boxSocketName) }

// ReadySocketPath returns <box>/sockets/ready.sock.
func (b Box) ReadySocketPath() string { return filepath.Join(b.SocketsDir(), readySocketName) }

// NetBackendSocketPath returns <box>/sockets/net.sock. It is per box so two
// boxes never fight over one network backend socket.
func (b Box) NetBackendSocketPath() string { return filepath.Join(b.SocketsDir(), netSocketName) }

// MountsDir returns <box>/mounts when mount isolation is in effect and
// <box>/shared otherwise.
func (b Box) MountsDir() string {
	if b.isolateMounts {
		return filepath.Join(b.dir, mountsDirName)
	}
	return b.SharedDir()
}

// SharedDir returns <box>/shared.
func (b Box) SharedDir() string { return filepath.Join(b.dir, sharedDirName) }

// BinDir returns <box>/bin.
func (b Box) BinDir() string { return filepath.Join(b.dir, binDirName) }

// CADir returns <box>/ca.
func (b Box) CADir() string { return filepath.Join(b.dir, caDirName) }

// LogsDir returns <box>/logs.
func (b Box) LogsDir() string { return filepath.Join(b.dir, boxLogsDirName) }

// TmpDir returns <box>/tmp. It lives inside the box, not in <home>/tmp, so
// a jailed process needs no access outside its box.
func (b Box) TmpDir() string { return filepath.Join(b.dir, boxTmpDirName) }

// DisksDir returns <box>/disks.
func (b Box) DisksDir() string { return filepath.Join(b.dir, disksDirName) }

// DiskPath returns <box>/disks/disk.qcow2, the container disk.
func (b Box) DiskPath() string { return filepath.Join(b.DisksDir(), containerDiskName) }

// GuestRootfsDiskPath returns <box>/disks/guest-rootfs.qcow2, the per-box
// copy-on-write overlay over the cached base.
func (b Box) GuestRootfsDiskPath() string { return filepath.Join(b.DisksDir(), guestRootfsDiskName) }

// ConsoleOutputPath returns <box>/logs/console.log.
func (b Box) ConsoleOutputPath() string { return filepath.Join(b.LogsDir(), consoleLogName) }

// PIDFilePath returns <box>/shim.pid.
func (b Box) PIDFilePath() string { return filepath.Join(b.dir, pidFileName) }

// ExitFilePath returns <box>/exit.
func (b Box) ExitFilePath() string { return filepath.Join(b.dir, exitFileName) }

// StderrFilePath returns <box>/shim.stderr.
func (b Box) StderrFilePath() string { return filepath.Join(b.dir, stderrFileName) }

// BaseDir returns <box>/base, which holds the mount point of the cached base
// disk.
func (b Box) BaseDir() string { return filepath.Join(b.dir, baseDirName) }

// BasePath returns <box>/base/rootfs.ext4, where the cached base disk is
// bind-mounted read-only so the box is self-contained (its overlay resolves
// through BackingName even after the box is rbind-mounted elsewhere).
//
// After a reboot the bind mount is gone but the empty placeholder file
// remains, and an overlay over a wrong-but-existing backing reads as zeros.
// Callers must confirm the path really is the cached base (same device and
// inode) or re-establish the mount before trusting the overlay.
func (b Box) BasePath() string { return filepath.Join(b.BaseDir(), baseRootfsName) }

// BackingName returns the backing file name recorded in the guest-rootfs
// overlay: BasePath relative to DisksDir ("../base/rootfs.ext4"). It is
// relative so the chain still resolves when the box is reached through a
// bind mount at another path. disks/ and base/ are both direct children of
// the box, which the layout tests pin.
func (b Box) BackingName() string {
	return filepath.Join("..", baseDirName, baseRootfsName)
}

// ManifestPath returns <box>/box.json.
func (b Box) ManifestPath() string { return filepath.Join(b.dir, boxManifestName) }

// Prepare creates the box directory and its sockets, tmp, disks, mounts (per
// MountsDir), logs and base subdirectories. It is idempotent.
func (b Box) Prepare() error {
	dirs := []struct{ name, path string }{
		{"box", b.dir},
		{"sockets", b.SocketsDir()},
		{"tmp", b.TmpDir()},
		{"disks", b.DisksDir()},
		{"mounts", b.MountsDir()},
		{"logs", b.LogsDir()},
		{"base", b.BaseDir()},
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d.path, dirPerm); err != nil {
			return fmt.Errorf("layout: create %s dir %s: %w", d.name, d.path, err)
		}
	}
	return nil
}

// Cleanup removes the box directory and everything in it; a missing box is
// not an error.
//
// The caller must unmount everything under the box first (the base bind
// mount, anything in MountsDir, and any rbind of the box to a target path).
// Cleanup does not check: RemoveAll would descend into a mounted directory
// and delete the mounted filesystem's contents, and removing a box that is
// still rbind-mounted empties the target too.
func (b Box) Cleanup() error {
	if err := os.RemoveAll(b.dir); err != nil {
		return fmt.Errorf("layout: remove box dir %s: %w", b.dir, err)
	}
	return nil
}
