package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// BoxDisk is a box's root disk after PrepareBox.
type BoxDisk struct {
	// Overlay is <box>/disks/guest-rootfs.qcow2.
	Overlay string
	// Base is <box>/base/rootfs.ext4, a hard link to the cached base that
	// the overlay names relatively as ../base/rootfs.ext4.
	Base string
	// VirtualSize is the overlay's size in bytes.
	VirtualSize uint64
	// FilesystemSize is the size in bytes of the filesystem a fresh
	// overlay was laid out with (DiskPlan.FilesystemSize). It is 0 for a
	// reused overlay: the plugin never reads the filesystem a guest has
	// written, and the volume's record holds what it was made with.
	FilesystemSize uint64
	// Outcome says what PrepareBox did with the overlay.
	Outcome Outcome
	// SetAside is where a corrupt overlay that may hold data was moved
	// (<Overlay>.corrupt-<UTC time>) before a fresh one was written; ""
	// unless SetAsideCorrupt applied.
	SetAside string
}

// Outcome is what PrepareBox did with a box's overlay.
type Outcome string

const (
	// Created: there was no overlay; a fresh one was written.
	Created Outcome = "created"
	// Reused: a valid overlay was kept untouched (same length, mtime and
	// backing), so the guest's writes survive a restart.
	Reused Outcome = "reused"
	// Recreated: the overlay's header was corrupt and a fresh one was
	// written over the base. The old one either mapped no guest data (its
	// L1 table was empty) and was removed, or it was set aside under
	// BoxDisk.SetAside (SetAsideCorrupt).
	Recreated Outcome = "recreated"
)

// ErrRefusedOverlay marks an overlay PrepareBox will not use and must not
// delete: unreadable (it may still be intact), tampered with (a header
// naming another backing, or a symbolic link, FIFO, device or directory
// where the overlay or its directories should be), corrupt but possibly
// holding data (ErrCorruptOverlay), or backed by a base that has gone.
// The error also wraps the qcow2 error that says which.
var ErrRefusedOverlay = errors.New("overlay refused")

// ErrCorruptOverlay marks a corrupt overlay that PrepareBox kept, byte for
// byte, because its L1 table may map the volume's data (KeepCorrupt). The
// error names the file and the command that repairs it. It always comes
// wrapped together with ErrRefusedOverlay.
var ErrCorruptOverlay = errors.New("corrupt overlay kept for repair")

// CorruptPolicy says what PrepareBox does with an overlay whose header is
// corrupt and whose L1 table may map guest data. An overlay that provably
// maps none (qcow2.ProbeL1) is recreated whatever the policy: there is
// nothing in it to lose.
type CorruptPolicy int

const (
	// KeepCorrupt leaves the overlay untouched and refuses it with
	// ErrCorruptOverlay, naming the repair command. The default: for a
	// persistent volume the overlay is the user's data, and `qemu-img
	// check -r all` can usually repair it.
	KeepCorrupt CorruptPolicy = iota
	// SetAsideCorrupt renames the overlay to
	// guest-rootfs.qcow2.corrupt-<UTC time> in the same directory, logs
	// the new name, and creates a fresh overlay: for ephemeral volumes, or
	// by opt-in. Nothing is deleted.
	SetAsideCorrupt
)

func (p CorruptPolicy) String() string {
	switch p {
	case KeepCorrupt:
		return "KeepCorrupt"
	case SetAsideCorrupt:
		return "SetAsideCorrupt"
	}
	return fmt.Sprintf("CorruptPolicy(%d)", int(p))
}

// PrepareOptions are PrepareBoxWith's choices. The zero value is
// PrepareBox's behaviour.
type PrepareOptions struct {
	// Corrupt is what to do with a corrupt overlay that may hold data.
	Corrupt CorruptPolicy
	// BeforeCreate, when set, is called with the plan of a fresh overlay
	// before it is written; an error stops the creation. The driver
	// records the filesystem's size there, so that no crash can leave an
	// overlay whose size the record does not know.
	BeforeCreate func(context.Context, DiskPlan) error
}

// corruptSuffix names a set-aside overlay; the time is UTC.
const corruptSuffix = ".corrupt-"

// OverlayExpect is what a box's overlay header must say: its base, named
// relatively, in raw format, or for a box with a frozen layer under its
// overlay (layout.Box.WithTop), that layer in qcow2 format. Anything else
// is tampering.
func OverlayExpect(box layout.Box) qcow2.Expect {
	if box.Top() != "" {
		return qcow2.Expect{BackingFile: box.BackingName(), BackingFormat: qcow2.FormatQcow2}
	}
	return qcow2.Expect{BackingFile: box.BackingName(), BackingFormat: qcow2.FormatRaw}
}

// VerifyOverlay checks a box's overlay header against OverlayExpect
// without opening the backing it names. The overlay is opened as
// OpenOverlay opens it, so what a pod puts in its box cannot make this
// hang or read elsewhere: a symbolic link, FIFO, device, socket or
// directory at disks/ or at the overlay is a *qcow2.TamperedError. A
// missing overlay is a *qcow2.IOError wrapping fs.ErrNotExist.
func VerifyOverlay(box layout.Box) (*qcow2.Header, error) {
	f, err := OpenOverlay(box)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return qcow2.VerifyFile(f, OverlayExpect(box))
}

// OpenOverlay opens a box's overlay for reading beneath the box root,
// following no symbolic link in any component and without blocking; it
// must be a regular file. Read it with qcow2.ReadHeaderFile or
// qcow2.VerifyFile, and fstat it for its allocated size. Errors are
// classified as VerifyOverlay's are. The caller closes the file.
func OpenOverlay(box layout.Box) (*os.File, error) {
	root, err := openBoxRoot(box)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	return openInBox(root, box, box.GuestRootfsDiskPath())
}

// VerifyBase checks a box's base link as PrepareBox does before reusing
// its overlay: present, and a regular file reached without following a
// symbolic link. A missing one is a *qcow2.MissingBackingError wrapping
// fs.ErrNotExist; a symbolic link, FIFO or anything else is a
// *qcow2.TamperedError. Nothing is opened for reading.
func VerifyBase(box layout.Box) error {
	root, err := openBoxRoot(box)
	if err != nil {
		return err
	}
	defer root.Close()
	return baseError(root, box)
}

// PrepareBox is PrepareBoxWith with the default options: a corrupt
// overlay that may hold data is kept and refused (KeepCorrupt).
func PrepareBox(ctx context.Context, box layout.Box, base func(context.Context) (Base, error), size uint64) (BoxDisk, error) {
	return PrepareBoxWith(ctx, box, base, size, PrepareOptions{})
}

// PrepareBoxWith creates the box directories, then creates the box's
// guest-rootfs overlay over base or reuses the one it has. Whether an
// existing overlay is reused, refused or recreated follows the README's
// "Reuse rules for an existing overlay" (upstream's, refined so that no
// data is deleted to recover); the switches below are that list, case by
// case.
//
// The box is writable by its pod, so everything in it is opened beneath
// the box root without following symbolic links and without blocking
// (internal/safeopen), and what is removed, renamed or created is named
// relative to a directory opened that way.
//
// The base is hard-linked rather than referenced by an absolute path, so
// the box is self-contained (the chain resolves inside a pod that sees only
// the box, and after a reboot with no mounts), and the link itself is the
// on-disk record that this base is in use. Making it read-only with a bind
// mount is the driver's job.
//
// base is only called when an overlay must be created, so reusing a box
// needs neither the cache nor a registry: the box's own linked base is
// the one its overlay was written over. The virtual size of a new overlay
// is max(base size, size); a reused overlay keeps the size it has.
func PrepareBoxWith(ctx context.Context, box layout.Box, base func(context.Context) (Base, error), size uint64, opts PrepareOptions) (BoxDisk, error) {
	d := BoxDisk{Overlay: box.GuestRootfsDiskPath(), Base: box.BasePath()}
	// Prepare's MkdirAll follows links, so first refuse a box whose disks/
	// or base/ is no longer a directory.
	if err := checkBoxDirs(box); err != nil {
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	if err := box.Prepare(); err != nil {
		return d, err
	}
	root, err := openBoxRoot(box)
	if err != nil {
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	defer root.Close()
	want := OverlayExpect(box)

	f, err := openInBox(root, box, d.Overlay)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return createOverlay(ctx, root, box, base, size, d, opts, Created, "")
	case qcow2.IsTampered(err):
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	case err != nil:
		return d, fmt.Errorf("rootfs: %w: cannot open %s to validate its backing chain; refusing to discard a possibly-intact overlay: %w",
			ErrRefusedOverlay, d.Overlay, err)
	}
	defer f.Close()

	h, err := qcow2.VerifyFile(f, want)
	switch {
	case err == nil:
		if err := checkBase(root, box); err != nil {
			return d, err
		}
		d.VirtualSize = h.Size
		d.Outcome = Reused
		klog.FromContext(ctx).V(4).Info("Reusing guest rootfs overlay", "overlay", d.Overlay)
		return d, nil
	case qcow2.IsCorrupt(err):
		return recoverCorrupt(ctx, root, f, box, base, size, d, opts, err)
	case qcow2.IsIO(err):
		return d, fmt.Errorf("rootfs: %w: cannot read %s to validate its backing chain; refusing to discard a possibly-intact overlay: %w",
			ErrRefusedOverlay, d.Overlay, err)
	default:
		// Tampered, or anything else Verify might add: never follow it.
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
}

// checkBase is the reuse rule for the backing: the box's base link must
// be there, as a regular file reached without following a link.
func checkBase(root *safeopen.Root, box layout.Box) error {
	err := baseError(root, box)
	var mb *qcow2.MissingBackingError
	switch {
	case errors.As(err, &mb):
		return fmt.Errorf("rootfs: %w: %w (box %s cannot start until its base is restored)", ErrRefusedOverlay, err, box.ID())
	case err != nil:
		return fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	return nil
}

// baseError is VerifyBase beneath an open box root.
func baseError(root *safeopen.Root, box layout.Box) error {
	st, err := root.Lstat(relIn(box, box.BackingPath()))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return &qcow2.MissingBackingError{Overlay: box.GuestRootfsDiskPath(), Backing: box.BackingName(), Err: err}
	case err != nil:
		return boxPathError(root, box, box.BackingPath(), unix.S_IFREG, err)
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return qcow2.TamperedFileType(box.BackingPath(), "file type", st.Mode, "regular file", nil)
	}
	return nil
}

// recoverCorrupt applies the rule for a corrupt header: an overlay whose
// L1 table maps nothing is recreated; one that may hold data is kept and
// refused, or set aside, as opts.Corrupt says. Nothing that may hold data
// is ever deleted.
func recoverCorrupt(ctx context.Context, root *safeopen.Root, f *os.File, box layout.Box, base func(context.Context) (Base, error), size uint64, d BoxDisk, opts PrepareOptions, cerr error) (BoxDisk, error) {
	log := klog.FromContext(ctx)
	probe, err := qcow2.ProbeL1File(f)
	if err != nil {
		return d, fmt.Errorf("rootfs: %w: %w; cannot read its L1 table to tell whether it holds data, so it is kept: %w",
			ErrRefusedOverlay, cerr, err)
	}
	if probe.Empty {
		log.Info("Discarding corrupt guest rootfs overlay, which maps no guest data, and recreating it from the cached base",
			"overlay", d.Overlay, "reason", cerr.Error(), "l1", probe.Reason)
		if err := removeChecked(root, box, f); err != nil {
			return d, fmt.Errorf("rootfs: %w: remove corrupt overlay %s: %w", ErrRefusedOverlay, d.Overlay, err)
		}
		return createOverlay(ctx, root, box, base, size, d, opts, Recreated, "")
	}
	switch opts.Corrupt {
	case KeepCorrupt:
		return d, fmt.Errorf("rootfs: %w: %w: %w; %s, so it may hold the volume's data and was left untouched: repair it with `qemu-img check -r all %s` and stage the volume again",
			ErrRefusedOverlay, ErrCorruptOverlay, cerr, probe.Reason, d.Overlay)
	case SetAsideCorrupt:
		suffix, err := setAside(root, box, f)
		if err != nil {
			return d, fmt.Errorf("rootfs: %w: %w; setting it aside failed, so it is kept where it is: %w", ErrRefusedOverlay, cerr, err)
		}
		d.SetAside = d.Overlay + suffix
		log.Info("Set aside corrupt guest rootfs overlay, which may hold guest data, and recreating it from the cached base",
			"overlay", d.Overlay, "setAside", d.SetAside, "reason", cerr.Error(), "l1", probe.Reason,
			"repair", "qemu-img check -r all "+d.SetAside)
		return createOverlay(ctx, root, box, base, size, d, opts, Recreated, suffix)
	default:
		return d, fmt.Errorf("rootfs: %w: %w: unknown corrupt-overlay policy %v, so it was left untouched", ErrRefusedOverlay, cerr, opts.Corrupt)
	}
}

// createOverlay links base into the box (replacing a link left by an
// earlier attempt that never got an overlay) and writes a fresh overlay,
// with the base's filesystem grown to the overlay's size (planDisk).
// asideSuffix is set when a corrupt overlay was just set aside under it:
// a base link that has to be replaced is then renamed with the same
// suffix instead of removed, so the set-aside overlay's base survives.
func createOverlay(ctx context.Context, root *safeopen.Root, box layout.Box, getBase func(context.Context) (Base, error), size uint64, d BoxDisk, opts PrepareOptions, o Outcome, asideSuffix string) (BoxDisk, error) {
	if box.Top() != "" {
		return createLayeredOverlay(ctx, root, box, size, d, o)
	}
	baseDir, err := openDirInBox(root, box, box.BaseDir())
	if err != nil {
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	defer baseDir.Close()
	disksDir, err := openDirInBox(root, box, box.DisksDir())
	if err != nil {
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	defer disksDir.Close()

	// Eviction may remove an unused base between the lookup and the link
	// (only with a grace period near zero); then the base is ensured again,
	// which rebuilds it.
	var base Base
	for attempt := 1; ; attempt++ {
		var err error
		if base, err = getBase(ctx); err != nil {
			return d, err
		}
		err = linkBase(baseDir, box, base, asideSuffix)
		if err == nil {
			break
		}
		if _, serr := os.Stat(base.Path); attempt == 3 || !errors.Is(serr, fs.ErrNotExist) {
			return d, err
		}
		klog.FromContext(ctx).Info("Base evicted before it could be linked; ensuring it again", "base", base.Path, "box", box.ID())
	}
	err = writePlannedOverlay(ctx, disksDir, box, base, size, opts, &d)
	if err != nil {
		// Without an overlay the link is debris, and a link pins the base
		// against eviction: a box that failed to stage (a full disk) must
		// not keep a base alive. The next attempt links it again.
		if rerr := unix.Unlinkat(int(baseDir.Fd()), filepath.Base(box.BasePath()), 0); rerr != nil && !errors.Is(rerr, unix.ENOENT) {
			err = errors.Join(err, fmt.Errorf("remove base link %s: %w", box.BasePath(), rerr))
		}
		return d, fmt.Errorf("rootfs: %w", err)
	}
	d.Outcome = o
	klog.FromContext(ctx).V(2).Info("Created guest rootfs overlay", "overlay", d.Overlay, "base", base.Path,
		"virtualSize", d.VirtualSize, "filesystemSize", d.FilesystemSize, "outcome", o)
	return d, nil
}

// createLayeredOverlay writes a fresh overlay over the frozen layer the
// box's chain ends in (a restored or cloned volume's, or one whose overlay
// was just frozen). The driver has linked the chain into base/ already, so
// nothing is linked here, and the base is not needed. The filesystem is
// not grown: a layer holds a filesystem a guest has written, which the
// plugin never parses, so a larger disk is left for the guest to grow
// into, as after an expansion. The virtual size is max(layer's, size).
func createLayeredOverlay(ctx context.Context, root *safeopen.Root, box layout.Box, size uint64, d BoxDisk, o Outcome) (BoxDisk, error) {
	disksDir, err := openDirInBox(root, box, box.DisksDir())
	if err != nil {
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	defer disksDir.Close()
	lf, err := openInBox(root, box, box.BackingPath())
	if err != nil {
		return d, fmt.Errorf("rootfs: box %s cannot get an overlay over its layer: %w", box.ID(), err)
	}
	defer lf.Close()
	h, err := qcow2.ReadHeaderFile(lf)
	if err != nil {
		return d, fmt.Errorf("rootfs: box %s: read its layer: %w", box.ID(), err)
	}
	vsize := max(h.Size, (size+511)&^511)
	if err := qcow2.CreateOverlayAt(ctx, disksDir, filepath.Base(d.Overlay), qcow2.OverlayOptions{
		BackingFile:   box.BackingName(),
		BackingFormat: qcow2.FormatQcow2,
		Size:          vsize,
	}); err != nil {
		return d, fmt.Errorf("rootfs: %w", err)
	}
	d.VirtualSize, d.Outcome = vsize, o
	klog.FromContext(ctx).V(2).Info("Created guest rootfs overlay over a frozen layer", "overlay", d.Overlay, "layer", box.BackingPath(), "virtualSize", vsize, "outcome", o)
	return d, nil
}

// writePlannedOverlay plans the disk over base, hands the plan to
// opts.BeforeCreate, and writes the overlay with the plan's blocks. It
// fills d's sizes.
func writePlannedOverlay(ctx context.Context, disksDir *os.File, box layout.Box, base Base, size uint64, opts PrepareOptions, d *BoxDisk) error {
	f, err := openBase(base)
	if err != nil {
		return err
	}
	defer f.Close()
	plan, err := planDisk(ctx, f, base, size)
	if err != nil {
		return err
	}
	if opts.BeforeCreate != nil {
		if err := opts.BeforeCreate(ctx, plan); err != nil {
			return err
		}
	}
	if err := qcow2.CreateOverlayAt(ctx, disksDir, filepath.Base(d.Overlay), qcow2.OverlayOptions{
		BackingFile:   box.BackingName(),
		BackingFormat: qcow2.FormatRaw,
		Size:          plan.VirtualSize,
		Writes:        plan.Writes,
		Backing:       f,
		BackingSize:   base.Size,
	}); err != nil {
		return err
	}
	d.VirtualSize, d.FilesystemSize = plan.VirtualSize, plan.FilesystemSize
	return nil
}

// linkBase makes <box>/base/rootfs.ext4 a hard link to the cached base,
// relative to the base directory open as dir. It only runs when the box
// has no overlay (or its overlay was just set aside), so whatever is at
// the name is debris from an interrupted attempt and may be replaced: it
// is removed, or renamed with asideSuffix when that is set.
func linkBase(dir *os.File, box layout.Box, base Base, asideSuffix string) error {
	p, name, dfd := box.BasePath(), filepath.Base(box.BasePath()), int(dir.Fd())
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		var bst unix.Stat_t
		if err := unix.Stat(base.Path, &bst); err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Dev == bst.Dev && st.Ino == bst.Ino {
			return nil
		}
		var err error
		if asideSuffix != "" && st.Mode&unix.S_IFMT == unix.S_IFREG {
			err = unix.Renameat2(dfd, name, dfd, name+asideSuffix, unix.RENAME_NOREPLACE)
		} else if err = unix.Unlinkat(dfd, name, 0); errors.Is(err, unix.EISDIR) {
			err = unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
		}
		if err != nil {
			return fmt.Errorf("rootfs: replace stale base link %s: %w", p, err)
		}
	}
	if err := unix.Linkat(unix.AT_FDCWD, base.Path, dfd, name, 0); err != nil {
		return fmt.Errorf("rootfs: link base %s into box at %s: %w", base.Path, p, &os.LinkError{Op: "link", Old: base.Path, New: p, Err: err})
	}
	return nil
}

// removeChecked removes the overlay open as f from the box, but only if
// its name still holds that file: a pod may have swapped something else
// in since it was read, and that is not what was judged disposable.
func removeChecked(root *safeopen.Root, box layout.Box, f *os.File) error {
	dir, name, err := overlayEntry(root, box, f)
	if err != nil {
		return err
	}
	defer dir.Close()
	return unix.Unlinkat(int(dir.Fd()), name, 0)
}

// setAside renames the overlay open as f to its name plus
// ".corrupt-<UTC time>", in the same directory, never replacing a file,
// and returns the suffix it used.
func setAside(root *safeopen.Root, box layout.Box, f *os.File) (string, error) {
	dir, name, err := overlayEntry(root, box, f)
	if err != nil {
		return "", err
	}
	defer dir.Close()
	stamp := corruptSuffix + time.Now().UTC().Format("20060102T150405Z")
	for i := 1; i <= 100; i++ {
		suffix := stamp
		if i > 1 {
			suffix = fmt.Sprintf("%s-%d", stamp, i)
		}
		err := unix.Renameat2(int(dir.Fd()), name, int(dir.Fd()), name+suffix, unix.RENAME_NOREPLACE)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("rename %s to %s: %w", box.GuestRootfsDiskPath(), name+suffix, err)
		}
		return suffix, nil
	}
	return "", fmt.Errorf("rename %s: %w", box.GuestRootfsDiskPath(), unix.EEXIST)
}

// overlayEntry opens the overlay's directory beneath root and checks that
// the overlay's name in it is still the file open as f.
func overlayEntry(root *safeopen.Root, box layout.Box, f *os.File) (*os.File, string, error) {
	dir, err := openDirInBox(root, box, box.DisksDir())
	if err != nil {
		return nil, "", err
	}
	name := filepath.Base(box.GuestRootfsDiskPath())
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		dir.Close()
		return nil, "", err
	}
	if err := unix.Fstatat(int(dir.Fd()), name, &b, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		dir.Close()
		return nil, "", err
	}
	if a.Dev != b.Dev || a.Ino != b.Ino {
		dir.Close()
		return nil, "", fmt.Errorf("%s was replaced while it was being checked", box.GuestRootfsDiskPath())
	}
	return dir, name, nil
}

// openBoxRoot opens the box directory that every path in the box is
// resolved beneath.
func openBoxRoot(box layout.Box) (*safeopen.Root, error) {
	root, err := safeopen.OpenRoot(box.Root())
	if err != nil {
		return nil, &qcow2.IOError{Path: box.Root(), Op: "open", Err: err}
	}
	return root, nil
}

// relIn is p relative to the box root; p is one of the box's own paths.
func relIn(box layout.Box, p string) string {
	rel, err := filepath.Rel(box.Root(), p)
	if err != nil {
		panic(fmt.Sprintf("rootfs: %s is not inside box %s", p, box.Root()))
	}
	return rel
}

// openInBox opens the box's regular file p for reading, beneath root,
// without following links or blocking.
func openInBox(root *safeopen.Root, box layout.Box, p string) (*os.File, error) {
	f, err := root.OpenFile(relIn(box, p), unix.O_RDONLY)
	if err != nil {
		return nil, boxPathError(root, box, p, unix.S_IFREG, err)
	}
	return f, nil
}

// openDirInBox opens the box's directory p as an O_PATH descriptor
// beneath root, refusing anything but a real directory.
func openDirInBox(root *safeopen.Root, box layout.Box, p string) (*os.File, error) {
	d, err := root.OpenPath(relIn(box, p))
	if err != nil {
		return nil, boxPathError(root, box, p, unix.S_IFDIR, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(d.Fd()), &st); err != nil {
		d.Close()
		return nil, &qcow2.IOError{Path: p, Op: "stat", Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		d.Close()
		return nil, qcow2.TamperedFileType(p, "file type", st.Mode, "directory", nil)
	}
	return d, nil
}

// checkBoxDirs refuses a box whose disks/ or base/ a pod replaced with
// something other than a directory (a symbolic link, a FIFO, a file). A
// box that does not exist yet, or lacks them, passes: Prepare makes them.
func checkBoxDirs(box layout.Box) error {
	root, err := safeopen.OpenRoot(box.Root())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return &qcow2.IOError{Path: box.Root(), Op: "open", Err: err}
	}
	defer root.Close()
	for _, p := range []string{box.DisksDir(), box.BaseDir()} {
		st, err := root.Lstat(relIn(box, p))
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return &qcow2.IOError{Path: p, Op: "stat", Err: err}
		case st.Mode&unix.S_IFMT != unix.S_IFDIR:
			return qcow2.TamperedFileType(p, "file type", st.Mode, "directory", nil)
		}
	}
	return nil
}

// boxPathError explains why the box's path p could not be opened beneath
// root (err). Each component is lstat'ed in turn, without following or
// blocking, and the first that is not a directory (or, for the last, not
// of type want: unix.S_IFREG or unix.S_IFDIR) is reported as tampered.
// Otherwise err is an I/O error, and ENOENT stays visible as
// fs.ErrNotExist.
func boxPathError(root *safeopen.Root, box layout.Box, p string, want uint32, err error) error {
	parts := strings.Split(relIn(box, p), string(filepath.Separator))
	for i := range parts {
		sub := filepath.Join(parts[:i+1]...)
		st, lerr := root.Lstat(sub)
		if lerr != nil {
			break
		}
		last := i == len(parts)-1
		wantType, field := uint32(unix.S_IFDIR), "parent "+sub+"/"
		if last {
			wantType, field = want, "file type"
		}
		if st.Mode&unix.S_IFMT != wantType {
			return qcow2.TamperedFileType(p, field, st.Mode, qcow2.FileTypeName(wantType), err)
		}
	}
	return &qcow2.IOError{Path: p, Op: "open", Err: err}
}
