package hardening

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	mount "k8s.io/mount-utils"
)

// fileVersion identifies one version of a file's bytes well enough to
// skip re-checking it. The ctime is what makes that safe: nothing can set
// it back, so a file whose version is unchanged has not been written
// since.
type fileVersion struct {
	dev, ino uint64
	size     int64
	mtimeNs  int64
	ctimeNs  int64
}

func versionOf(fi fs.FileInfo) fileVersion {
	st := fi.Sys().(*syscall.Stat_t)
	return fileVersion{dev: st.Dev, ino: st.Ino, size: fi.Size(), mtimeNs: st.Mtim.Nano(), ctimeNs: st.Ctim.Nano()}
}

func statVersion(p string) (fileVersion, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return fileVersion{}, err
	}
	return versionOf(fi), nil
}

// diskChecker judges a home as a restarted plugin left it. It remembers
// which file versions already passed e2fsck or qemu-img check: each tool
// run costs tens of milliseconds, and an unchanged file needs no second
// look.
type diskChecker struct {
	home    string
	qemuImg string
	passed  map[fileVersion]bool
}

func newDiskChecker(home, qemuImg string) *diskChecker {
	return &diskChecker{home: home, qemuImg: qemuImg, passed: map[fileVersion]bool{}}
}

// check returns every violation of the on-disk invariants: nothing in
// tmp/, every base at a final path complete and read-only, no half-made
// or half-deleted box, no temp file inside a box, every overlay valid.
func (c *diskChecker) check(ctx context.Context) []error {
	var errs []error
	tmp := filepath.Join(c.home, "tmp")
	if ents, err := os.ReadDir(tmp); err != nil {
		errs = append(errs, fmt.Errorf("list %s: %w", tmp, err))
	} else if len(ents) > 0 {
		errs = append(errs, fmt.Errorf("temp files left in %s after start-up: %v", tmp, names(ents)))
	}

	images := filepath.Join(c.home, "images", "disk-images")
	ents, err := os.ReadDir(images)
	if err != nil {
		errs = append(errs, fmt.Errorf("list %s: %w", images, err))
	}
	present := map[string]bool{}
	for _, e := range ents {
		present[e.Name()] = true
	}
	for _, e := range ents {
		p := filepath.Join(images, e.Name())
		switch {
		case strings.HasSuffix(e.Name(), ".ext4"):
			// The record is written before the base is installed, so
			// no crash leaves a base without one.
			if !present[e.Name()+".json"] {
				errs = append(errs, fmt.Errorf("base %s has no record beside it", p))
			}
			errs = append(errs, c.checkBase(ctx, p)...)
		case strings.HasSuffix(e.Name(), ".ext4.json"):
			// A record whose base never got installed (or was evicted)
			// is removed at start-up.
			if !present[strings.TrimSuffix(e.Name(), ".json")] {
				errs = append(errs, fmt.Errorf("base record %s left after start-up without its base", p))
			}
			if b, err := os.ReadFile(p); err != nil || !json.Valid(b) {
				errs = append(errs, fmt.Errorf("base record %s is not complete JSON (read error: %v)", p, err))
			}
		default:
			errs = append(errs, fmt.Errorf("unexpected entry %s in the cache", p))
		}
	}

	boxes := filepath.Join(c.home, "boxes")
	ents, err = os.ReadDir(boxes)
	if err != nil {
		errs = append(errs, fmt.Errorf("list %s: %w", boxes, err))
	}
	for _, e := range ents {
		p := filepath.Join(boxes, e.Name())
		if strings.HasPrefix(e.Name(), ".") {
			errs = append(errs, fmt.Errorf("half-created or half-deleted box %s left after start-up", p))
			continue
		}
		errs = append(errs, c.checkBox(ctx, p)...)
	}
	return errs
}

// checkBase: a base at a final path (the cache's or a box's link) must
// be complete, which e2fsck -fn judges, and read-only to everyone.
func (c *diskChecker) checkBase(ctx context.Context, p string) []error {
	fi, err := os.Stat(p)
	if err != nil {
		return []error{fmt.Errorf("stat base %s: %w", p, err)}
	}
	if !fi.Mode().IsRegular() {
		return []error{fmt.Errorf("base %s is not a regular file: %v", p, fi.Mode())}
	}
	var errs []error
	if perm := fi.Mode().Perm(); perm != 0o444 {
		errs = append(errs, fmt.Errorf("base %s has mode %v, want 0444", p, perm))
	}
	v := versionOf(fi)
	if c.passed[v] {
		return errs
	}
	if _, err := run(ctx, "e2fsck", "-fn", p); err != nil {
		return append(errs, fmt.Errorf("base %s is not a complete file system: %w", p, err))
	}
	c.passed[v] = true
	return errs
}

func (c *diskChecker) checkBox(ctx context.Context, dir string) []error {
	var errs []error
	id := filepath.Base(dir)
	b, err := os.ReadFile(filepath.Join(dir, "box.json"))
	var m struct {
		VolumeID string `json:"volumeID"`
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("box %s: %w", dir, err))
	} else if err := json.Unmarshal(b, &m); err != nil || m.VolumeID != id {
		errs = append(errs, fmt.Errorf("box %s: box.json is not a complete manifest for %s (%v): %q", dir, id, err, b))
	}
	for _, sub := range []string{dir, filepath.Join(dir, "disks")} {
		tmps, _ := filepath.Glob(filepath.Join(sub, ".*.tmp*"))
		if len(tmps) > 0 {
			errs = append(errs, fmt.Errorf("box %s: temp files left after start-up: %v", dir, tmps))
		}
	}
	overlay := filepath.Join(dir, "disks", "guest-rootfs.qcow2")
	if _, err := os.Lstat(overlay); err == nil {
		if err := c.checkOverlay(ctx, overlay); err != nil {
			errs = append(errs, fmt.Errorf("box %s: %w", dir, err))
		}
		// An overlay at its final path must have its backing: the base link
		// is made before the overlay, never after.
		if _, err := os.Stat(filepath.Join(dir, "base", "rootfs.ext4")); err != nil {
			errs = append(errs, fmt.Errorf("box %s: overlay without its base: %w", dir, err))
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("box %s: %w", dir, err))
	}
	base := filepath.Join(dir, "base", "rootfs.ext4")
	if _, err := os.Lstat(base); err == nil {
		errs = append(errs, c.checkBase(ctx, base)...)
	}
	return errs
}

// checkOverlay runs qemu-img check on an overlay unless this exact
// version of it already passed.
func (c *diskChecker) checkOverlay(ctx context.Context, p string) error {
	v, err := statVersion(p)
	if err != nil {
		return err
	}
	if c.passed[v] {
		return nil
	}
	if _, err := run(ctx, c.qemuImg, "check", "-f", "qcow2", p); err != nil {
		return fmt.Errorf("overlay fails qemu-img check: %w", err)
	}
	c.passed[v] = true
	return nil
}

func names(ents []os.DirEntry) []string {
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// mountExpectation is what the mount table under the test's directories
// may and must hold given what kubelet asked for.
type mountExpectation struct {
	allowed  map[string]bool
	required map[string]bool
	// inFlight are the mounts of an interrupted call: a kill between a
	// bind and its read-only remount leaves them writable until the retry.
	inFlight map[string]bool
}

func newMountExpectation() mountExpectation {
	return mountExpectation{allowed: map[string]bool{}, required: map[string]bool{}, inFlight: map[string]bool{}}
}

// volumeMounts is what a volume in a given state leaves mounted: staging
// mounts the plugin-owned base/ and box.json read-only in the box and
// rbinds the box, which copies both, and publishing rbinds the staging
// path again.
func volumeMounts(v *volume, staged, published bool) []string {
	var out []string
	view := func(p string) []string {
		return []string{p, filepath.Join(p, "base"), filepath.Join(p, "box.json")}
	}
	if staged {
		out = append(out, view(v.box)[1:]...)
		out = append(out, view(v.staging)...)
	}
	if published {
		out = append(out, view(v.target)...)
	}
	return out
}

// stagedIn and publishedIn say whether a volume whose next step is s is
// staged or published.
func stagedIn(s step) bool    { return s > stepStage && s <= stepUnstage }
func publishedIn(s step) bool { return s > stepPublish && s <= stepUnpublish }

// expect adds a volume whose state is exactly s.
func (e mountExpectation) expect(v *volume, s step) {
	for _, m := range volumeMounts(v, stagedIn(s), publishedIn(s)) {
		e.allowed[m], e.required[m] = true, true
	}
}

// expectEither adds a volume that is in state before or after, unknown
// which: an interrupted call may or may not have done its work.
func (e mountExpectation) expectEither(v *volume, before, after step) {
	b := volumeMounts(v, stagedIn(before), publishedIn(before))
	a := volumeMounts(v, stagedIn(after), publishedIn(after))
	for _, m := range append(b, a...) {
		e.allowed[m], e.inFlight[m] = true, true
	}
	inAfter := map[string]bool{}
	for _, m := range a {
		inAfter[m] = true
	}
	for _, m := range b {
		if inAfter[m] {
			e.required[m] = true
		}
	}
}

// checkMounts compares the kernel's mount table under dirs with e: no
// mount kubelet's requests do not need (a leak), none missing, none
// stacked twice, and every base mount read-only.
func checkMounts(e mountExpectation, dirs ...string) []error {
	ms, err := testenv.MountsUnder(dirs...)
	if err != nil {
		return []error{err}
	}
	var errs []error
	seen := map[string]int{}
	for _, m := range ms {
		seen[m.MountPoint]++
		if !e.allowed[m.MountPoint] {
			errs = append(errs, fmt.Errorf("leaked mount %s (root %s)", m.MountPoint, m.Root))
		}
		if (strings.HasSuffix(m.MountPoint, "/base") || strings.HasSuffix(m.MountPoint, "/box.json")) && !readOnly(m) && !e.inFlight[m.MountPoint] {
			errs = append(errs, fmt.Errorf("mount %s of a plugin-owned file is writable (options %v): a pod could change what the plugin owns", m.MountPoint, m.MountOptions))
		}
	}
	var stacked, missing []string
	for p, n := range seen {
		if n > 1 {
			stacked = append(stacked, fmt.Sprintf("%s (%dx)", p, n))
		}
	}
	for p := range e.required {
		if seen[p] == 0 {
			missing = append(missing, p)
		}
	}
	sort.Strings(stacked)
	sort.Strings(missing)
	if len(stacked) > 0 {
		errs = append(errs, fmt.Errorf("mounts stacked on the same path: %v", stacked))
	}
	if len(missing) > 0 {
		errs = append(errs, fmt.Errorf("mounts kubelet's requests need are missing: %v", missing))
	}
	return errs
}

func readOnly(m mount.MountInfo) bool {
	for _, o := range m.MountOptions {
		if o == "ro" {
			return true
		}
	}
	return false
}
