package driver

// Restores and clones: CreateVolume with a content source. The new volume
// gets the source's chain (base and sealed layers) linked into its
// plugin-owned base directory, and its first stage writes a fresh overlay
// over the top layer. Nothing is copied, and later writes on either side
// never show on the other: each side writes its own overlay, and the
// layers they share are sealed.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// sourceOf is the content source a CreateVolume asks for; nil for none.
func sourceOf(cs *csi.VolumeContentSource) (*contentSource, error) {
	switch {
	case cs == nil:
		return nil, nil
	case cs.GetSnapshot() != nil:
		if cs.GetSnapshot().GetSnapshotId() == "" {
			return nil, errors.New("the snapshot content source has no snapshot ID")
		}
		return &contentSource{SnapshotID: cs.GetSnapshot().GetSnapshotId()}, nil
	case cs.GetVolume() != nil:
		if cs.GetVolume().GetVolumeId() == "" {
			return nil, errors.New("the volume content source has no volume ID")
		}
		return &contentSource{VolumeID: cs.GetVolume().GetVolumeId()}, nil
	}
	return nil, errors.New("the content source is neither a snapshot nor a volume")
}

// csiSource is the CSI form of a recorded content source.
func (s *contentSource) csiSource() *csi.VolumeContentSource {
	switch {
	case s == nil:
		return nil
	case s.SnapshotID != "":
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotID}}}
	}
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: s.VolumeID}}}
}

func (s *contentSource) String() string {
	if s.SnapshotID != "" {
		return "snapshot " + s.SnapshotID
	}
	return "volume " + s.VolumeID
}

// sourceChain is the chain a new volume is made from.
type sourceChain struct {
	dir    string // holds the base (rootfs.ext4) and the layers
	layers []string
	// size is the least capacity a volume made from it may have.
	size                  int64
	image, digest, pinned string
	config                source.Config
	fsSize                uint64
}

// resolveSource finds the chain of a snapshot, or captures a volume's
// (freezing its overlay). For a volume, the returned unlock releases the
// source's lock, which is held until its chain is linked.
func (d *Driver) resolveSource(ctx context.Context, name string, src *contentSource, p volumeParams) (*sourceChain, func(), error) {
	nothing := func() {}
	if src.SnapshotID != "" {
		s, err := d.readSnapshot(src.SnapshotID)
		var other *otherNodeError
		if errors.As(err, &other) {
			// external-provisioner reschedules on ResourceExhausted.
			return nil, nothing, status.Errorf(codes.ResourceExhausted, "CreateVolume %q on node %s: %v", name, d.cfg.NodeID, err)
		}
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nothing, status.Errorf(codes.NotFound, "CreateVolume %q: snapshot %s does not exist on node %s (a snapshot lives on its source's node)", name, src.SnapshotID, d.cfg.NodeID)
		}
		if err != nil {
			return nil, nothing, status.Errorf(codes.Internal, "CreateVolume %q: snapshot %s: %v", name, src.SnapshotID, err)
		}
		if s.Image != p.Image {
			return nil, nothing, invalid("CreateVolume %q: snapshot %s was made of image %q, not %q: restore it with a StorageClass of its image", name, s.SnapshotID, s.Image, p.Image)
		}
		return &sourceChain{dir: d.snapshotDir(s.SnapshotID), layers: s.Layers, size: s.SizeBytes,
			image: s.Image, digest: s.Digest, pinned: s.Pinned, config: s.Config, fsSize: s.FilesystemSize}, nothing, nil
	}
	box, err := d.home.Box(src.VolumeID)
	if err != nil {
		return nil, nothing, status.Errorf(codes.NotFound, "CreateVolume %q: source volume %s does not exist: %v", name, src.VolumeID, err)
	}
	unlock, err := d.lock(box.ID(), "CreateVolume (clone source)")
	if err != nil {
		return nil, nothing, err
	}
	r, err := d.readRecord(box)
	if errors.Is(err, fs.ErrNotExist) {
		unlock()
		return nil, nothing, status.Errorf(codes.NotFound, "CreateVolume %q: source volume %s does not exist", name, src.VolumeID)
	}
	if err != nil {
		unlock()
		return nil, nothing, recordStatus(box, err)
	}
	if r.Image != p.Image {
		unlock()
		return nil, nothing, invalid("CreateVolume %q: source volume %s is of image %q, not %q: clone it with a StorageClass of its image", name, src.VolumeID, r.Image, p.Image)
	}
	if _, err := d.captureChain(ctx, box, r); err != nil {
		unlock()
		return nil, nothing, err
	}
	return &sourceChain{dir: d.ownedBaseDir(box.ID()), layers: r.Layers, size: d.volumeDiskSize(r),
		image: r.Image, digest: r.Digest, pinned: r.Pinned, config: r.Config, fsSize: r.FilesystemSize}, unlock, nil
}

// createFromSource makes a new volume from a content source: the chain is
// linked into its plugin-owned base directory (durably) before its record
// is written, so a volume whose record exists has its whole chain, and a
// crash before the record leaves an owned directory that start-up removes.
func (d *Driver) createFromSource(ctx context.Context, box layout.Box, r *volumeRecord, capacityAsked bool, p volumeParams) error {
	c, unlock, err := d.resolveSource(ctx, r.Name, r.Source, p)
	if err != nil {
		return err
	}
	defer unlock()
	switch {
	case !capacityAsked:
		r.Capacity = c.size
	case r.Capacity < c.size:
		return status.Errorf(codes.OutOfRange, "CreateVolume %q: %s holds a disk of %d bytes, larger than the %d bytes asked for", r.Name, r.Source, c.size, r.Capacity)
	}
	r.Image, r.Digest, r.Pinned, r.Config, r.FilesystemSize = c.image, c.digest, c.pinned, c.config, c.fsSize
	r.Layers = append([]string(nil), c.layers...)
	dir := d.ownedBaseDir(box.ID())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	from, err := safeopen.OpenRoot(c.dir)
	if err != nil {
		return fmt.Errorf("CreateVolume %q: open the chain of %s: %w", r.Name, r.Source, err)
	}
	defer from.Close()
	to, err := safeopen.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer to.Close()
	if err := linkChain(from, to, r.Layers); err != nil {
		if errors.Is(err, sealed.ErrWriter) || errors.Is(err, sealed.ErrWriterDuringWindow) {
			return status.Errorf(codes.FailedPrecondition, "CreateVolume %q: link the chain of %s: %v; a process holds one of its layers open for writing, or tried to open it", r.Name, r.Source, err)
		}
		return fmt.Errorf("CreateVolume %q: link the chain of %s: %w", r.Name, r.Source, err)
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return d.createReserved(box, r, atController)
}
