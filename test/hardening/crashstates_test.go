package hardening

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	ocilayout "github.com/google/go-containerregistry/pkg/v1/layout"
	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
)

// TestCrashStates puts the node into the exact states a SIGKILL between
// two system calls of one CSI call leaves behind, then kills and restarts
// the plugin and re-issues the call as kubelet would. The random campaign
// reaches these windows only by luck (they are microseconds wide); here
// each one is made on purpose, with the same mount(2) calls and renames
// the plugin makes.
func TestCrashStates(t *testing.T) {
	qemuImg, _ := needRootAndQemu(t)
	ctx := context.Background()
	dir := t.TempDir()
	t.Cleanup(func() { unmountAll(t, dir) })
	home := filepath.Join(dir, "home")

	oci := filepath.Join(dir, "oci")
	lp, err := ocilayout.Write(oci, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(testimage.Random(t, 7, 1, 40, 256<<10)); err != nil {
		t.Fatal(err)
	}
	params := map[string]string{"image": "oci:" + oci}
	p := newProc(t, dir, "--base-min-size=4Mi", "--base-headroom=1Mi", "--eviction-interval=0")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin log tail:\n%s", p.logTail(8<<10))
		}
	})
	if err := p.start(ctx); err != nil {
		t.Fatal(err)
	}
	disk := newDiskChecker(home, qemuImg)

	base := func(v *volume) string { return filepath.Join(v.box, "base", "rootfs.ext4") }
	// owned is a plugin-owned file of the volume, which stage mounts
	// read-only into its box.
	owned := func(v *volume, suffix string) string { return filepath.Join(home, "volumes", v.id+suffix) }
	cases := []struct {
		name string
		// prepared is the volume's next step once the calls before the
		// crash have succeeded.
		prepared step
		readonly bool
		// crash leaves what the killed call had done so far.
		crash func(t *testing.T, v *volume)
		// retry is the call kubelet re-issues; the volume's next step is
		// retry+1 afterwards.
		retry step
	}{
		{
			// The box of an earlier release, staged by it: its base file
			// mounted on itself inside the box.
			name: "stage of a box an earlier release had staged", prepared: stepDelete, retry: stepStage,
			crash: func(t *testing.T, v *volume) { mustMountRO(t, base(v), base(v)) },
		},
		{
			name: "stage killed after the base mount, before box.json's", prepared: stepDelete, retry: stepStage,
			crash: func(t *testing.T, v *volume) { mustMountRO(t, owned(v, ".base"), filepath.Join(v.box, "base")) },
		},
		{
			name: "stage killed after the box's own mounts, before the staging mount", prepared: stepDelete, retry: stepStage,
			crash: func(t *testing.T, v *volume) {
				mustMountRO(t, owned(v, ".base"), filepath.Join(v.box, "base"))
				mustMountRO(t, owned(v, ".box.json"), filepath.Join(v.box, "box.json"))
			},
		},
		{
			name: "read-only publish killed between the bind and its read-only remount", prepared: stepPublish, readonly: true, retry: stepPublish,
			crash: func(t *testing.T, v *volume) {
				if err := os.MkdirAll(v.target, 0o750); err != nil {
					t.Fatal(err)
				}
				mustMount(t, v.staging, v.target, unix.MS_BIND|unix.MS_REC)
			},
		},
		{
			name: "unpublish killed between the unmount and the directory removal", prepared: stepUnpublish, retry: stepUnpublish,
			crash: func(t *testing.T, v *volume) { mustUnmount(t, v.target) },
		},
		{
			name: "unstage killed between the staging unmount and the base release", prepared: stepPublish, retry: stepUnstage,
			crash: func(t *testing.T, v *volume) { mustUnmount(t, v.staging) },
		},
		{
			name: "delete killed after the box was renamed away", prepared: stepDelete, retry: stepDelete,
			crash: func(t *testing.T, v *volume) {
				if err := os.Rename(v.box, filepath.Join(home, "boxes", "."+v.id+".deleting")); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "stage killed mid-build, leaving a partial base in tmp", prepared: stepStage, retry: stepStage,
			crash: func(t *testing.T, v *volume) {
				bases, _ := filepath.Glob(filepath.Join(home, "images", "disk-images", "*.ext4"))
				if len(bases) != 1 {
					t.Fatalf("want one cached base, have %v", bases)
				}
				if err := os.Remove(bases[0]); err != nil {
					t.Fatal(err)
				}
				partial := filepath.Join(home, "tmp", filepath.Base(bases[0])+".4242.tmp")
				if err := os.WriteFile(partial, []byte("half a file system"), 0o644); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "create killed before its box was renamed into place", prepared: stepCreate, retry: stepCreate,
			crash: func(t *testing.T, v *volume) {
				half := filepath.Join(home, "boxes", ".bx-0000000000000000000000000000000000000000.new-1")
				if err := os.MkdirAll(half, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(half, ".box.json.tmp1"), []byte(`{"vers`), 0o644); err != nil {
					t.Fatal(err)
				}
			},
		},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := fmt.Sprintf("state-%d", i)
			v := &volume{
				name: name, params: params, capacity: 32 << 20, readonly: tc.readonly,
				staging: filepath.Join(dir, "kubelet", "plugins", "staging", name),
				target:  filepath.Join(dir, "kubelet", "pods", name, "volumes", "box"),
			}
			// Reach the prepared state the ordinary way: Create, Stage,
			// Publish, then back down if the state needs an unstaged box.
			var path []step
			switch tc.prepared {
			case stepStage:
				path = []step{stepCreate}
			case stepPublish:
				path = []step{stepCreate, stepStage}
			case stepUnpublish:
				path = []step{stepCreate, stepStage, stepPublish}
			case stepDelete:
				path = []step{stepCreate, stepStage, stepUnstage}
			}
			for _, s := range path {
				mustCall(ctx, t, p, v, s)
			}
			if v.id != "" {
				v.box = filepath.Join(home, "boxes", v.id)
			}
			tc.crash(t, v)
			p.kill()
			if err := p.start(ctx); err != nil {
				t.Fatal(err)
			}
			if errs := disk.check(ctx); len(errs) > 0 {
				t.Errorf("after the restart: %v", errors.Join(errs...))
			}
			mustCall(ctx, t, p, v, tc.retry)
			if v.box == "" {
				v.box = filepath.Join(home, "boxes", v.id)
			}
			next := tc.retry + 1
			e := newMountExpectation()
			e.expect(v, next)
			if errs := checkMounts(e, dir); len(errs) > 0 {
				t.Errorf("after the retried %s: %v", tc.retry, errors.Join(errs...))
			}
			if tc.readonly && publishedIn(next) {
				ms, _ := testenv.MountsUnder(v.target)
				for _, m := range ms {
					if m.MountPoint == v.target && !readOnly(m) {
						t.Errorf("volume published read-only is writable at %s after the retried %s (options %v)", v.target, tc.retry, m.MountOptions)
					}
				}
			}
			// Then the rest of the lifecycle, which must leave nothing.
			for s := next; s < stepDone; s++ {
				mustCall(ctx, t, p, v, s)
			}
			if errs := checkMounts(newMountExpectation(), dir); len(errs) > 0 {
				t.Errorf("after the lifecycle ended: %v", errors.Join(errs...))
				unmountAll(t, filepath.Join(dir, "kubelet"))
				unmountAll(t, home)
			}
			if _, err := os.Lstat(v.box); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("box %s survived DeleteVolume: %v", v.box, err)
			}
		})
	}
}

func mustCall(ctx context.Context, t *testing.T, p *proc, v *volume, s step) {
	t.Helper()
	if _, err := untilOK(ctx, abortedOrDown, func(ctx context.Context) error { return p.call(ctx, v, s) }); err != nil {
		t.Fatalf("%s %s: %v", s, v.name, err)
	}
}

func mustMount(t *testing.T, src, dst string, flags uintptr) {
	t.Helper()
	if err := unix.Mount(src, dst, "", flags, ""); err != nil {
		t.Fatalf("mount %s on %s (flags %#x): %v", src, dst, flags, err)
	}
}

// mustMountRO bind-mounts src on dst read-only, in the two mount(2)
// calls an earlier release made.
func mustMountRO(t *testing.T, src, dst string) {
	t.Helper()
	mustMount(t, src, dst, unix.MS_BIND)
	mustMount(t, "", dst, unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY)
}

func mustUnmount(t *testing.T, p string) {
	t.Helper()
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		t.Fatalf("unmount %s: %v", p, err)
	}
}
