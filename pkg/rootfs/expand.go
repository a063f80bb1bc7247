package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// leaseTries and leaseWait bound how long ExpandBox waits for a brief
// open of the overlay to end (the plugin's own stats call, a qemu-img
// info): a VM holds it open for good, and gets FailedPrecondition within
// about 100 ms.
const (
	leaseTries = 10
	leaseWait  = 10 * time.Millisecond
)

// takeWriteLease takes a write lease on f, trying again briefly while
// another descriptor is open.
func takeWriteLease(ctx context.Context, f *os.File) error {
	for i := 1; ; i++ {
		_, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_WRLCK)
		if err == nil || i == leaseTries || !(errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EBUSY)) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(leaseWait):
		}
	}
}

// ErrOverlayInUse marks an overlay that another process holds open, such
// as a running VM. QEMU keeps its own copy of the header while it has the
// image open, so the header is not rewritten under it; the caller retries
// once the VM has stopped.
var ErrOverlayInUse = errors.New("overlay is open in another process")

// Expanded is what ExpandBox found and did.
type Expanded struct {
	// OldSize and NewSize are the disk's virtual size before and after.
	OldSize, NewSize uint64
	// Changed is false when the disk already had the size asked for.
	Changed bool
}

// ExpandBox raises the virtual size of the box's overlay to size bytes.
// It never reads or writes the filesystem inside: that is the guest's,
// and the guest's kernel grows it online into the new space (resize2fs
// on its mounted root). The base is not touched either.
//
// The header is rewritten only while a write lease on the overlay is
// held. The kernel grants one only when no other descriptor of the file
// is open anywhere, read or write, and while it is held a new open waits
// for it to be released. So no VM can have the image open, or open it,
// while its header changes. When the lease is refused the error wraps
// ErrOverlayInUse. Shrinking is refused with an error wrapping
// qcow2.ErrShrink, and a size the overlay's L1 table has no room for
// with one wrapping qcow2.ErrGrowNeedsL1Move.
//
// The overlay is opened like every file in a box: beneath the box root,
// following no link, without blocking, and only if it is a regular file.
func ExpandBox(ctx context.Context, box layout.Box, size uint64) (Expanded, error) {
	root, err := openBoxRoot(box)
	if err != nil {
		return Expanded{}, err
	}
	defer root.Close()
	p := box.GuestRootfsDiskPath()
	f, err := root.OpenFile(relIn(box, p), unix.O_RDWR)
	if errors.Is(err, unix.EWOULDBLOCK) {
		// Someone holds a lease on it; a non-blocking open says so
		// rather than wait for the lease to be broken.
		return Expanded{}, fmt.Errorf("rootfs: %w: %s is leased by another process: %w", ErrOverlayInUse, p, err)
	}
	if err != nil {
		return Expanded{}, boxPathError(root, box, p, unix.S_IFREG, err)
	}
	defer f.Close()
	if err := takeWriteLease(ctx, f); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EBUSY) {
			return Expanded{}, fmt.Errorf("rootfs: %w: %s is open elsewhere (a running VM, or a tool reading it), and its header is never rewritten under a program that has it open: %w",
				ErrOverlayInUse, p, err)
		}
		return Expanded{}, fmt.Errorf("rootfs: cannot take a lease on %s to prove no VM has it open, so it is not resized: %w", p, err)
	}
	defer func() {
		if _, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_UNLCK); err != nil {
			klog.FromContext(ctx).Error(err, "Releasing the lease on the overlay", "overlay", p)
		}
	}()
	g, err := qcow2.GrowFile(f, OverlayExpect(box), size)
	if err != nil {
		return Expanded{OldSize: g.OldSize, NewSize: g.OldSize}, fmt.Errorf("rootfs: grow the disk of box %s to %d bytes: %w", box.ID(), size, err)
	}
	if g.Changed {
		klog.FromContext(ctx).V(2).Info("Grew the guest rootfs overlay", "overlay", p, "oldSize", g.OldSize, "newSize", g.NewSize)
	}
	return Expanded{OldSize: g.OldSize, NewSize: g.NewSize, Changed: g.Changed}, nil
}
