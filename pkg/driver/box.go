package driver

// Box lifecycle: a box is created whole with its box.json, staged
// (overlay ready, base mounted read-only in place), released when nothing
// shows it any more, and deleted. Every RPC that touches a box goes
// through these functions, so each step has one implementation.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

const (
	manifestName    = "box.json"
	manifestVersion = 1
)

// volumeIDForName derives the volume ID from the CreateVolume name, so a
// retried CreateVolume finds its box by a stat, with no index to keep.
func volumeIDForName(name string) string {
	sum := sha256.Sum256([]byte(name))
	return "bx-" + hex.EncodeToString(sum[:20])
}

// boxManifest is <box>/box.json, the runtime's manifest of the box: the
// volume record, plus what the runtime needs to boot it (virtual size and
// backing of the overlay). The plugin writes it and never reads it back.
// A virtualSize larger than the record's filesystemSize says the disk was
// expanded after the filesystem was made: the guest grows it online.
type boxManifest struct {
	volumeRecord
	VirtualSize uint64 `json:"virtualSize,omitempty"`
	Backing     string `json:"backing,omitempty"`
}

// sameVolume reports whether a repeated CreateVolume asks for the volume
// this record describes.
func (r *volumeRecord) sameVolume(name string, params map[string]string, capacity int64, src *contentSource) bool {
	if (r.Source == nil) != (src == nil) || (src != nil && *r.Source != *src) {
		return false
	}
	// A restore asked for no capacity gets its source's: any recorded
	// capacity matches none asked.
	return r.Name == name && maps.Equal(r.Params, params) && (r.Capacity == capacity || (src != nil && capacity == 0))
}

// encodeManifest is the content of box.json.
func encodeManifest(m *boxManifest) ([]byte, error) {
	c := *m
	c.Version = manifestVersion
	// Which inode the base is, is the plugin's business, not the runtime's.
	c.BaseInode = 0
	b, err := json.MarshalIndent(&c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// writeManifest replaces dir/name with the manifest b atomically: after
// a crash it is the old or the new version, or, for a name that did not
// exist, possibly empty. The plugin never reads a manifest back, and
// NodeStage rewrites both copies whenever they differ from the record, so
// neither is made durable on the stage path. With flush set, the data is
// written out with sync_file_range before the rename, so no journal
// commit can publish the name over unwritten data: createBox uses it,
// because it makes a new box durable with one fsync of boxes/, whose
// commit carries the manifest, its directory and the rename together, and
// an earlier release after a rollback reads that manifest as its truth.
func writeManifest(dir, name string, b []byte, flush bool) error {
	how := atomicOnly
	if flush {
		how = ordered
	}
	return replaceFile(dir, name, b, 0o644, how)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// createVolume makes a new volume: its record first, durably, then its
// box. A retry after a crash between the two finds the record and
// creates the box.
func (d *Driver) createVolume(box layout.Box, r *volumeRecord) error {
	if err := d.writeRecord(r); err != nil {
		return err
	}
	return createBox(d.home, box, &boxManifest{volumeRecord: *r})
}

// createBox makes the box directory with its manifest in one rename, so a
// box either exists complete or not at all. The staging directory has a
// dot-name, which recovery removes after a crash.
func createBox(home layout.Home, box layout.Box, m *boxManifest) error {
	tmp, err := os.MkdirTemp(home.BoxesDir(), "."+box.ID()+".new-")
	if err != nil {
		return fmt.Errorf("create box %s: %w", box.Root(), err)
	}
	defer os.RemoveAll(tmp)
	mb, err := encodeManifest(m)
	if err != nil {
		return err
	}
	if err := writeManifest(tmp, manifestName, mb, true); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := os.Rename(tmp, box.Root()); err != nil {
		if errors.Is(err, fs.ErrExist) || errors.Is(err, syscall.ENOTEMPTY) {
			return fmt.Errorf("create box %s: %w", box.Root(), fs.ErrExist)
		}
		return fmt.Errorf("create box %s: %w", box.Root(), err)
	}
	return syncDir(home.BoxesDir())
}

// ensureEphemeralBox does CreateVolume's work for an inline ephemeral
// volume, whose image comes in the volume attributes: it returns the
// volume's record, creating the volume on the first publish.
func (d *Driver) ensureEphemeralBox(ctx context.Context, box layout.Box, attrs, secrets map[string]string) (*volumeRecord, error) {
	params, err := parseParams(attrs)
	if err != nil {
		return nil, fmt.Errorf("inline volume %s: %w", box.ID(), err)
	}
	if err := d.checkInline(params); err != nil {
		return nil, err
	}
	r, err := d.readRecordOnly(box.ID())
	switch {
	case err == nil:
		if !r.Ephemeral || r.Image != params.Image {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s exists for image %q (ephemeral %v), not inline image %q", box.ID(), r.Image, r.Ephemeral, params.Image)
		}
		if err := createBox(d.home, box, &boxManifest{volumeRecord: *r}); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
		return r, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, recordStatus(box, err)
	}
	if r, err = d.newRecord(ctx, box.ID(), params, attrs, secrets, true); err != nil {
		return nil, fmt.Errorf("inline volume %s: %w", box.ID(), err)
	}
	r.Ephemeral = true
	if err := d.createReserved(box, r, atNode); err != nil {
		return nil, err
	}
	return r, nil
}

// stageBox makes the box ready to boot: the overlay created or reused by
// the seed rules, the base bind-mounted read-only in place, and box.json
// complete.
func (d *Driver) stageBox(ctx context.Context, box layout.Box, r *volumeRecord, secrets map[string]string) (rootfs.BoxDisk, error) {
	params, err := parseParams(r.Params)
	if err != nil {
		return rootfs.BoxDisk{}, fmt.Errorf("volume %s: recorded parameters: %w", box.ID(), err)
	}
	if box, err = d.settleFreeze(ctx, box, r); err != nil {
		return rootfs.BoxDisk{}, err
	}
	layered := len(r.Layers) > 0
	if layered {
		// The plugin-owned chain is the truth; the box's own base/ gets
		// its links, and every layer is checked, before anything in the
		// box is used.
		if err := d.ensureBoxChain(box, r); err != nil {
			return rootfs.BoxDisk{}, err
		}
	}
	// The overlay metric leaves out the wait for the base, which has
	// metrics of its own, so that it shows the cost of the overlay alone.
	var baseWait time.Duration
	start := time.Now()
	// A persistent volume's corrupt overlay is the user's data: it is kept
	// and refused, naming the repair. An ephemeral volume's holds nothing
	// anyone keeps, so it is set aside and a fresh one made.
	opts := rootfs.PrepareOptions{Corrupt: rootfs.KeepCorrupt, BeforeCreate: func(_ context.Context, p rootfs.DiskPlan) error {
		// A grown filesystem's size is recorded before the overlay exists,
		// and committed by the overlay's own fsync (writeRecordOrdered). An ungrown one is the base's size, which the record says
		// with 0 (as for a box of an earlier release), so a disk of the
		// base's size costs no record write.
		want := uint64(0)
		if len(p.Writes) > 0 {
			want = p.FilesystemSize
		}
		if r.FilesystemSize == want {
			return nil
		}
		r.FilesystemSize = want
		return d.writeRecordOrdered(r)
	}}
	if r.Ephemeral {
		opts.Corrupt = rootfs.SetAsideCorrupt
	}
	disk, err := rootfs.PrepareBoxWith(ctx, box, func(ctx context.Context) (rootfs.Base, error) {
		t := time.Now()
		defer func() { baseWait += time.Since(t) }()
		return d.ensureBase(ctx, r, params, secrets)
	}, uint64(max(r.Capacity, r.ExpandedBytes, 0)), opts)
	if err != nil {
		return disk, err
	}
	if disk.Outcome == rootfs.Reused {
		d.applyPendingExpansion(ctx, box, r, &disk)
	}
	if disk.SetAside != "" {
		klog.FromContext(ctx).Info("Set a corrupt overlay aside and made a fresh one", "volume", box.ID(), "setAside", disk.SetAside)
	}
	if disk.Outcome != rootfs.Reused {
		d.cfg.Metrics.ObserveOverlay(string(disk.Outcome), time.Since(start)-baseWait)
		// A new overlay was written over the base just linked from the
		// cache: that base, checked against the cache, is the box's now,
		// and an inode an earlier release recorded no longer applies.
		if r.BaseInode != 0 {
			r.BaseInode = 0
			if err := d.writeRecord(r); err != nil {
				return disk, err
			}
		}
	}
	if !layered {
		if err := d.ensureOwnedBase(box, r, disk.Outcome != rootfs.Reused); err != nil {
			return disk, fmt.Errorf("volume %s: %w", box.ID(), err)
		}
	}
	root, err := safeopen.OpenRoot(box.Root())
	if err != nil {
		return disk, err
	}
	defer root.Close()
	if err := d.mountOwnedBase(root, box); err != nil {
		return disk, err
	}
	if err := d.refreshManifest(root, box, d.manifestFor(box, r, disk.VirtualSize)); err != nil {
		return disk, err
	}
	return disk, nil
}

// manifestFor is the box.json of a staged box whose disk is virtualSize
// bytes.
func (d *Driver) manifestFor(box layout.Box, r *volumeRecord, virtualSize uint64) *boxManifest {
	m := &boxManifest{volumeRecord: *r, VirtualSize: virtualSize, Backing: box.BackingName()}
	if m.FilesystemSize == 0 {
		// Not grown: the filesystem is the base's, whose size the
		// plugin-owned link gives.
		if st, err := os.Stat(filepath.Join(d.ownedBaseDir(box.ID()), baseName)); err == nil {
			m.FilesystemSize = uint64(st.Size())
		}
	}
	return m
}

// releaseBase drops the box's read-only base mount once nothing outside
// the box shows it, so that an unstaged volume leaves no mounts behind.
func (d *Driver) releaseBase(ctx context.Context, box layout.Box) error {
	if _, err := os.Stat(box.Root()); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	mounts, err := readBoxMounts(box)
	if err != nil {
		return err
	}
	if len(mounts.outside) > 0 {
		return nil
	}
	return unmountInside(box.Root())
}

// deleteBox removes a box that nothing mounts any more. Its base link goes
// with it, which is what makes the base eligible for eviction.
func (d *Driver) deleteBox(ctx context.Context, box layout.Box) error {
	if err := unix.Lstat(box.Root(), new(unix.Stat_t)); errors.Is(err, unix.ENOENT) {
		// Gone already, or a delete that did not finish: what it set
		// aside goes now, and then the record. Success means gone.
		if err := removeDoomed(d.home, box); err != nil {
			return err
		}
		if err := d.removeOwned(box.ID()); err != nil {
			return err
		}
		return d.removeRecord(box.ID())
	}
	mounts, err := readBoxMounts(box)
	if err != nil {
		return fmt.Errorf("volume %s: %w", box.ID(), err)
	}
	if len(mounts.outside) > 0 {
		return status.Errorf(codes.FailedPrecondition, "volume %s is still mounted at %v", box.ID(), mounts.outside)
	}
	if err := unmountInside(box.Root()); err != nil {
		return fmt.Errorf("volume %s: %w", box.ID(), err)
	}
	if err := removeBox(d.home, box); err != nil {
		return err
	}
	if err := d.removeOwned(box.ID()); err != nil {
		return err
	}
	if err := d.removeRecord(box.ID()); err != nil {
		return err
	}
	klog.FromContext(ctx).Info("Deleted volume", "volume", box.ID())
	return nil
}

// removeBox deletes a box directory that has no mounts left. It is first
// renamed to a dot-name, so that a crash halfway leaves something recovery
// removes, rather than a half-deleted box that still looks like a volume.
func removeBox(home layout.Home, box layout.Box) error {
	// Debris of an earlier interrupted delete would block the rename.
	if err := removeDoomed(home, box); err != nil {
		return err
	}
	doomed := doomedPath(home, box)
	if err := os.Rename(box.Root(), doomed); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove box %s: %w", box.Root(), err)
	}
	if err := syncDir(home.BoxesDir()); err != nil {
		return err
	}
	// The caller unmounted everything inside the box before the rename,
	// and a pod cannot mount, so no second look at the mount table.
	if err := sealed.RemoveAll(doomed); err != nil {
		return fmt.Errorf("remove box %s: %w", doomed, err)
	}
	return nil
}

// doomedPath is where a box is set aside while it is deleted.
func doomedPath(home layout.Home, box layout.Box) string {
	return filepath.Join(home.BoxesDir(), "."+box.ID()+".deleting")
}

// removeDoomed removes a box set aside for deletion, with whatever is
// still mounted inside it.
func removeDoomed(home layout.Home, box layout.Box) error {
	doomed := doomedPath(home, box)
	if _, err := os.Lstat(doomed); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := unmountInside(doomed); err != nil {
		return fmt.Errorf("remove box %s: %w", doomed, err)
	}
	if err := sealed.RemoveAll(doomed); err != nil {
		return fmt.Errorf("remove box %s: %w", doomed, err)
	}
	return nil
}
