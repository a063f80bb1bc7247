package driver

// The volume record is the plugin's own account of a volume: what it is
// (image, digest, what was pinned, parameters, capacity, ephemeral or
// not). It lives in <home>/volumes/<id>.json, outside every box, because
// a box is published read-write to its pod: anything the plugin read back
// from inside the box would be whatever the pod wrote there. box.json in
// the box is a copy of the record for the runtime; it is written by the
// plugin and never read back as truth.
//
// A volume exists when both its record and its box exist. CreateVolume
// writes the record durably first and creates the box second; deleting
// renames the box aside first and removes the record second. So after a
// crash, a record without a box is a create or a delete that did not
// finish, which the CO's retry of that call completes. A box without a
// record is a box made by an earlier release, which start-up adopts.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

const (
	recordsDirName = "volumes"
	recordVersion  = 1
	// maxRecordBytes bounds a record. The plugin writes records itself;
	// the bound is there so that a damaged file cannot exhaust memory.
	maxRecordBytes = 1 << 20
)

// volumeRecord is <home>/volumes/<id>.json.
type volumeRecord struct {
	Version  int    `json:"version"`
	VolumeID string `json:"volumeID"`
	// Name is the CreateVolume name; empty for inline ephemeral volumes.
	Name      string            `json:"name,omitempty"`
	Ephemeral bool              `json:"ephemeral,omitempty"`
	Params    map[string]string `json:"parameters"`
	Capacity  int64             `json:"capacityBytes"`

	Image  string `json:"image"`
	Digest string `json:"digest"`
	Pinned string `json:"pinned"`
	source.Config

	// ExpandedBytes is the disk size the latest NodeExpandVolume asked
	// for; 0 if none did. Capacity stays what CreateVolume asked for, so a
	// repeated CreateVolume still matches. The disk grows to it at once,
	// or, when a VM held the overlay open, at the next NodeStage.
	ExpandedBytes int64 `json:"expandedBytes,omitempty"`

	// FilesystemSize is the size in bytes of the ext4 filesystem the
	// box's overlay was made with, when it was grown past the base's: it
	// is recorded before the overlay is written. 0 means the base's size:
	// a disk no larger than the base, a base that cannot be grown, a box
	// staged by an earlier release, or one never staged. A guest may grow
	// its filesystem later into a disk that NodeExpandVolume enlarged;
	// the plugin never reads the guest's filesystem to learn that, so this
	// stays the size it was made with. box.json always says the size.
	FilesystemSize uint64 `json:"filesystemSize,omitempty"`

	// BaseInode is the inode of the base the box's overlay was created
	// over, as an earlier release recorded it at unstage. This release
	// never sets it (the plugin-owned base link says the same); it reads
	// it to adopt such a box's base when the cache's copy is gone, and
	// clears it when a new overlay is made over another base.
	BaseInode uint64 `json:"baseInode,omitempty"`

	// Layers are the sealed layers under the box's overlay, bottom first
	// (chain.go): file names in base/ and in its plugin-owned copy. Empty
	// for a volume never snapshotted, restored or cloned.
	Layers []string `json:"layers,omitempty"`
	// Freezing is the layer a freeze of the overlay was making when it
	// recorded its intent; "" once the freeze is settled (settleFreeze).
	Freezing string `json:"freezing,omitempty"`
	// Source is what the volume was made from, if anything.
	Source *contentSource `json:"contentSource,omitempty"`
}

// contentSource is a volume's CSI content source: a snapshot or a volume.
type contentSource struct {
	SnapshotID string `json:"snapshotID,omitempty"`
	VolumeID   string `json:"volumeID,omitempty"`
}

// recordsDir is where volume records live: in the home, which no pod sees.
func (d *Driver) recordsDir() string { return filepath.Join(d.home.Dir(), recordsDirName) }

// recordID is the volume whose record a file in the records directory is
// named for; false for the plugin-owned files beside the records and for
// temporary (dot) files.
func recordID(name string) (string, bool) {
	if _, owned := ownedID(name); owned || strings.HasPrefix(name, ".") {
		return "", false
	}
	return strings.CutSuffix(name, ".json")
}

func (d *Driver) recordPath(id string) string {
	return filepath.Join(d.recordsDir(), id+".json")
}

// parseRecord decodes a record and checks that it is one this release
// understands and that it belongs to volume id.
func parseRecord(b []byte, id, where string) (*volumeRecord, error) {
	var r volumeRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("parse %s: %w", where, err)
	}
	switch {
	case r.Version < 1:
		return nil, fmt.Errorf("%s has no valid version (%d)", where, r.Version)
	case r.Version > recordVersion:
		return nil, fmt.Errorf("%s has version %d, newer than this release understands (%d); it was written by a later release, so upgrade the plugin again", where, r.Version, recordVersion)
	case r.VolumeID != id:
		return nil, fmt.Errorf("%s belongs to volume %q, not %q", where, r.VolumeID, id)
	case r.Freezing != "" && !isLayerName(r.Freezing):
		return nil, fmt.Errorf("%s has an invalid freezing layer %q", where, r.Freezing)
	}
	all := r.Layers
	if r.Freezing != "" {
		all = append(slices.Clone(r.Layers), r.Freezing)
	}
	if err := checkLayers(all, where); err != nil {
		return nil, err
	}
	return &r, nil
}

// readRecord reads the record of the volume whose box is box. It wraps
// fs.ErrNotExist when the volume does not exist: no record, or a record
// whose box is missing (a create or delete that did not finish).
func (d *Driver) readRecord(box layout.Box) (*volumeRecord, error) {
	r, err := d.readRecordOnly(box.ID())
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Lstat(box.Root(), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("volume %s has a record but no box at %s: %w", box.ID(), box.Root(), fs.ErrNotExist)
	}
	return r, nil
}

// readRecordOnly reads a record whether or not its box exists.
func (d *Driver) readRecordOnly(id string) (*volumeRecord, error) {
	p := d.recordPath(id)
	b, err := safeopen.ReadRegular(p, maxRecordBytes)
	if err != nil {
		return nil, err
	}
	return parseRecord(b, id, p)
}

// writeRecord replaces a volume's record atomically and durably: after a
// crash it is the old or the new version, and once it returns the new
// version survives a power cut.
func (d *Driver) writeRecord(r *volumeRecord) error { return d.putRecord(r, durable) }

// writeRecordOrdered replaces a volume's record atomically but leaves its
// commit to the next journal commit of the home filesystem, which the
// caller's own fsync makes soon after. Its data is written out first
// (sync_file_range), so no commit can publish the new name over unwritten
// data: after a crash the record is the old or the new version. NodeStage
// uses it for the filesystem size of a fresh overlay, whose own fsync
// follows; where that commit might not carry the rename (ext4's
// fast_commit), what a crash can lose is a grown filesystem's size, and
// box.json then says the base's, smaller than the truth: a runtime that
// grows the filesystem to the disk finds nothing to do. Two commits fewer
// per stage (2.3 ms on the benchmark disk) are worth that.
func (d *Driver) writeRecordOrdered(r *volumeRecord) error { return d.putRecord(r, ordered) }

func (d *Driver) putRecord(r *volumeRecord, how durability) error {
	r.Version = recordVersion
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	dir := d.recordsDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := replaceFile(dir, r.VolumeID+".json", append(b, '\n'), 0o600, how); err != nil {
		return fmt.Errorf("write the record of volume %s: %w", r.VolumeID, err)
	}
	return nil
}

// removeRecord deletes a volume's record durably; a missing one is fine.
func (d *Driver) removeRecord(id string) error {
	p := d.recordPath(id)
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove %s: %w", p, err)
	}
	return syncDir(d.recordsDir())
}

// adoptBox writes the record of a box made by an earlier release, which
// kept its record only in box.json. This is the one time box.json is read
// as truth, as that release always did; from then on the record is the
// plugin's own. It returns the record.
func (d *Driver) adoptBox(box layout.Box) (*volumeRecord, error) {
	root, err := safeopen.OpenRoot(box.Root())
	if err != nil {
		return nil, err
	}
	defer root.Close()
	b, err := root.ReadFile(manifestName, maxRecordBytes)
	if err != nil {
		return nil, err
	}
	r, err := parseRecord(b, box.ID(), box.ManifestPath())
	if err != nil {
		return nil, err
	}
	if err := d.writeRecord(r); err != nil {
		return nil, err
	}
	return r, nil
}
