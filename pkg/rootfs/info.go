package rootfs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// Each base has a small record beside it, <base file>.json (for example
// sha256-<hex>.e1.ext4.json), saying what the base is and how it was
// pulled. The cache is keyed by digest alone, so without it the plugin
// could not tell whether a base may be handed to a caller it cannot check
// against a registry (pullPolicy Never, an air-gapped node), nor give such
// a caller the image config its volume record needs.
//
// The record is written to tmp/, synced and renamed into place before the
// base is, under the base's key lock, so an installed base always has one;
// a crash between the two renames leaves a record without a base, which
// start-up removes. Eviction removes it with its base. Bases installed by
// an earlier release have none: their provenance is unknown.

// baseInfoVersion is the record format this release writes and reads.
const baseInfoVersion = 1

// maxBaseInfoBytes bounds a record. The plugin writes records itself; the
// bound is there so that a damaged file cannot exhaust memory. It matches
// the volume record's bound, which embeds the same image config.
const maxBaseInfoBytes = 1 << 20

// infoSuffix is what a base's file name gets for its record's.
const infoSuffix = ".json"

// ErrDamagedInfo marks a base record that exists but cannot be used: not
// a regular file, too large, not this release's format, or about another
// base.
var ErrDamagedInfo = errors.New("damaged base record")

// BaseInfo is what is recorded with a base.
type BaseInfo struct {
	// Digest and Builder are the base's key; the cache fills them in when
	// it writes the record.
	Digest  string `json:"digest"`
	Builder string `json:"builder"`
	// IndexDigest is the image index the manifest was picked from, when
	// the build knew it, so that a volume naming the index by digest finds
	// the base without asking a registry.
	IndexDigest string `json:"indexDigest,omitempty"`
	// Anonymous is true when the registry served the image to requests
	// with no credentials at the time it was pulled: then anyone may be
	// handed the base. False when credentials were needed, for local
	// sources, and whenever that could not be established.
	Anonymous bool `json:"anonymous"`
	// Config is the part of the image config a volume record needs.
	Config source.Config `json:"config"`
}

// baseInfoFile is the record as stored: the info and a format version.
type baseInfoFile struct {
	Version int `json:"version"`
	BaseInfo
}

// ParseBaseInfo decodes a base record and checks that it is one this
// release understands and that it describes the base k. where names the
// file in errors, which all wrap ErrDamagedInfo.
func ParseBaseInfo(b []byte, k Key, where string) (BaseInfo, error) {
	bad := func(format string, a ...any) (BaseInfo, error) {
		return BaseInfo{}, fmt.Errorf("%w %s: %s", ErrDamagedInfo, where, fmt.Sprintf(format, a...))
	}
	if len(b) > maxBaseInfoBytes {
		return bad("larger than %d bytes", maxBaseInfoBytes)
	}
	var f baseInfoFile
	if err := json.Unmarshal(b, &f); err != nil {
		return bad("%v", err)
	}
	switch {
	case f.Version < 1:
		return bad("no valid version (%d)", f.Version)
	case f.Version > baseInfoVersion:
		return bad("version %d is newer than this release understands (%d)", f.Version, baseInfoVersion)
	case f.Digest != k.Digest || f.Builder != k.Builder:
		return bad("describes base %s/%s, not %s", truncate(f.Digest, 80), truncate(f.Builder, 40), k)
	case f.IndexDigest != "" && !digestRE.MatchString(f.IndexDigest):
		return bad("index digest %q is not a sha256 digest", truncate(f.IndexDigest, 80))
	}
	return f.BaseInfo, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// InfoPath is where the record of k's base lives.
func (c *Cache) InfoPath(k Key) string { return c.Path(k) + infoSuffix }

// Info reads the record of k's base. It is opened without following a
// link or blocking, and read bounded. A missing record (a base of an
// earlier release, or no base at all) wraps fs.ErrNotExist; a record that
// cannot be used wraps ErrDamagedInfo. Info does not say whether the base
// itself is installed: Lookup does.
func (c *Cache) Info(k Key) (BaseInfo, error) {
	if err := k.Validate(); err != nil {
		return BaseInfo{}, err
	}
	p := c.InfoPath(k)
	b, err := safeopen.ReadRegular(p, maxBaseInfoBytes)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return BaseInfo{}, fmt.Errorf("rootfs: base %s has no record %s: %w", k, p, err)
	case errors.Is(err, safeopen.ErrNotRegular), errors.Is(err, safeopen.ErrTooLarge), errors.Is(err, unix.ELOOP):
		return BaseInfo{}, fmt.Errorf("%w %s: %w", ErrDamagedInfo, p, err)
	case err != nil:
		return BaseInfo{}, fmt.Errorf("rootfs: read the record of base %s: %w", k, err)
	}
	return ParseBaseInfo(b, k, p)
}

// FindByIndex finds the installed base of builder whose record says it
// was picked from the image index with digest index. It lists the cache
// and reads the records there, skipping any it cannot use. A hit
// refreshes the base's access time, as Lookup does.
func (c *Cache) FindByIndex(index, builder string) (Base, BaseInfo, bool, error) {
	if !digestRE.MatchString(index) || !builderRE.MatchString(builder) {
		return Base{}, BaseInfo{}, false, nil
	}
	dir := c.cfg.Home.Images().DiskImagesDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return Base{}, BaseInfo{}, false, fmt.Errorf("rootfs: list cache %s: %w", dir, err)
	}
	for _, e := range ents {
		k, ok := parseInfoName(e.Name())
		if !ok || k.Builder != builder {
			continue
		}
		info, err := c.Info(k)
		if err != nil || info.IndexDigest != index {
			continue
		}
		b, ok, err := c.lookup(k)
		if err != nil || ok {
			return b, info, ok, err
		}
	}
	return Base{}, BaseInfo{}, false, nil
}

// parseInfoName recovers the key from a record's file name.
func parseInfoName(name string) (Key, bool) {
	base, ok := strings.CutSuffix(name, infoSuffix)
	if !ok {
		return Key{}, false
	}
	return parseFileName(base)
}

// RecordInfo records info with k's installed base, replacing whatever
// record it had. It is for a base with no usable record (installed by an
// earlier release, or its record damaged), once a caller has resolved its
// image. It does nothing and reports false when no base is installed for
// k, or when k's lock is held: a build or an eviction is at work on it,
// and the next caller can try again.
func (c *Cache) RecordInfo(k Key, info BaseInfo) (bool, error) {
	if err := k.Validate(); err != nil {
		return false, err
	}
	if _, ok, err := c.stat(k); err != nil || !ok {
		return false, err
	}
	l, free, err := tryLock(c.lockPath(k))
	if err != nil || !free {
		return false, err
	}
	defer l.release()
	// It may have been evicted while we took the lock.
	if _, ok, err := c.stat(k); err != nil || !ok {
		return false, err
	}
	if err := c.writeInfo(k, info); err != nil {
		return false, err
	}
	return true, syncDir(filepath.Dir(c.InfoPath(k)))
}

// stat reports whether k's base is installed, without touching it.
func (c *Cache) stat(k Key) (os.FileInfo, bool, error) {
	p := c.Path(k)
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("rootfs: stat base %s: %w", p, err)
	}
	return fi, fi.Mode().IsRegular(), nil
}

// writeInfo puts k's record in place atomically: it is written under
// tmp/ (named after the key, so start-up cleanup knows whose it is),
// synced, and renamed over the old one. The caller holds k's lock and
// syncs the directory.
func (c *Cache) writeInfo(k Key, info BaseInfo) error {
	info.Digest, info.Builder = k.Digest, k.Builder
	b, err := json.MarshalIndent(baseInfoFile{Version: baseInfoVersion, BaseInfo: info}, "", "  ")
	if err != nil {
		return fmt.Errorf("rootfs: encode the record of base %s: %w", k, err)
	}
	b = append(b, '\n')
	if len(b) > maxBaseInfoBytes {
		// It would be refused when read back.
		return fmt.Errorf("rootfs: the record of base %s would be %d bytes, more than the %d allowed (an image config this large is not supported)", k, len(b), maxBaseInfoBytes)
	}
	tmp, err := os.CreateTemp(c.cfg.Home.TempDir(), k.FileName()+infoSuffix+".*.tmp")
	if err != nil {
		return fmt.Errorf("rootfs: write the record of base %s: %w", k, err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("rootfs: write the record of base %s in %s: %w", k, tmp.Name(), err)
	}
	final := c.InfoPath(k)
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("rootfs: install the record of base %s: %w", k, err)
	}
	return nil
}

// removeInfo deletes k's record; a missing one is fine. The caller holds
// k's lock.
func (c *Cache) removeInfo(k Key) error {
	p := c.InfoPath(k)
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("rootfs: remove the record %s of base %s: %w", p, k, err)
	}
	return nil
}

// removeOrphanInfo deletes records whose base is gone: a crash between
// installing a record and its base, or between evicting a base and its
// record. A record whose key lock is held belongs to a build in another
// process and is left alone. Failures are logged, not returned: a stray
// file must not stop the plugin from starting.
func (c *Cache) removeOrphanInfo(ctx context.Context) {
	log := klog.FromContext(ctx)
	dir := c.cfg.Home.Images().DiskImagesDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		log.Error(err, "Cannot list the cache for orphaned base records", "dir", dir)
		return
	}
	for _, e := range ents {
		k, ok := parseInfoName(e.Name())
		if !ok {
			continue
		}
		if _, ok, err := c.stat(k); err != nil || ok {
			continue
		}
		l, free, err := tryLock(c.lockPath(k))
		if err != nil || !free {
			continue
		}
		if _, ok, err := c.stat(k); err == nil && !ok {
			if err := c.removeInfo(k); err != nil {
				log.Error(err, "Cannot remove an orphaned base record")
			} else {
				log.Info("Removed the record of a base that is gone", "path", c.InfoPath(k))
			}
		}
		l.release()
	}
}
