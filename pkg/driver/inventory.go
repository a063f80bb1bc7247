package driver

// The inventory is what an operator's `boxlite-csi box ls` reads: the
// volumes of a home, from their records and their boxes, straight from
// disk. It changes nothing and takes no lock, so it is safe beside a
// running plugin; a volume created or deleted at that moment may be
// missing or half there in the answer.

import (
	"fmt"
	"os"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// VolumeInfo is one volume as an operator sees it.
type VolumeInfo struct {
	ID string `json:"volumeID"`
	// Name is the CreateVolume name; empty for an inline volume.
	Name      string `json:"name,omitempty"`
	Ephemeral bool   `json:"ephemeral,omitempty"`
	Image     string `json:"image"`
	Digest    string `json:"digest"`
	// Capacity is what CreateVolume asked for; ExpandedBytes what the
	// latest NodeExpandVolume asked for.
	Capacity      int64 `json:"capacityBytes"`
	ExpandedBytes int64 `json:"expandedBytes,omitempty"`
	// DiskBytes is the overlay's virtual size, 0 before the first stage;
	// FilesystemBytes the filesystem the plugin made in it (0: the
	// base's); AllocatedBytes what the overlay occupies.
	DiskBytes       uint64 `json:"diskBytes"`
	FilesystemBytes uint64 `json:"filesystemBytes,omitempty"`
	AllocatedBytes  int64  `json:"allocatedBytes"`
	// Chain is the disk's backing chain under its overlay, top first: its
	// sealed layers, then the base (names in the box's base/).
	Chain []string `json:"chain,omitempty"`
	// Source is the snapshot or volume it was made from, if any.
	Source string `json:"source,omitempty"`
	// Mounts are the staging and target paths that show the box.
	Mounts []string `json:"mounts,omitempty"`
	// Health is what NodeGetVolumeHealth would say of the disk.
	Health []Verdict `json:"health,omitempty"`
	// Problem says what is wrong with the volume's record or box, if
	// anything could not be read; the rest is what could.
	Problem string `json:"problem,omitempty"`
}

// InspectVolume reads one volume of the home at dir. A volume with no
// record wraps fs.ErrNotExist.
func InspectVolume(dir, id string) (VolumeInfo, error) {
	d := &Driver{home: layout.NewHome(dir, layout.Config{})}
	if _, err := d.home.Box(id); err != nil {
		return VolumeInfo{}, err
	}
	if _, err := d.readRecordOnly(id); err != nil {
		return VolumeInfo{}, fmt.Errorf("volume %s: %w", id, err)
	}
	return d.volumeInfo(id), nil
}

// ListVolumes reads the volumes of the home at dir, sorted by ID.
func ListVolumes(dir string) ([]VolumeInfo, error) {
	d := &Driver{home: layout.NewHome(dir, layout.Config{})}
	ents, err := os.ReadDir(d.recordsDir())
	if err != nil {
		return nil, err
	}
	var out []VolumeInfo
	for _, e := range ents {
		id, ok := recordID(e.Name())
		if !ok || !e.Type().IsRegular() {
			continue
		}
		out = append(out, d.volumeInfo(id))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// volumeInfo reads what it can of one volume.
func (d *Driver) volumeInfo(id string) VolumeInfo {
	v := VolumeInfo{ID: id}
	r, err := d.readRecordOnly(id)
	if err != nil {
		v.Problem = err.Error()
		return v
	}
	v.Name, v.Ephemeral, v.Image, v.Digest = r.Name, r.Ephemeral, r.Image, r.Digest
	v.Capacity, v.ExpandedBytes, v.FilesystemBytes = r.Capacity, r.ExpandedBytes, r.FilesystemSize
	box, err := d.home.Box(id)
	if err != nil {
		v.Problem = err.Error()
		return v
	}
	if err := unix.Lstat(box.Root(), new(unix.Stat_t)); err != nil {
		v.Problem = "no box at " + box.Root() + ": " + err.Error()
		return v
	}
	for i := len(r.Layers) - 1; i >= 0; i-- {
		v.Chain = append(v.Chain, r.Layers[i])
	}
	v.Chain = append(v.Chain, baseName)
	if r.Source != nil {
		v.Source = r.Source.String()
	}
	box = r.boxOf(box)
	v.AllocatedBytes = allocatedBytes(d.home, id)
	if h, err := rootfs.VerifyOverlay(box); err == nil {
		v.DiskBytes = h.Size
	}
	v.Health = diskVerdicts(box)
	if m, err := readBoxMounts(box); err == nil {
		v.Mounts = m.outside
	}
	return v
}
