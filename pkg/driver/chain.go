package driver

// A volume's disk is a chain: its overlay, over the frozen layers its
// record lists, over the base. Snapshots, restores and clones share
// layers by hard link, as boxes share bases:
//
//	<box>/disks/guest-rootfs.qcow2   the volume's own overlay, over
//	<box>/base/ly-<hex>.qcow2        its frozen layers, newest first, over
//	<box>/base/rootfs.ext4           the base.
//
// Every header names its backing as "../base/<name>", which resolves to
// base/<name> from disks/ and from base/ alike, so the chain resolves
// inside any view of the box. The plugin-owned copy of base/
// (<home>/volumes/<id>.base/) holds the same links and is what is mounted
// read-only over base/; it is the truth, and the box's own links are
// brought in line with it at every stage. Layers are sealed (immutable,
// internal/sealed) from the moment they freeze.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

const (
	layerPrefix = "ly-"
	layerSuffix = ".qcow2"
	// maxLayers bounds the frozen layers under a volume's overlay, so that
	// the chain a runtime opens (overlay and layers) is at most
	// qcow2.MaxChainDepth qcow2 images.
	maxLayers = qcow2.MaxChainDepth - 1
)

// newLayerName is a fresh, unguessable layer file name.
func newLayerName() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return layerPrefix + hex.EncodeToString(b[:]) + layerSuffix, nil
}

// isLayerName reports whether s is a name newLayerName makes.
func isLayerName(s string) bool {
	h, ok := strings.CutPrefix(s, layerPrefix)
	if !ok {
		return false
	}
	h, ok = strings.CutSuffix(h, layerSuffix)
	return ok && len(h) == 32 && isLowerHex(h)
}

func isLowerHex(s string) bool {
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// checkLayers validates a list of layer names read from a record.
func checkLayers(layers []string, where string) error {
	if len(layers) > maxLayers {
		return fmt.Errorf("%s lists %d layers, more than %d", where, len(layers), maxLayers)
	}
	seen := map[string]bool{}
	for _, l := range layers {
		if !isLayerName(l) || seen[l] {
			return fmt.Errorf("%s lists a layer %q that is not a valid or unique layer name", where, l)
		}
		seen[l] = true
	}
	return nil
}

// top is the layer the volume's overlay is written over; "" for the base.
func (r *volumeRecord) top() string {
	if len(r.Layers) == 0 {
		return ""
	}
	return r.Layers[len(r.Layers)-1]
}

// boxOf is box as the volume's chain makes it: its overlay written over
// its top layer, if it has one.
func (r *volumeRecord) boxOf(box layout.Box) layout.Box { return box.WithTop(r.top()) }

// chainNames is what base/ must hold for a chain of layers: the base and
// the layers, bottom first.
func chainNames(layers []string) []string { return append([]string{baseName}, layers...) }

// expectLayer is what the header of layers[i] must say: the layer under
// it, or the base.
func expectLayer(layers []string, i int) qcow2.Expect {
	if i == 0 {
		return qcow2.Expect{BackingFile: filepath.Join("..", "base", baseName), BackingFormat: qcow2.FormatRaw}
	}
	return qcow2.Expect{BackingFile: filepath.Join("..", "base", layers[i-1]), BackingFormat: qcow2.FormatQcow2}
}

// homeView is the home as a mount clone without its submounts
// (open_tree without AT_RECURSIVE): through it the plugin reaches what a
// box holds underneath the read-only mounts over its base/ and box.json,
// and can link between the box and the plugin-owned files, which
// linkat(2) allows only within one mount. The clone is detached and goes
// when it is closed.
func (d *Driver) homeView() (*safeopen.Root, error) {
	fd, err := unix.Open(d.home.Dir(), unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: d.home.Dir(), Err: err}
	}
	defer unix.Close(fd)
	tree, err := unix.OpenTree(fd, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return nil, fmt.Errorf("open_tree %s: %w", d.home.Dir(), err)
	}
	return safeopen.NewRoot(os.NewFile(uintptr(tree), d.home.Dir())), nil
}

// chainView is the box root and the plugin-owned base directory of a
// volume, both inside one homeView. The owned directory is created if
// missing.
type chainView struct {
	home, box, owned *safeopen.Root
}

func (v *chainView) Close() {
	for _, r := range []*safeopen.Root{v.owned, v.box, v.home} {
		if r != nil {
			r.Close()
		}
	}
}

func (d *Driver) openChainView(box layout.Box) (*chainView, error) {
	home, err := d.homeView()
	if err != nil {
		return nil, err
	}
	v := &chainView{home: home}
	rel := func(p string) string { r, _ := filepath.Rel(d.home.Dir(), p); return r }
	if v.box, err = home.OpenRoot(rel(box.Root())); err != nil {
		v.Close()
		return nil, fmt.Errorf("volume %s: %w", box.ID(), err)
	}
	ownedRel := rel(d.ownedBaseDir(box.ID()))
	if err := unix.Mkdirat(home.FD(), ownedRel, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		v.Close()
		return nil, fmt.Errorf("create %s: %w", d.ownedBaseDir(box.ID()), err)
	}
	if v.owned, err = home.OpenRoot(ownedRel); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

// settleFreeze finishes a freeze a crash interrupted (rootfs.SettleFreeze)
// and records the outcome. It returns the box as its chain now is.
func (d *Driver) settleFreeze(ctx context.Context, box layout.Box, r *volumeRecord) (layout.Box, error) {
	if r.Freezing == "" {
		return r.boxOf(box), nil
	}
	v, err := d.openChainView(box)
	if err != nil {
		return box, err
	}
	defer v.Close()
	committed, err := rootfs.SettleFreeze(ctx, v.box, r.boxOf(box), r.Freezing, v.owned)
	if err != nil {
		return box, status.Errorf(codes.FailedPrecondition, "volume %s: a snapshot of it was interrupted and cannot be settled: %v", box.ID(), err)
	}
	if committed {
		r.Layers = append(r.Layers, r.Freezing)
	}
	r.Freezing = ""
	if err := d.writeRecord(r); err != nil {
		return box, err
	}
	return r.boxOf(box), nil
}

// captureChain makes the volume's disk as it is now a chain of sealed
// layers in its plugin-owned base directory, for a snapshot or a clone to
// link: the overlay is frozen into a new layer (unless it maps nothing),
// and a volume never staged gets its base linked there from the cache.
// It returns the box as its chain now is. The caller holds the volume's
// lock.
func (d *Driver) captureChain(ctx context.Context, box layout.Box, r *volumeRecord) (layout.Box, error) {
	box, err := d.settleFreeze(ctx, box, r)
	if err != nil {
		return box, err
	}
	v, err := d.openChainView(box)
	if err != nil {
		return box, err
	}
	defer v.Close()
	if _, err := v.box.Lstat(relIn(box, box.GuestRootfsDiskPath())); err == nil {
		if box, err = d.freeze(ctx, v, box, r); err != nil {
			return box, err
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return box, status.Errorf(codes.FailedPrecondition, "volume %s: cannot look at its overlay: %v", box.ID(), err)
	}
	if _, err := v.owned.Lstat(baseName); errors.Is(err, fs.ErrNotExist) {
		// Never staged, so never linked: the base comes from the cache,
		// built if need be, like the first stage's.
		params, err := parseParams(r.Params)
		if err != nil {
			return box, fmt.Errorf("volume %s: recorded parameters: %w", box.ID(), err)
		}
		b, err := d.ensureBase(ctx, r, params, nil)
		if err != nil {
			return box, err
		}
		// Linked within the clone, as links cannot cross mounts.
		rel, err := filepath.Rel(d.home.Dir(), b.Path)
		if err != nil {
			return box, err
		}
		f, err := v.home.OpenFile(rel, unix.O_RDONLY)
		if err != nil {
			return box, fmt.Errorf("volume %s: open its base: %w", box.ID(), err)
		}
		err = unix.Linkat(int(f.Fd()), "", v.owned.FD(), baseName, unix.AT_EMPTY_PATH)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return box, fmt.Errorf("volume %s: link its base %s: %w", box.ID(), b.Path, err)
		}
	} else if err != nil {
		return box, err
	}
	if err := d.checkChain(box, v.owned, r.Layers); err != nil {
		return box, err
	}
	return box, nil
}

// freeze freezes the volume's overlay into a new layer and records it.
func (d *Driver) freeze(ctx context.Context, v *chainView, box layout.Box, r *volumeRecord) (layout.Box, error) {
	layer, err := newLayerName()
	if err != nil {
		return box, err
	}
	if err := sealed.Probe(d.recordsDir()); err != nil {
		return box, freezeStatus(box, err)
	}
	if len(r.Layers) >= maxLayers {
		return box, status.Errorf(codes.FailedPrecondition, "volume %s already has %d frozen layers, the most a chain may have; flattening is not available yet, so restore a snapshot of it or clone it into a new volume first", box.ID(), len(r.Layers))
	}
	fr, err := rootfs.FreezeBox(ctx, v.box, box, rootfs.FreezeOptions{
		Layer: layer,
		Also:  []*safeopen.Root{v.owned},
		BeforeCommit: func() error {
			r.Freezing = layer
			return d.writeRecord(r)
		},
	})
	if err != nil {
		if r.Freezing != "" {
			if _, serr := d.settleFreeze(ctx, box, r); serr != nil {
				klog.FromContext(ctx).Error(serr, "Settling a failed freeze", "volume", box.ID())
			}
		}
		return r.boxOf(box), freezeStatus(box, err)
	}
	if fr.Empty {
		return box, nil
	}
	r.Layers, r.Freezing = append(r.Layers, layer), ""
	if err := d.writeRecord(r); err != nil {
		return box, err
	}
	return r.boxOf(box), nil
}

// freezeStatus turns a FreezeBox error into the status the CO shows.
func freezeStatus(box layout.Box, err error) error {
	switch {
	case errors.Is(err, rootfs.ErrOverlayInUse):
		return status.Errorf(codes.FailedPrecondition, "volume %s: %v; stop the VM using it (delete its pod) and try again: a disk is frozen only when nothing writes it", box.ID(), err)
	case errors.Is(err, sealed.ErrWriter), errors.Is(err, sealed.ErrWriterDuringWindow):
		return status.Errorf(codes.FailedPrecondition, "volume %s: %v: a process holds one of its layers open for writing, or tried to open it; stop it and try again", box.ID(), err)
	case errors.Is(err, sealed.ErrUnsupported):
		return status.Errorf(codes.FailedPrecondition, "volume %s: %v: snapshots need a home filesystem that enforces the immutable attribute on open descriptors (ext4)", box.ID(), err)
	case errors.Is(err, rootfs.ErrRefusedOverlay):
		return status.Errorf(codes.FailedPrecondition, "volume %s: %v", box.ID(), err)
	}
	return toStatus(fmt.Errorf("volume %s: %w", box.ID(), err), atController)
}

// checkChain verifies every layer of a chain in dir: a regular file whose
// header names the layer under it (or the base) and nothing else, and
// sealed, which it is made if a crash came between a freeze and its seal.
// Layers were written by guests, so this is the tamper check for every
// link of the chain, not just the overlay on top.
func (d *Driver) checkChain(box layout.Box, dir *safeopen.Root, layers []string) error {
	for i, l := range layers {
		f, err := dir.OpenFile(l, unix.O_RDONLY)
		if err != nil {
			return status.Errorf(codes.FailedPrecondition, "volume %s: its layer %s: %v", box.ID(), filepath.Join(dir.Name(), l), err)
		}
		_, err = qcow2.VerifyFile(f, expectLayer(layers, i))
		if err == nil {
			err = sealed.Seal(f)
		}
		f.Close()
		if err != nil {
			return status.Errorf(codes.FailedPrecondition, "volume %s: its layer %s: %v", box.ID(), filepath.Join(dir.Name(), l), err)
		}
	}
	return nil
}

// linkChain links the chain's files (base and layers) from the directory
// from into to, replacing a different file at a name (to is the plugin's
// own, or the box's base/ reached under its mount, which no pod uses
// while this runs).
func linkChain(from, to *safeopen.Root, layers []string) error {
	for _, name := range chainNames(layers) {
		f, err := from.OpenFile(name, unix.O_RDONLY)
		if err != nil {
			return err
		}
		err = linkReplacing(f, to, name)
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// linkReplacing links the open file f as dir/name, unless the name holds
// it already; anything else there is removed first.
func linkReplacing(f *os.File, dir *safeopen.Root, name string) error {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return err
	}
	err := unix.Fstatat(dir.FD(), name, &b, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case err == nil && a.Dev == b.Dev && a.Ino == b.Ino:
		return nil
	case err == nil:
		if b.Mode&unix.S_IFMT == unix.S_IFDIR {
			if err := unix.Unlinkat(dir.FD(), name, unix.AT_REMOVEDIR); err != nil {
				return fmt.Errorf("remove %s: %w", filepath.Join(dir.Name(), name), err)
			}
		} else if err := sealed.Unlink(dir.Dir(), name); err != nil {
			return err
		}
	case !errors.Is(err, unix.ENOENT):
		return fmt.Errorf("stat %s: %w", filepath.Join(dir.Name(), name), err)
	}
	return sealed.LinkFile(f, sealed.Dest{Dir: dir.Dir(), Name: name})
}

// ensureBoxChain brings the box's own base/ (underneath the read-only
// mount over it) in line with the plugin-owned chain, and checks the
// chain, before a layered volume is staged. A box stays self-contained:
// its chain resolves with no mounts at all, after a reboot.
func (d *Driver) ensureBoxChain(box layout.Box, r *volumeRecord) error {
	v, err := d.openChainView(box)
	if err != nil {
		return err
	}
	defer v.Close()
	if err := d.checkChain(box, v.owned, r.Layers); err != nil {
		return err
	}
	if err := unix.Mkdirat(v.box.FD(), "base", 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("create %s: %w", box.BaseDir(), err)
	}
	base, err := v.box.OpenRoot("base")
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "volume %s: %s is not a directory: %v", box.ID(), box.BaseDir(), err)
	}
	defer base.Close()
	if err := linkChain(v.owned, base, r.Layers); err != nil {
		return fmt.Errorf("volume %s: link its chain into %s: %w", box.ID(), box.BaseDir(), err)
	}
	return nil
}
