package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"k8s.io/klog/v2"

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
	// Outcome says what PrepareBox did with the overlay.
	Outcome Outcome
}

// Outcome is what PrepareBox did with a box's overlay.
type Outcome string

const (
	// Created: there was no overlay; a fresh one was written.
	Created Outcome = "created"
	// Reused: a valid overlay was kept untouched (same length, mtime and
	// backing), so the guest's writes survive a restart.
	Reused Outcome = "reused"
	// Recreated: the overlay's header was corrupt; it was discarded and a
	// fresh one written over the base.
	Recreated Outcome = "recreated"
)

// ErrRefusedOverlay marks an overlay PrepareBox will not use and must not
// delete: unreadable (it may still be intact), tampered with, or backed by
// a base that has gone. The error also wraps the qcow2 error that says
// which.
var ErrRefusedOverlay = errors.New("overlay refused")

// OverlayExpect is what a box's overlay header must say: its base, named
// relatively, in raw format. Anything else is tampering.
func OverlayExpect(box layout.Box) qcow2.Expect {
	return qcow2.Expect{BackingFile: box.BackingName(), BackingFormat: qcow2.FormatRaw}
}

// VerifyOverlay checks a box's overlay header against OverlayExpect
// without opening the backing it names.
func VerifyOverlay(box layout.Box) (*qcow2.Header, error) {
	return qcow2.Verify(box.GuestRootfsDiskPath(), OverlayExpect(box))
}

// PrepareBox creates the box directories, then creates the box's
// guest-rootfs overlay over base or reuses the one it has. Whether an
// existing overlay is reused, refused or recreated follows upstream's
// reuse rules, which the README lists ("Reuse rules for an existing
// overlay"); the switch below is that list, case by case.
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
func PrepareBox(ctx context.Context, box layout.Box, base func(context.Context) (Base, error), size uint64) (BoxDisk, error) {
	if err := box.Prepare(); err != nil {
		return BoxDisk{}, err
	}
	d := BoxDisk{Overlay: box.GuestRootfsDiskPath(), Base: box.BasePath()}
	want := OverlayExpect(box)

	_, err := os.Lstat(d.Overlay)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return createOverlay(ctx, box, base, size, d, Created)
	case err != nil:
		return d, fmt.Errorf("rootfs: %w: cannot stat %s: %w", ErrRefusedOverlay, d.Overlay, err)
	}

	h, err := qcow2.Verify(d.Overlay, want)
	switch {
	case err == nil:
		if _, err := os.Stat(d.Base); err != nil {
			return d, fmt.Errorf("rootfs: %w: %w (box %s cannot start until its base is restored)",
				ErrRefusedOverlay, &qcow2.MissingBackingError{Overlay: d.Overlay, Backing: want.BackingFile, Err: err}, box.ID())
		}
		d.VirtualSize = h.Size
		d.Outcome = Reused
		klog.FromContext(ctx).V(4).Info("Reusing guest rootfs overlay", "overlay", d.Overlay)
		return d, nil
	case qcow2.IsCorrupt(err):
		klog.FromContext(ctx).Info("Discarding corrupt guest rootfs overlay and recreating it from the cached base",
			"overlay", d.Overlay, "reason", err.Error())
		if err := os.Remove(d.Overlay); err != nil {
			return d, fmt.Errorf("rootfs: remove corrupt overlay %s: %w", d.Overlay, err)
		}
		return createOverlay(ctx, box, base, size, d, Recreated)
	case qcow2.IsIO(err):
		return d, fmt.Errorf("rootfs: %w: cannot read %s to validate its backing chain; refusing to discard a possibly-intact overlay: %w",
			ErrRefusedOverlay, d.Overlay, err)
	default:
		// Tampered, or anything else Verify might add: never follow it.
		return d, fmt.Errorf("rootfs: %w: %w", ErrRefusedOverlay, err)
	}
}

// createOverlay links base into the box (replacing a link left by an
// earlier attempt that never got an overlay) and writes a fresh overlay.
func createOverlay(ctx context.Context, box layout.Box, getBase func(context.Context) (Base, error), size uint64, d BoxDisk, o Outcome) (BoxDisk, error) {
	// Eviction may remove an unused base between the lookup and the link
	// (only with a grace period near zero); then the base is ensured again,
	// which rebuilds it.
	var base Base
	for attempt := 1; ; attempt++ {
		var err error
		if base, err = getBase(ctx); err != nil {
			return d, err
		}
		err = linkBase(box, base)
		if err == nil {
			break
		}
		if _, serr := os.Stat(base.Path); attempt == 3 || !errors.Is(serr, fs.ErrNotExist) {
			return d, err
		}
		klog.FromContext(ctx).Info("Base evicted before it could be linked; ensuring it again", "base", base.Path, "box", box.ID())
	}
	d.VirtualSize = max(uint64(base.Size), size)
	if err := qcow2.CreateOverlay(ctx, d.Overlay, qcow2.OverlayOptions{
		BackingFile:   box.BackingName(),
		BackingFormat: qcow2.FormatRaw,
		Size:          d.VirtualSize,
	}); err != nil {
		// Without an overlay the link is debris, and a link pins the base
		// against eviction: a box that failed to stage (a full disk) must
		// not keep a base alive. The next attempt links it again.
		if rerr := os.Remove(box.BasePath()); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = errors.Join(err, fmt.Errorf("remove base link %s: %w", box.BasePath(), rerr))
		}
		return d, fmt.Errorf("rootfs: %w", err)
	}
	d.VirtualSize = (d.VirtualSize + 511) &^ 511
	d.Outcome = o
	klog.FromContext(ctx).V(2).Info("Created guest rootfs overlay", "overlay", d.Overlay, "base", base.Path, "virtualSize", d.VirtualSize, "outcome", o)
	return d, nil
}

// linkBase makes <box>/base/rootfs.ext4 a hard link to the cached base.
// It only runs when the box has no overlay, so whatever is at the path is
// debris from an interrupted attempt and may be replaced.
func linkBase(box layout.Box, base Base) error {
	p := box.BasePath()
	if fi, err := os.Lstat(p); err == nil {
		if bfi, err := os.Stat(base.Path); err == nil && os.SameFile(fi, bfi) {
			return nil
		}
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("rootfs: replace stale base link %s: %w", p, err)
		}
	}
	if err := os.Link(base.Path, p); err != nil {
		return fmt.Errorf("rootfs: link base %s into box at %s: %w", base.Path, p, err)
	}
	return nil
}
