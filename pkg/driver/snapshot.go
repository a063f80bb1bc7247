package driver

// A snapshot is a directory of links in the home, which no pod sees:
//
//	<home>/snapshots/<id>/snapshot.json   what it is (snapshotRecord)
//	<home>/snapshots/<id>/rootfs.ext4     the base
//	<home>/snapshots/<id>/ly-<hex>.qcow2  the sealed layers, bottom first
//
// It holds the guest disk, the chain of the volume's overlay at the time
// it was taken, and nothing else of the box: pid files, logs, sockets and
// tmp are the runtime's scratch, and a restored sandbox must not find a
// stale pid file. The links keep the base and the layers alive while the
// snapshot exists, whatever happens to its volume; once the last link of
// a layer goes, the filesystem frees it. A snapshot is made whole under a
// dot-name and renamed into place, so after a crash it exists complete or
// not at all.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/internal/sealed"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

const (
	snapshotsDirName   = "snapshots"
	snapshotRecordName = "snapshot.json"
	snapshotVersion    = 1
	snapshotPrefix     = "sn-"
)

// snapshotRecord is <home>/snapshots/<id>/snapshot.json.
type snapshotRecord struct {
	Version    int       `json:"version"`
	SnapshotID string    `json:"snapshotID"`
	Name       string    `json:"name"`
	SourceID   string    `json:"sourceVolumeID"`
	CreatedAt  time.Time `json:"createdAt"`
	// SizeBytes is the source's capacity (its disk size, if it was
	// expanded): a volume restored from the snapshot is at least as large.
	SizeBytes int64 `json:"sizeBytes"`

	Image  string `json:"image"`
	Digest string `json:"digest"`
	Pinned string `json:"pinned"`
	source.Config
	// FilesystemSize is the source's record's, as it was made.
	FilesystemSize uint64 `json:"filesystemSize,omitempty"`
	// Layers are the sealed layers, bottom first, as in a volume record.
	Layers []string `json:"layers,omitempty"`
}

// snapshotKey derives a snapshot's key from its name, so a retried
// CreateSnapshot finds it by a stat: its directory's name.
func snapshotKey(name string) string {
	sum := sha256.Sum256([]byte(name))
	return snapshotPrefix + hex.EncodeToString(sum[:20])
}

// snapshotID is the ID of the snapshot named name made on this node: its
// key and the node, so that a restore asked of another node can say where
// the snapshot is (CSI gives snapshots no topology). A node name too long
// for CSI's 128-byte IDs is left out.
func (d *Driver) snapshotID(name string) string {
	id := snapshotKey(name) + "@" + d.cfg.NodeID
	if len(id) > 128 {
		return snapshotKey(name)
	}
	return id
}

// parseSnapshotID splits a snapshot ID into its key and node ("" when the
// ID names none); ok is false for an ID this plugin never makes.
func parseSnapshotID(id string) (key, node string, ok bool) {
	key, node, _ = strings.Cut(id, "@")
	h, found := strings.CutPrefix(key, snapshotPrefix)
	return key, node, found && len(h) == 40 && isLowerHex(h) && len(id) <= 128
}

// isSnapshotKey reports whether name is a snapshot directory's name.
func isSnapshotKey(name string) bool {
	key, node, ok := parseSnapshotID(name)
	return ok && node == "" && key == name
}

// otherNodeError reports a snapshot made on another node.
type otherNodeError struct{ id, node string }

func (e *otherNodeError) Error() string {
	return fmt.Sprintf("snapshot %s lives on node %s, not here: a snapshot stays on its source's node, so restore it there", e.id, e.node)
}

func (d *Driver) snapshotsDir() string { return filepath.Join(d.home.Dir(), snapshotsDirName) }

// snapshotDir is the directory of the snapshot with the given ID or key.
func (d *Driver) snapshotDir(id string) string {
	key, _, _ := parseSnapshotID(id)
	return filepath.Join(d.snapshotsDir(), key)
}

// readSnapshot reads a snapshot's record; fs.ErrNotExist if there is no
// such snapshot.
func (d *Driver) readSnapshot(id string) (*snapshotRecord, error) {
	_, node, ok := parseSnapshotID(id)
	switch {
	case !ok:
		return nil, fmt.Errorf("snapshot %q: %w", id, fs.ErrNotExist)
	case node != "" && node != d.cfg.NodeID:
		return nil, &otherNodeError{id: id, node: node}
	}
	s, err := d.readSnapshotIn(id)
	if err != nil {
		return nil, err
	}
	if s.SnapshotID != id {
		return nil, fmt.Errorf("snapshot %q: %w (the directory holds %s)", id, fs.ErrNotExist, s.SnapshotID)
	}
	return s, nil
}

// readSnapshotIn reads the record in the directory of the snapshot with
// the given ID or key.
func (d *Driver) readSnapshotIn(id string) (*snapshotRecord, error) {
	p := filepath.Join(d.snapshotDir(id), snapshotRecordName)
	b, err := safeopen.ReadRegular(p, maxRecordBytes)
	if err != nil {
		return nil, err
	}
	var s snapshotRecord
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parse %s: %w", p, err)
	}
	switch {
	case s.Version < 1 || s.Version > snapshotVersion:
		return nil, fmt.Errorf("%s has version %d; this release understands %d", p, s.Version, snapshotVersion)
	case !sameKey(s.SnapshotID, id):
		return nil, fmt.Errorf("%s belongs to snapshot %q, not %q", p, s.SnapshotID, id)
	}
	if err := checkLayers(s.Layers, p); err != nil {
		return nil, err
	}
	return &s, nil
}

// sameKey reports whether two snapshot IDs (or keys) name one directory.
func sameKey(a, b string) bool {
	ka, _, _ := parseSnapshotID(a)
	kb, _, _ := parseSnapshotID(b)
	return ka == kb
}

// csiSnapshot is the CSI description of a snapshot. A snapshot exists
// only once it is complete and durable, so it is always ready to use.
func (s *snapshotRecord) csiSnapshot() *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:     s.SnapshotID,
		SourceVolumeId: s.SourceID,
		SizeBytes:      s.SizeBytes,
		CreationTime:   timestamppb.New(s.CreatedAt),
		ReadyToUse:     true,
	}
}

// createSnapshot snapshots the volume whose box is box. The caller holds
// the snapshot's and the volume's locks.
func (d *Driver) createSnapshot(ctx context.Context, id, name string, box layout.Box) (*snapshotRecord, error) {
	r, err := d.readRecord(box)
	if err != nil {
		return nil, recordStatus(box, err)
	}
	start := time.Now()
	box, err = d.captureChain(ctx, box, r)
	if err != nil {
		return nil, err
	}
	s := &snapshotRecord{
		Version: snapshotVersion, SnapshotID: id, Name: name, SourceID: box.ID(), CreatedAt: time.Now().UTC(),
		SizeBytes: d.volumeDiskSize(r), Image: r.Image, Digest: r.Digest, Pinned: r.Pinned, Config: r.Config,
		FilesystemSize: r.FilesystemSize, Layers: append([]string(nil), r.Layers...),
	}
	owned, err := safeopen.OpenRoot(d.ownedBaseDir(box.ID()))
	if err != nil {
		return nil, err
	}
	defer owned.Close()
	if err := d.writeSnapshot(s, owned); err != nil {
		if errors.Is(err, sealed.ErrWriter) || errors.Is(err, sealed.ErrWriterDuringWindow) {
			return nil, freezeStatus(box, err)
		}
		return nil, toStatus(fmt.Errorf("snapshot %q of volume %s: %w", name, box.ID(), err), atController)
	}
	d.cfg.Metrics.ObserveSnapshot(time.Since(start))
	klog.FromContext(ctx).Info("Created snapshot", "snapshot", id, "name", name, "volume", box.ID(), "layers", len(s.Layers), "duration", time.Since(start))
	return s, nil
}

// writeSnapshot makes the snapshot's directory from the chain in from,
// under a dot-name first, and renames it into place durably.
func (d *Driver) writeSnapshot(s *snapshotRecord, from *safeopen.Root) error {
	if err := os.MkdirAll(d.snapshotsDir(), 0o700); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(d.snapshotsDir(), "."+filepath.Base(d.snapshotDir(s.SnapshotID))+".new-")
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			if err := sealed.RemoveAll(tmp); err != nil {
				klog.Background().Error(err, "Removing an unfinished snapshot", "path", tmp)
			}
		}
	}()
	to, err := safeopen.OpenRoot(tmp)
	if err != nil {
		return err
	}
	defer to.Close()
	if err := linkChain(from, to, s.Layers); err != nil {
		return err
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := replaceFile(tmp, snapshotRecordName, append(b, '\n'), 0o600, durable); err != nil {
		return err
	}
	if err := os.Rename(tmp, d.snapshotDir(s.SnapshotID)); err != nil {
		return fmt.Errorf("install snapshot %s: %w", s.SnapshotID, err)
	}
	done = true
	return syncDir(d.snapshotsDir())
}

// deleteSnapshot removes a snapshot: renamed aside first, so a crash
// halfway leaves a dot-name that start-up removes, never a half snapshot.
// The volumes restored from it keep their own links to its layers.
func (d *Driver) deleteSnapshot(ctx context.Context, id string) error {
	dir := d.snapshotDir(id)
	doomed := filepath.Join(d.snapshotsDir(), "."+filepath.Base(dir)+".deleting")
	if err := sealed.RemoveAll(doomed); err != nil {
		return err
	}
	if err := os.Rename(dir, doomed); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove snapshot %s: %w", id, err)
	}
	if err := syncDir(d.snapshotsDir()); err != nil {
		return err
	}
	if err := sealed.RemoveAll(doomed); err != nil {
		return fmt.Errorf("remove snapshot %s: %w", id, err)
	}
	klog.FromContext(ctx).Info("Deleted snapshot", "snapshot", id)
	return nil
}

// snapshots lists every snapshot, sorted by ID.
func (d *Driver) snapshots() ([]*snapshotRecord, error) {
	ents, err := os.ReadDir(d.snapshotsDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*snapshotRecord
	for _, e := range ents {
		if !isSnapshotKey(e.Name()) {
			continue
		}
		s, err := d.readSnapshotIn(e.Name())
		if err != nil {
			klog.Background().Error(err, "Skipping an unreadable snapshot", "snapshot", e.Name())
			continue
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].SnapshotID < out[j].SnapshotID })
	return out, nil
}

// removeSnapshotDebris removes what interrupted snapshot creations and
// deletions left: their dot-named directories.
func (d *Driver) removeSnapshotDebris(log klog.Logger) {
	ents, err := os.ReadDir(d.snapshotsDir())
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(d.snapshotsDir(), e.Name())
		if err := sealed.RemoveAll(p); err != nil {
			log.Error(err, "Cannot remove an unfinished snapshot", "path", p)
			continue
		}
		log.Info("Removed an unfinished snapshot", "path", p)
	}
}

// listSnapshots answers ListSnapshots: filtered, sorted by ID, and paged
// with the next snapshot's ID as the token.
func (d *Driver) listSnapshots(req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, invalid("ListSnapshots: max_entries %d is negative", req.GetMaxEntries())
	}
	token := req.GetStartingToken()
	if _, _, ok := parseSnapshotID(token); token != "" && !ok {
		return nil, status.Errorf(codes.Aborted, "ListSnapshots: starting token %q is not one this plugin gave", token)
	}
	all, err := d.snapshots()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "ListSnapshots: %v", err)
	}
	var match []*snapshotRecord
	for _, s := range all {
		if id := req.GetSnapshotId(); id != "" && s.SnapshotID != id {
			continue
		}
		if src := req.GetSourceVolumeId(); src != "" && s.SourceID != src {
			continue
		}
		if token != "" && s.SnapshotID < token {
			continue
		}
		match = append(match, s)
	}
	resp := &csi.ListSnapshotsResponse{}
	for i, s := range match {
		if n := int(req.GetMaxEntries()); n > 0 && i == n {
			resp.NextToken = s.SnapshotID
			break
		}
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: s.csiSnapshot()})
	}
	return resp, nil
}

// snapshotsUsage is the count of snapshots and the bytes their layers
// hold (a layer shared by several snapshots counts once).
func (d *Driver) snapshotsUsage() (count int, bytes int64) {
	all, _ := d.snapshots()
	seen := map[uint64]bool{}
	for _, s := range all {
		count++
		for _, l := range s.Layers {
			var st unix.Stat_t
			if unix.Lstat(filepath.Join(d.snapshotDir(s.SnapshotID), l), &st) == nil && !seen[st.Ino] {
				seen[st.Ino] = true
				bytes += st.Blocks * 512
			}
		}
	}
	return count, bytes
}
