package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// FreezingName is the name, in disks/, that the new overlay is written
// under while a freeze runs, and that the frozen one holds for a moment
// after the exchange. Whatever a crash leaves there is debris.
const FreezingName = ".guest-rootfs.qcow2.freezing"

// FreezeOptions are FreezeBox's inputs.
type FreezeOptions struct {
	// Layer is the file name the frozen overlay gets in base/.
	Layer string
	// Also are more directories that get a link to the layer (the
	// plugin-owned copy of base/), on the same mount as root.
	Also []*safeopen.Root
	// BeforeCommit runs once the freeze is sure to be attempted, before
	// anything is linked: the driver records its intent there, so that
	// a crash at any later point is settled by SettleFreeze.
	BeforeCommit func() error
}

// Frozen is what FreezeBox did.
type Frozen struct {
	// Empty is true when the overlay mapped nothing, so nothing was
	// frozen: the chain under it already holds the disk's content.
	Empty bool
	// VirtualSize is the frozen disk's size.
	VirtualSize uint64
}

// FreezeBox turns the box's overlay into the read-only layer base/<Layer>
// and gives the box a fresh, empty overlay over it, in O(1): no data is
// copied. root is the box's root opened beneath a mount that shows what
// the box holds under its read-only mounts (the driver clones the home's
// mount without its submounts), so the box's own base/ gets the link too
// and the box stays self-contained after a reboot.
//
// A frozen layer is shared from then on, so no process may write it: the
// freeze is refused, wrapping ErrOverlayInUse, while any process has the
// overlay open for writing (a running VM). That is proved with a read
// lease, which the kernel grants only when there is no writer and breaks
// when one opens the file; an open for writing during the freeze waits
// for it to end, and a broken lease undoes the freeze. The overlay must
// have one link only: a hard link a pod made in its box would be a way
// to write the layer later. Once the new overlay is in place the layer
// is sealed (internal/sealed), which refuses every later open for
// writing, even through a descriptor a pod kept.
func FreezeBox(ctx context.Context, root *safeopen.Root, box layout.Box, opts FreezeOptions) (Frozen, error) {
	log := klog.FromContext(ctx)
	p := box.GuestRootfsDiskPath()
	f, err := openInBox(root, box, p)
	if err != nil {
		return Frozen{}, fmt.Errorf("rootfs: freeze box %s: %w", box.ID(), err)
	}
	defer f.Close()
	if err := takeReadLease(ctx, f); err != nil {
		if errors.Is(err, sealed.ErrWriter) {
			return Frozen{}, fmt.Errorf("rootfs: %w: %s is open for writing (a running VM, or a tool writing it), and a disk is never frozen under a writer: %w", ErrOverlayInUse, p, err)
		}
		return Frozen{}, fmt.Errorf("rootfs: cannot take a lease on %s to prove no process writes it, so it is not frozen: %w", p, err)
	}
	defer sealed.ReleaseLease(f)
	h, err := qcow2.VerifyFile(f, OverlayExpect(box))
	if err != nil {
		return Frozen{}, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	probe, err := qcow2.ProbeL1File(f)
	if err != nil {
		return Frozen{}, fmt.Errorf("rootfs: freeze box %s: read the L1 table of %s: %w", box.ID(), p, err)
	}
	if probe.Empty {
		return Frozen{Empty: true, VirtualSize: h.Size}, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return Frozen{}, fmt.Errorf("rootfs: fstat %s: %w", p, err)
	}
	if st.Nlink != 1 {
		return Frozen{}, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, &qcow2.TamperedError{Path: p, Field: "link count", Got: fmt.Sprint(st.Nlink), Want: "1 (a second hard link would let a process write the frozen layer)"})
	}
	baseDir, err := openDirInBox(root, box, box.BaseDir())
	if err != nil {
		return Frozen{}, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	defer baseDir.Close()
	disksDir, err := openDirInBox(root, box, box.DisksDir())
	if err != nil {
		return Frozen{}, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
	defer disksDir.Close()
	if opts.BeforeCommit != nil {
		if err := opts.BeforeCommit(); err != nil {
			return Frozen{}, err
		}
	}

	// From here on, a failure undoes what was done, in reverse.
	var undo []func() error
	fail := func(err error) (Frozen, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}
		return Frozen{}, err
	}
	dirs := []*os.File{baseDir}
	for _, r := range opts.Also {
		dirs = append(dirs, r.Dir())
	}
	for _, dir := range dirs {
		if err := unix.Linkat(int(f.Fd()), "", int(dir.Fd()), opts.Layer, unix.AT_EMPTY_PATH); err != nil {
			return fail(fmt.Errorf("rootfs: freeze box %s: link %s as %s: %w", box.ID(), p, filepath.Join(dir.Name(), opts.Layer), err))
		}
		undo = append(undo, func() error { return unlinkName(dir, opts.Layer) })
	}
	if err := unlinkName(disksDir, FreezingName); err != nil {
		return fail(err)
	}
	next := box.WithTop(opts.Layer)
	if err := qcow2.CreateOverlayAt(ctx, disksDir, FreezingName, qcow2.OverlayOptions{
		BackingFile: next.BackingName(), BackingFormat: qcow2.FormatQcow2, Size: h.Size,
	}); err != nil {
		return fail(fmt.Errorf("rootfs: freeze box %s: %w", box.ID(), err))
	}
	undo = append(undo, func() error { return unlinkName(disksDir, FreezingName) })

	// The exchange is the commit: the box's overlay name holds the new,
	// empty overlay, and the frozen one is under FreezingName.
	name := filepath.Base(p)
	exchange := func() error {
		if err := unix.Renameat2(int(disksDir.Fd()), FreezingName, int(disksDir.Fd()), name, unix.RENAME_EXCHANGE); err != nil {
			return fmt.Errorf("rootfs: freeze box %s: exchange %s and %s: %w", box.ID(), FreezingName, p, err)
		}
		return nil
	}
	if err := exchange(); err != nil {
		return fail(err)
	}
	undo = append(undo, exchange)
	var moved unix.Stat_t
	if err := unix.Fstatat(int(disksDir.Fd()), FreezingName, &moved, unix.AT_SYMLINK_NOFOLLOW); err != nil || moved.Dev != st.Dev || moved.Ino != st.Ino {
		return fail(fmt.Errorf("rootfs: %w: %s was replaced while it was being frozen", ErrRefusedOverlay, p))
	}
	if held, err := sealed.LeaseHeld(f); err != nil || !held {
		return fail(errors.Join(err, fmt.Errorf("rootfs: %w: a process opened %s for writing while it was being frozen; it was left as it was", ErrOverlayInUse, p)))
	}
	if err := unix.Unlinkat(int(disksDir.Fd()), FreezingName, 0); err != nil {
		return fail(fmt.Errorf("rootfs: freeze box %s: remove %s: %w", box.ID(), filepath.Join(disksDir.Name(), FreezingName), err))
	}
	// From here the freeze stands: the layer is sealed before the lease
	// goes, so no open for writing can succeed after it.
	if err := syncDirFD(disksDir); err != nil {
		log.Error(err, "Freezing: syncing the disks directory", "box", box.ID())
	}
	if err := sealed.Seal(f); err != nil {
		return Frozen{VirtualSize: h.Size}, fmt.Errorf("rootfs: freeze box %s: seal the layer: %w", box.ID(), err)
	}
	log.V(2).Info("Froze guest rootfs overlay into a layer", "box", box.ID(), "layer", opts.Layer, "virtualSize", h.Size)
	return Frozen{VirtualSize: h.Size}, nil
}

// SettleFreeze finishes or undoes a freeze that a crash interrupted after
// its intent was recorded: committed is whether the overlay's header
// already names the new layer (the exchange happened). Either way the
// debris under FreezingName goes; a committed layer is sealed, an
// uncommitted one's links (in base/ and in also) are removed. root is
// opened as for FreezeBox.
func SettleFreeze(ctx context.Context, root *safeopen.Root, box layout.Box, layer string, also ...*safeopen.Root) (committed bool, err error) {
	verify := func(b layout.Box) error {
		f, err := openInBox(root, box, box.GuestRootfsDiskPath())
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = qcow2.VerifyFile(f, OverlayExpect(b))
		return err
	}
	if err := verify(box.WithTop(layer)); err == nil {
		committed = true
	} else if err := verify(box); err != nil {
		return false, fmt.Errorf("rootfs: settle the freeze of box %s: %w: %w", box.ID(), ErrRefusedOverlay, err)
	}
	disksDir, err := openDirInBox(root, box, box.DisksDir())
	if err != nil {
		return false, err
	}
	defer disksDir.Close()
	if err := unlinkName(disksDir, FreezingName); err != nil {
		return false, err
	}
	baseDir, err := root.OpenRoot(relIn(box, box.BaseDir()))
	if err != nil {
		return false, fmt.Errorf("rootfs: settle the freeze of box %s: %w", box.ID(), err)
	}
	defer baseDir.Close()
	for _, dir := range append([]*safeopen.Root{baseDir}, also...) {
		if !committed {
			if err := sealed.Unlink(dir.Dir(), layer); err != nil {
				return false, err
			}
			continue
		}
		lf, err := dir.OpenFile(layer, unix.O_RDONLY)
		if err != nil {
			continue // not linked there: the next stage links it
		}
		err = sealed.Seal(lf)
		lf.Close()
		if err != nil {
			return true, err
		}
	}
	klog.FromContext(ctx).Info("Settled an interrupted freeze", "box", box.ID(), "layer", layer, "committed", committed)
	return committed, nil
}

// takeReadLease takes a read lease on f, trying again briefly while a
// short-lived writer (a tool, not a VM) has the file open.
func takeReadLease(ctx context.Context, f *os.File) error {
	for i := 1; ; i++ {
		err := sealed.TakeReadLease(f)
		if err == nil || i == leaseTries || !errors.Is(err, sealed.ErrWriter) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(leaseWait):
		}
	}
}

// unlinkName removes dir/name, whatever it is (a pod may have put a
// directory there); a missing one is fine.
func unlinkName(dir *os.File, name string) error {
	err := unix.Unlinkat(int(dir.Fd()), name, 0)
	if errors.Is(err, unix.EISDIR) {
		err = unix.Unlinkat(int(dir.Fd()), name, unix.AT_REMOVEDIR)
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("rootfs: remove %s: %w", filepath.Join(dir.Name(), name), err)
	}
	return nil
}

// syncDirFD fsyncs the directory open (possibly as O_PATH) as dir.
func syncDirFD(dir *os.File) error {
	fd, err := unix.Openat(int(dir.Fd()), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir.Name(), err)
	}
	defer unix.Close(fd)
	return unix.Fsync(fd)
}
