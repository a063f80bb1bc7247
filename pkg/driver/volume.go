package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// StorageClass parameters and volume attributes.
const (
	ParamImage                 = "image"
	ParamPullPolicy            = "pullPolicy"
	ParamPlainHTTP             = "plainHTTP"
	ParamInsecureSkipTLSVerify = "insecureSkipTLSVerify"

	// reservedPrefix marks keys the CO adds (pod info, PVC names, the
	// ephemeral flag); they are not the user's parameters.
	reservedPrefix = "csi.storage.k8s.io/"
	ephemeralKey   = "csi.storage.k8s.io/ephemeral"

	// Volume context keys returned by CreateVolume.
	ctxImage  = "image"
	ctxDigest = "digest"
	ctxPinned = "pinned"

	// PullIfNotPresent builds a missing base from the registry.
	PullIfNotPresent = "IfNotPresent"
	// PullNever only uses bases already in the node cache.
	PullNever = "Never"

	maxParamLen  = 4096
	maxNameLen   = 1024
	manifestName = "box.json"
	// maxManifestBytes bounds what is read back from box.json, which a
	// pod with the box mounted could have rewritten.
	maxManifestBytes = 1 << 20
)

// errInvalidParam marks a parameter or attribute the user got wrong.
var errInvalidParam = errors.New("invalid volume parameter")

// volumeParams are the user's parameters, validated.
type volumeParams struct {
	Image                 string
	PullPolicy            string
	PlainHTTP             bool
	InsecureSkipTLSVerify bool
}

// parseParams validates StorageClass parameters or inline volume
// attributes. Unknown keys are refused so a typo does not silently fall
// back to a default; keys under csi.storage.k8s.io/ belong to the CO.
func parseParams(m map[string]string) (volumeParams, error) {
	p := volumeParams{PullPolicy: PullIfNotPresent}
	var unknown []string
	for k, v := range m {
		if strings.HasPrefix(k, reservedPrefix) {
			continue
		}
		if len(v) > maxParamLen {
			return p, fmt.Errorf("%w: parameter %q is %d bytes, at most %d allowed", errInvalidParam, k, len(v), maxParamLen)
		}
		var err error
		switch k {
		case ParamImage:
			p.Image = v
		case ParamPullPolicy:
			if v != PullIfNotPresent && v != PullNever {
				return p, fmt.Errorf("%w: parameter %s=%q: want %s or %s", errInvalidParam, ParamPullPolicy, v, PullIfNotPresent, PullNever)
			}
			p.PullPolicy = v
		case ParamPlainHTTP:
			p.PlainHTTP, err = strconv.ParseBool(v)
		case ParamInsecureSkipTLSVerify:
			p.InsecureSkipTLSVerify, err = strconv.ParseBool(v)
		default:
			unknown = append(unknown, k)
		}
		if err != nil {
			return p, fmt.Errorf("%w: parameter %s=%q: want true or false", errInvalidParam, k, v)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return p, fmt.Errorf("%w: unknown parameters %q; known: %s, %s, %s, %s", errInvalidParam, unknown, ParamImage, ParamPullPolicy, ParamPlainHTTP, ParamInsecureSkipTLSVerify)
	}
	if p.Image == "" {
		return p, fmt.Errorf("%w: parameter %q is required", errInvalidParam, ParamImage)
	}
	ref, err := source.Parse(p.Image)
	if err != nil {
		return p, err
	}
	if p.PullPolicy == PullNever && !ref.IsDigest() {
		return p, fmt.Errorf("%w: %s=%s needs an image pinned by digest, got %q", errInvalidParam, ParamPullPolicy, PullNever, p.Image)
	}
	return p, nil
}

// userParams returns the parameters that define the volume, for comparing
// a repeated CreateVolume with the first one.
func userParams(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		if !strings.HasPrefix(k, reservedPrefix) {
			out[k] = v
		}
	}
	return out
}

// volumeIDForName derives the volume ID from the CreateVolume name, so a
// retried CreateVolume finds its box by a stat, with no index to keep.
func volumeIDForName(name string) string {
	sum := sha256.Sum256([]byte(name))
	return "bx-" + hex.EncodeToString(sum[:20])
}

// boxManifest is <box>/box.json: what the volume is, for CreateVolume's
// idempotency, for re-staging after a restart, and for the runtime that
// boots the box (image config, virtual size, backing).
type boxManifest struct {
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

	VirtualSize uint64 `json:"virtualSize,omitempty"`
	Backing     string `json:"backing,omitempty"`
}

const manifestVersion = 1

func readManifest(box layout.Box) (*boxManifest, error) {
	p := box.ManifestPath()
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxManifestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	if len(b) > maxManifestBytes {
		return nil, fmt.Errorf("%s is larger than %d bytes", p, maxManifestBytes)
	}
	var m boxManifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("parse %s: %w", p, err)
	}
	if m.VolumeID != box.ID() {
		return nil, fmt.Errorf("%s belongs to volume %q, not %q", p, m.VolumeID, box.ID())
	}
	return &m, nil
}

// writeManifest replaces dir/box.json atomically: after a crash it is the
// old or the new version, never a mix, because the data is written out
// with sync_file_range before the rename and no journal commit can publish
// the name over unwritten data. It is not made durable here: NodeStage
// re-derives what it rewrites (virtual size, backing), and createBox makes
// a new box durable with one fsync of boxes/, whose commit carries the
// manifest, its directory and the rename together.
func writeManifest(dir string, m *boxManifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	f, err := os.CreateTemp(dir, "."+manifestName+".tmp*")
	if err != nil {
		return fmt.Errorf("write box manifest in %s: %w", dir, err)
	}
	defer os.Remove(f.Name())
	_, err = f.Write(b)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if err == nil {
		err = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	final := filepath.Join(dir, manifestName)
	if err := os.Rename(f.Name(), final); err != nil {
		return fmt.Errorf("install %s: %w", final, err)
	}
	return nil
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

// createBox makes the box directory with its manifest in one rename, so a
// box either exists complete or not at all. The staging directory is a
// dot-name, which recovery removes after a crash.
func createBox(home layout.Home, box layout.Box, m *boxManifest) error {
	tmp, err := os.MkdirTemp(home.BoxesDir(), "."+box.ID()+".new-")
	if err != nil {
		return fmt.Errorf("create box %s: %w", box.Root(), err)
	}
	defer os.RemoveAll(tmp)
	if err := writeManifest(tmp, m); err != nil {
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

// removeBox deletes a box directory that has no mounts left. It is first
// renamed to a dot-name, so a crash halfway leaves something recovery
// removes rather than a half-deleted box that still looks like a volume.
func removeBox(home layout.Home, box layout.Box) error {
	doomed := filepath.Join(home.BoxesDir(), "."+box.ID()+".deleting")
	// Debris of an earlier interrupted delete would block the rename.
	if err := os.RemoveAll(doomed); err != nil {
		return fmt.Errorf("remove box %s: %w", doomed, err)
	}
	if err := os.Rename(box.Root(), doomed); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove box %s: %w", box.Root(), err)
	}
	if err := syncDir(home.BoxesDir()); err != nil {
		return err
	}
	if err := os.RemoveAll(doomed); err != nil {
		return fmt.Errorf("remove box %s: %w", doomed, err)
	}
	return nil
}
