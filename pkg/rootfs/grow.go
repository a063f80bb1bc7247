package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"

	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
)

// DiskPlan is what a fresh overlay holds: its virtual size, and the ext4
// metadata blocks that grow the base's filesystem to that size, so the
// guest sees the disk its claim asked for without running anything.
type DiskPlan struct {
	// VirtualSize is the overlay's size in bytes: max(base size, size),
	// rounded up to 512 as qemu-img does.
	VirtualSize uint64
	// FilesystemSize is the size in bytes of the ext4 filesystem the
	// guest finds on the disk: VirtualSize less up to a block, or less a
	// last group too small to be worth its metadata (about 10 MiB at
	// most). It is the base's size when the base cannot be grown.
	FilesystemSize uint64
	// Writes are the grown filesystem's metadata blocks, stored in the
	// overlay's data clusters; none when the disk is the base's size.
	Writes []qcow2.Write
	// NotGrown says why the filesystem was left at the base's size
	// although the disk is larger; "" when it was grown or did not need
	// to be.
	NotGrown string
}

// planDisk plans the overlay of a disk of size bytes over base, open as f.
// The base is a file of the plugin's cache, built by this plugin, so it
// is not tenant data; ext4.PlanGrow still parses it defensively, and a
// base it does not recognise as its own layout (one built by a future
// builder, say) is left ungrown rather than refused: the guest then sees
// the base's size, as before growth existed, and the reason is logged.
func planDisk(ctx context.Context, f *os.File, base Base, size uint64) (DiskPlan, error) {
	p := DiskPlan{VirtualSize: (max(uint64(base.Size), size) + 511) &^ 511, FilesystemSize: uint64(base.Size)}
	if p.VirtualSize <= uint64(base.Size) {
		return p, nil
	}
	g, err := ext4.PlanGrow(f, base.Size, p.VirtualSize)
	switch {
	case errors.Is(err, ext4.ErrNotGrowable):
		p.NotGrown = err.Error()
		klog.FromContext(ctx).Info("Leaving the guest filesystem at the base's size: the base cannot be grown",
			"base", base.Path, "baseSize", base.Size, "diskSize", p.VirtualSize, "reason", err.Error())
		return p, nil
	case err != nil:
		return p, fmt.Errorf("rootfs: plan growing the filesystem of base %s to %d bytes: %w", base.Path, p.VirtualSize, err)
	}
	p.FilesystemSize = g.Size
	p.Writes = make([]qcow2.Write, len(g.Writes))
	for i, w := range g.Writes {
		p.Writes[i] = qcow2.Write{Offset: w.Offset, Data: w.Data}
	}
	return p, nil
}

// openBase opens the cache's base read-only, without following a link or
// blocking, and checks it is the regular file of the size the cache said.
func openBase(base Base) (*os.File, error) {
	f, err := safeopen.OpenRegular(base.Path)
	if err != nil {
		return nil, fmt.Errorf("rootfs: open base: %w", err)
	}
	st, err := f.Stat()
	switch {
	case err != nil:
		err = fmt.Errorf("rootfs: stat base %s: %w", base.Path, err)
	case st.Size() != base.Size:
		err = fmt.Errorf("rootfs: base %s is %d bytes, but the cache recorded %d", base.Path, st.Size(), base.Size)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
