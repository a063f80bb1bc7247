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
// honoured only when the home's Config.BindMountSupported is set. Otherwise
// the box falls back to the shared/ directory, and Box.IsolateMounts
// reports which one it got.
//
// It mirrors upstream's isolate_mounts option. The plugin does not request
// isolation yet.
func WithIsolatedMounts() BoxOption {
	return func(o *boxOptions) { o.isolateMounts = true }
}

// Box is the layout of one volume's box directory (upstream
// BoxFilesystemLayout). Get it from Home.Box, which validates the volume
// ID. That validation is what keeps every path below inside Root.
type Box struct {
	id            string
	dir           string
	isolateMounts bool
	// top is the frozen layer in base/ that the overlay is written over;
	// "" for the base itself.
	top string
}

// ID returns the volume ID the box was built for.
func (b Box) ID() string { return b.id }

// IsolateMounts reports whether mount isolation is in effect, which means it
// was requested and the host supports bind mounts. Upstream logs a warning
// when it falls back to shared/, and this lets a caller do the same. The plugin
// does not use it yet.
func (b Box) IsolateMounts() bool { return b.isolateMounts }

// Root returns the box directory, <home>/boxes/<id>.
func (b Box) Root() string { return b.dir }

// SocketsDir returns <box>/sockets.
//
// Part of the upstream layout. Prepare creates it, but nothing else in the
// plugin uses it yet.
func (b Box) SocketsDir() string { return filepath.Join(b.dir, socketsDirName) }

// SocketPath returns <box>/sockets/box.sock.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) SocketPath() string { return filepath.Join(b.SocketsDir(), boxSocketName) }

// ReadySocketPath returns <box>/sockets/ready.sock.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) ReadySocketPath() string { return filepath.Join(b.SocketsDir(), readySocketName) }

// NetBackendSocketPath returns <box>/sockets/net.sock. Each box has its own,
// so two boxes never fight over one network backend socket.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) NetBackendSocketPath() string { return filepath.Join(b.SocketsDir(), netSocketName) }

// MountsDir returns <box>/mounts when mount isolation is in effect, and
// <box>/shared otherwise.
//
// Part of the upstream layout. Prepare creates it, but nothing else in the
// plugin uses it yet.
func (b Box) MountsDir() string {
	if b.isolateMounts {
		return filepath.Join(b.dir, mountsDirName)
	}
	return b.SharedDir()
}

// SharedDir returns <box>/shared.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) SharedDir() string { return filepath.Join(b.dir, sharedDirName) }

// BinDir returns <box>/bin.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) BinDir() string { return filepath.Join(b.dir, binDirName) }

// CADir returns <box>/ca.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) CADir() string { return filepath.Join(b.dir, caDirName) }

// LogsDir returns <box>/logs.
//
// Part of the upstream layout. Prepare creates it, but nothing else in the
// plugin uses it yet.
func (b Box) LogsDir() string { return filepath.Join(b.dir, boxLogsDirName) }

// TmpDir returns <box>/tmp. It lives inside the box, not in <home>/tmp, so
// a jailed process needs no access outside its box.
//
// Part of the upstream layout. Prepare creates it, but nothing else in the
// plugin uses it yet.
func (b Box) TmpDir() string { return filepath.Join(b.dir, boxTmpDirName) }

// DisksDir returns <box>/disks.
func (b Box) DisksDir() string { return filepath.Join(b.dir, disksDirName) }

// DiskPath returns <box>/disks/disk.qcow2, the container disk.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) DiskPath() string { return filepath.Join(b.DisksDir(), containerDiskName) }

// GuestRootfsDiskPath returns <box>/disks/guest-rootfs.qcow2, the per-box
// copy-on-write overlay over the cached base.
func (b Box) GuestRootfsDiskPath() string { return filepath.Join(b.DisksDir(), guestRootfsDiskName) }

// ConsoleOutputPath returns <box>/logs/console.log.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) ConsoleOutputPath() string { return filepath.Join(b.LogsDir(), consoleLogName) }

// PIDFilePath returns <box>/shim.pid.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) PIDFilePath() string { return filepath.Join(b.dir, pidFileName) }

// ExitFilePath returns <box>/exit.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) ExitFilePath() string { return filepath.Join(b.dir, exitFileName) }

// StderrFilePath returns <box>/shim.stderr.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) StderrFilePath() string { return filepath.Join(b.dir, stderrFileName) }

// BaseDir returns <box>/base, the directory that holds BasePath.
func (b Box) BaseDir() string { return filepath.Join(b.dir, baseDirName) }

// BasePath returns <box>/base/rootfs.ext4. The plugin makes it a hard link
// to the cached base disk and bind-mounts it read-only onto itself. That
// makes the box self-contained: its overlay reaches the base through
// BackingName, which still resolves after the box is rbind-mounted
// elsewhere.
//
// The read-only bind mount does not survive a reboot, but the link does.
// Until the mount is made again, the shared base can be written through
// the link, so it must be mounted again before the box is used.
func (b Box) BasePath() string { return filepath.Join(b.BaseDir(), baseRootfsName) }

// BackingName returns the backing file name recorded in the guest-rootfs
// overlay: the file it is written over in base/, relative to DisksDir
// ("../base/rootfs.ext4", or "../base/<layer>" for a box whose overlay is
// written over a frozen layer, see WithTop). It is relative so that the
// chain still resolves when the box is reached through a bind mount at
// another path. This depends on disks/ and base/ both being direct
// children of the box, which the layout tests pin. A frozen layer in
// base/ names its own backing the same way: "../base/<name>" resolves
// to base/<name> from base/ as well as from disks/.
func (b Box) BackingName() string {
	return filepath.Join("..", baseDirName, b.backing())
}

// BackingPath is the file the overlay is written over: BasePath, or the
// frozen layer WithTop named.
func (b Box) BackingPath() string { return filepath.Join(b.BaseDir(), b.backing()) }

func (b Box) backing() string {
	if b.top != "" {
		return b.top
	}
	return baseRootfsName
}

// WithTop returns the box with its overlay written over the frozen layer
// base/<layer> (a qcow2 image) instead of over the base. A volume that was
// snapshotted, restored or cloned has such a chain; layer must be a
// single file name, which the caller has validated. WithTop("") is the
// plain box.
func (b Box) WithTop(layer string) Box {
	b.top = layer
	return b
}

// Top is the layer WithTop set; "" when the overlay is over the base.
func (b Box) Top() string { return b.top }

// ManifestPath returns <box>/box.json.
func (b Box) ManifestPath() string { return filepath.Join(b.dir, boxManifestName) }

// Prepare creates the box directory and its sockets, tmp, disks, mounts
// (as MountsDir chooses), logs and base subdirectories. It is idempotent.
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
			return fmt.Errorf("cannot create the %s directory %s: %w", d.name, d.path, err)
		}
	}
	return nil
}

// Cleanup removes the box directory and everything in it. A missing box is
// not an error.
//
// The caller must first unmount everything under the box: the base bind
// mount, anything in MountsDir, and any rbind of the box to a target path.
// Cleanup does not check. RemoveAll would descend into a mounted directory
// and delete the mounted filesystem's contents, and removing a box that is
// still rbind-mounted empties the target too.
//
// Part of the upstream layout. The plugin does not use it yet.
func (b Box) Cleanup() error {
	if err := os.RemoveAll(b.dir); err != nil {
		return fmt.Errorf("cannot remove the box directory %s: %w", b.dir, err)
	}
	return nil
}
