package rootfs

import (
	"context"
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// smallHome mounts a tmpfs of the given size so the test controls how full
// the cache filesystem is.
func smallHome(t *testing.T, size string) string {
	t.Helper()
	testenv.RequireRoot(t, "it mounts a tmpfs home of known size")
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// fill installs a base of n MiB of real (allocated) bytes, last used age ago.
func fill(t *testing.T, c *Cache, k Key, mib int, age time.Duration) Base {
	t.Helper()
	b, err := c.Ensure(context.Background(), k, plainBuild(func(_ context.Context, out *os.File) error {
		_, err := out.Write(make([]byte, mib<<20))
		return err
	}))
	if err != nil {
		t.Fatal(err)
	}
	when := time.Now().Add(-age)
	if err := os.Chtimes(b.Path, when, when); err != nil {
		t.Fatal(err)
	}
	return b
}

// noBase fails the test if PrepareBox asks for a base: reusing a box must
// not need one.
func noBase(t *testing.T) func(context.Context) (Base, error) {
	return func(context.Context) (Base, error) {
		t.Error("PrepareBox asked for a base to reuse an existing box")
		return Base{}, errors.New("no base")
	}
}

func TestEvict(t *testing.T) {
	old := time.Hour
	cases := []struct {
		name string
		// setup installs bases into a 64 MiB cache filesystem and returns
		// the keys expected to be evicted, in order.
		setup    func(t *testing.T, c *Cache) []Key
		cfg      CacheConfig
		skipped  string
		survives []Key
	}{
		{
			name: "below the high watermark nothing goes",
			setup: func(t *testing.T, c *Cache) []Key {
				fill(t, c, testKey(1), 4, old)
				return nil
			},
			skipped:  "below the high watermark",
			survives: []Key{testKey(1)},
		},
		{
			name: "least recently used first, down to the low watermark",
			setup: func(t *testing.T, c *Cache) []Key {
				fill(t, c, testKey(1), 12, 3*old)
				fill(t, c, testKey(2), 12, 4*old)
				fill(t, c, testKey(3), 12, 2*old)
				fill(t, c, testKey(4), 12, old)
				// 48 of 64 MiB is over 50%; 30% is 19.2 MiB, so one stays.
				return []Key{testKey(2), testKey(1), testKey(3)}
			},
			survives: []Key{testKey(4)},
		},
		{
			name: "referenced, recent and in-use bases stay",
			setup: func(t *testing.T, c *Cache) []Key {
				ref := fill(t, c, testKey(1), 12, 9*old)
				box, _ := c.cfg.Home.Box("pvc-a")
				if _, err := PrepareBox(context.Background(), box, fixed(ref), 0); err != nil {
					t.Fatal(err)
				}
				fill(t, c, testKey(2), 12, time.Second) // inside the grace period
				fill(t, c, testKey(3), 12, 2*old)
				fill(t, c, testKey(4), 12, old)
				return []Key{testKey(3), testKey(4)}
			},
			survives: []Key{testKey(1), testKey(2)},
		},
		{
			// The seed skipped the whole pass when a box could not be read.
			// A pod can damage its own box at will, so that stopped
			// eviction for the node; now such a box pins nothing.
			name: "damaged boxes do not stop the pass, nor pin a base",
			setup: func(t *testing.T, c *Cache) []Key {
				for i := 1; i <= 4; i++ {
					fill(t, c, testKey(i), 12, time.Duration(5-i)*old)
				}
				// base/ a file (ENOTDIR), and base/rootfs.ext4 a symbolic
				// link to a cached base that nothing else uses.
				broken, _ := c.cfg.Home.Box("pvc-broken")
				if err := os.MkdirAll(broken.Root(), 0o755); err != nil {
					t.Fatal(err)
				}
				writeFile(t, broken.BaseDir(), []byte("x"))
				linked, _ := c.cfg.Home.Box("pvc-link")
				if err := os.MkdirAll(linked.BaseDir(), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(c.Path(testKey(1)), linked.BasePath()); err != nil {
					t.Fatal(err)
				}
				return []Key{testKey(1), testKey(2), testKey(3)}
			},
			survives: []Key{testKey(4)},
		},
		{
			name: "max size triggers below the watermark",
			cfg:  CacheConfig{MaxBytes: 10 << 20},
			setup: func(t *testing.T, c *Cache) []Key {
				fill(t, c, testKey(1), 4, 2*old)
				fill(t, c, testKey(2), 4, 3*old)
				fill(t, c, testKey(3), 4, old)
				// 12 MiB > 10 MiB; stop at 10*0.30/0.50 = 6 MiB.
				return []Key{testKey(2), testKey(1)}
			},
			survives: []Key{testKey(3)},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.Home = layout.NewHome(smallHome(t, "64m"), layout.Config{})
			cfg.HighWatermark, cfg.LowWatermark = 0.50, 0.30
			c, err := NewCache(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			want := tc.setup(t, c)
			st, err := c.Evict(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if st.Skipped != tc.skipped {
				t.Fatalf("skipped %q, want %q (stats %+v)", st.Skipped, tc.skipped, st)
			}
			if !slices.Equal(st.Evicted, want) {
				t.Fatalf("evicted %v, want %v", st.Evicted, want)
			}
			for _, k := range want {
				if _, err := os.Stat(c.Path(k)); !os.IsNotExist(err) {
					t.Errorf("%s still present: %v", k, err)
				}
			}
			for _, k := range tc.survives {
				if _, err := os.Stat(c.Path(k)); err != nil {
					t.Errorf("%s was evicted: %v", k, err)
				}
			}
			if len(want) > 0 {
				if used, _ := usedFraction(c.cfg.Home.Images().DiskImagesDir()); used > c.cfg.HighWatermark {
					t.Errorf("still %.2f full after eviction", used)
				}
			}
			// Boxes keep working whatever was evicted.
			ids, _ := c.cfg.Home.BoxIDs()
			for _, id := range ids {
				box, _ := c.cfg.Home.Box(id)
				if _, err := os.Stat(box.GuestRootfsDiskPath()); err == nil {
					if _, err := PrepareBox(context.Background(), box, noBase(t), 0); err != nil {
						t.Errorf("box %s broken after eviction: %v", id, err)
					}
				}
			}
		})
	}
}
