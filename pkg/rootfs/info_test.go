package rootfs

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// plainBuild is a build that records nothing about the base beyond its
// key: for tests about the disk, not its record.
func plainBuild(build func(ctx context.Context, out *os.File) error) BuildFunc {
	return func(ctx context.Context, out *os.File) (BaseInfo, error) {
		return BaseInfo{}, build(ctx, out)
	}
}

// infoBuild writes a small disk and records info with it.
func infoBuild(info BaseInfo) BuildFunc {
	return func(_ context.Context, out *os.File) (BaseInfo, error) {
		_, err := out.WriteString("disk")
		return info, err
	}
}

var sampleInfo = BaseInfo{
	IndexDigest: "sha256:" + strings.Repeat("c", 64),
	Anonymous:   true,
	Config: source.Config{
		Env:        []source.EnvVar{{Name: "PATH", Value: "/bin"}},
		Entrypoint: []string{"/bin/sh"},
		Cmd:        []string{"-c", "true"},
		WorkingDir: "/work",
		User:       "1000",
	},
}

func withKey(info BaseInfo, k Key) BaseInfo {
	info.Digest, info.Builder = k.Digest, k.Builder
	return info
}

// TestBaseInfoInstalledWithBase: a build's record is in place, whole,
// when its base is, and reads back as written with the key filled in.
func TestBaseInfoInstalledWithBase(t *testing.T) {
	c := newCache(t, t.TempDir())
	k := testKey(1)
	if _, err := c.Ensure(context.Background(), k, infoBuild(sampleInfo)); err != nil {
		t.Fatal(err)
	}
	got, err := c.Info(k)
	if err != nil {
		t.Fatal(err)
	}
	if want := withKey(sampleInfo, k); !reflect.DeepEqual(got, want) {
		t.Fatalf("Info = %+v, want %+v", got, want)
	}
	raw, err := os.ReadFile(filepath.Join(c.cfg.Home.Images().DiskImagesDir(), k.FileName()+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(raw, &v); err != nil || v.Version != baseInfoVersion {
		t.Fatalf("record %s: version %d, %v", raw, v.Version, err)
	}
	assertNoTemps(t, c)
}

// TestBaseInfoNeverWithoutBase: a failed build leaves no record, and a
// record that cannot be written stops the base from being installed, so
// no base is ever installed without its record.
func TestBaseInfoNeverWithoutBase(t *testing.T) {
	c := newCache(t, t.TempDir())
	k := testKey(2)
	_, err := c.Ensure(context.Background(), k, func(context.Context, *os.File) (BaseInfo, error) {
		return sampleInfo, errors.New("registry went away")
	})
	if err == nil {
		t.Fatal("a failed build succeeded")
	}
	if _, err := os.Lstat(c.InfoPath(k)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a failed build left a record: %v", err)
	}

	// A directory where the record goes: renaming the record fails.
	k = testKey(3)
	if err := os.MkdirAll(filepath.Join(c.InfoPath(k), "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err = c.Ensure(context.Background(), k, infoBuild(sampleInfo))
	if err == nil || !strings.Contains(err.Error(), "record of base") {
		t.Fatalf("Ensure with an unwritable record = %v, want the record's error", err)
	}
	if _, err := os.Lstat(c.Path(k)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a base was installed without its record: %v", err)
	}
	assertNoTemps(t, c)
}

// TestBaseInfoEvictedWithBase: eviction takes the record with its base.
func TestBaseInfoEvictedWithBase(t *testing.T) {
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{}), MaxBytes: 1, Grace: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	k := testKey(4)
	b, err := c.Ensure(context.Background(), k, func(_ context.Context, out *os.File) (BaseInfo, error) {
		_, err := out.Write(make([]byte, 1<<20))
		return sampleInfo, err
	})
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(b.Path, old, old); err != nil {
		t.Fatal(err)
	}
	st, err := c.Evict(context.Background())
	if err != nil || len(st.Evicted) != 1 {
		t.Fatalf("Evict = %+v, %v; want the base evicted", st, err)
	}
	if _, err := os.Lstat(c.InfoPath(k)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("eviction left the base's record: %v", err)
	}
}

// TestBaseInfoStartupCleanup: start-up removes a record whose base is gone
// and a record's temp file, but not those of a build in flight elsewhere
// (its key lock is held), nor the record of an installed base.
func TestBaseInfoStartupCleanup(t *testing.T) {
	home := t.TempDir()
	c := newCache(t, home)
	kept, orphan, live := testKey(5), testKey(6), testKey(7)
	if _, err := c.Ensure(context.Background(), kept, infoBuild(sampleInfo)); err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{orphan, live} {
		if err := c.writeInfo(k, sampleInfo); err != nil {
			t.Fatal(err)
		}
	}
	staleTemp := filepath.Join(c.cfg.Home.TempDir(), orphan.FileName()+".json.123.tmp")
	liveTemp := filepath.Join(c.cfg.Home.TempDir(), live.FileName()+".json.456.tmp")
	for _, p := range []string{staleTemp, liveTemp} {
		if err := os.WriteFile(p, []byte("{"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	l, ok, err := tryLock(c.lockPath(live))
	if err != nil || !ok {
		t.Fatalf("lock %s: %v %v", live, ok, err)
	}
	defer l.release()

	c = newCache(t, home)
	for _, tc := range []struct {
		path string
		want bool
	}{
		{c.InfoPath(kept), true},
		{c.InfoPath(orphan), false},
		{staleTemp, false},
		{c.InfoPath(live), true},
		{liveTemp, true},
	} {
		_, err := os.Lstat(tc.path)
		if got := err == nil; got != tc.want {
			t.Errorf("%s exists after start-up: %v, want %v (%v)", tc.path, got, tc.want, err)
		}
	}
	if _, err := c.Info(kept); err != nil {
		t.Errorf("the record of an installed base: %v", err)
	}
}

// TestBaseInfoDamaged: a record that is missing, malformed, about another
// base, of another format, oversized, or not a regular file is refused
// with an error naming it, quickly (a FIFO must not block the read).
func TestBaseInfoDamaged(t *testing.T) {
	k := testKey(8)
	good, err := json.Marshal(baseInfoFile{Version: baseInfoVersion, BaseInfo: withKey(sampleInfo, k)})
	if err != nil {
		t.Fatal(err)
	}
	rewrite := func(f func(m map[string]any)) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			var m map[string]any
			if err := json.Unmarshal(good, &m); err != nil {
				t.Fatal(err)
			}
			f(m)
			b, _ := json.Marshal(m)
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	write := func(b []byte) func(t *testing.T, p string) {
		return func(t *testing.T, p string) {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name    string
		damage  func(t *testing.T, p string)
		missing bool
	}{
		{"missing", func(t *testing.T, p string) {}, true},
		{"empty", write(nil), false},
		{"garbage", write([]byte("\x00\xff not json")), false},
		{"truncated", write(good[:len(good)/2]), false},
		{"a JSON array", write([]byte(`[1,2]`)), false},
		{"no version", rewrite(func(m map[string]any) { delete(m, "version") }), false},
		{"a newer version", rewrite(func(m map[string]any) { m["version"] = baseInfoVersion + 1 }), false},
		{"another digest", rewrite(func(m map[string]any) { m["digest"] = testKey(9).Digest }), false},
		{"another builder", rewrite(func(m map[string]any) { m["builder"] = "t2" }), false},
		{"a bad index digest", rewrite(func(m map[string]any) { m["indexDigest"] = "sha256:../../etc" }), false},
		{"config of the wrong type", rewrite(func(m map[string]any) { m["config"] = "x" }), false},
		{"anonymous of the wrong type", rewrite(func(m map[string]any) { m["anonymous"] = "true" }), false},
		{"oversized", write([]byte(`{"version":1,"pad":"` + strings.Repeat("x", maxBaseInfoBytes) + `"}`)), false},
		{"a symbolic link to a good record", func(t *testing.T, p string) {
			target := filepath.Join(t.TempDir(), "good.json")
			write(good)(t, target)
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"a FIFO", func(t *testing.T, p string) {
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"a directory", func(t *testing.T, p string) {
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, t.TempDir())
			if _, err := c.Ensure(context.Background(), k, infoBuild(sampleInfo)); err != nil {
				t.Fatal(err)
			}
			p := c.InfoPath(k)
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, p)
			done := make(chan error, 1)
			go func() {
				_, err := c.Info(k)
				done <- err
			}()
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("Info blocked")
			}
			switch {
			case tc.missing && !errors.Is(err, fs.ErrNotExist):
				t.Fatalf("Info = %v, want fs.ErrNotExist", err)
			case !tc.missing && !errors.Is(err, ErrDamagedInfo):
				t.Fatalf("Info = %v, want ErrDamagedInfo", err)
			}
			if !strings.Contains(err.Error(), p) {
				t.Errorf("Info = %v, which does not name %s", err, p)
			}
			// The base itself is still there for callers that can check
			// its image against a registry.
			if _, ok, err := c.Lookup(k); !ok || err != nil {
				t.Errorf("Lookup = %v, %v", ok, err)
			}
		})
	}
}

// TestFindByIndex: a base is found by the index its record names, only if
// the base is installed, and a damaged record elsewhere does not stop the
// search.
func TestFindByIndex(t *testing.T) {
	c := newCache(t, t.TempDir())
	index := "sha256:" + strings.Repeat("d", 64)
	other := sampleInfo
	other.IndexDigest = "sha256:" + strings.Repeat("e", 64)
	want := sampleInfo
	want.IndexDigest = index
	for _, b := range []struct {
		k    Key
		info BaseInfo
	}{{testKey(10), other}, {testKey(11), want}, {Key{Digest: testKey(12).Digest, Builder: "t2"}, want}} {
		if _, err := c.Ensure(context.Background(), b.k, infoBuild(b.info)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(c.InfoPath(testKey(10)), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A record whose base is gone finds nothing.
	if err := c.writeInfo(testKey(13), want); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, index, builder string
		want                 Key
		found                bool
	}{
		{"by its index", index, "t1", testKey(11), true},
		{"by the other builder's", index, "t2", Key{Digest: testKey(12).Digest, Builder: "t2"}, true},
		{"an index nothing came from", "sha256:" + strings.Repeat("f", 64), "t1", Key{}, false},
		{"behind a damaged record", other.IndexDigest, "t1", Key{}, false},
		{"not a digest", "sha256:../x", "t1", Key{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, info, ok, err := c.FindByIndex(tc.index, tc.builder)
			if err != nil || ok != tc.found || b.Key != tc.want {
				t.Fatalf("FindByIndex = %+v, %v, %v; want %v, %v", b, ok, err, tc.want, tc.found)
			}
			if ok && (info.IndexDigest != tc.index || info.Digest != tc.want.Digest || b.Path != c.Path(tc.want)) {
				t.Errorf("FindByIndex found %+v at %s", info, b.Path)
			}
		})
	}
}

// TestRecordInfo: a base without a record gets one; nothing is written
// for a base that is not installed, or while its key lock is held.
func TestRecordInfo(t *testing.T) {
	c := newCache(t, t.TempDir())
	k := testKey(14)
	if ok, err := c.RecordInfo(k, sampleInfo); ok || err != nil {
		t.Fatalf("RecordInfo with no base = %v, %v", ok, err)
	}
	if _, err := os.Lstat(c.InfoPath(k)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a record was written for no base: %v", err)
	}
	if _, err := c.Ensure(context.Background(), k, infoBuild(BaseInfo{})); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(c.InfoPath(k)); err != nil {
		t.Fatal(err)
	}
	l, _, err := tryLock(c.lockPath(k))
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := c.RecordInfo(k, sampleInfo); ok || err != nil {
		t.Errorf("RecordInfo under a held lock = %v, %v", ok, err)
	}
	l.release()
	if ok, err := c.RecordInfo(k, sampleInfo); !ok || err != nil {
		t.Fatalf("RecordInfo = %v, %v", ok, err)
	}
	if got, err := c.Info(k); err != nil || !reflect.DeepEqual(got, withKey(sampleInfo, k)) {
		t.Fatalf("Info after RecordInfo = %+v, %v", got, err)
	}
	assertNoTemps(t, c)
}

// FuzzParseBaseInfo feeds bytes to the base record parser. Records are the
// plugin's own files, but a damaged one must never panic the plugin, and
// whatever is accepted must be this release's record of this base.
func FuzzParseBaseInfo(f *testing.F) {
	k := testKey(1)
	good, err := json.Marshal(baseInfoFile{Version: baseInfoVersion, BaseInfo: withKey(sampleInfo, k)})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"version":1,"digest":"` + k.Digest + `","builder":"t1","anonymous":true,"config":{"env":[{"name":"A","value":"B"}]}}`))
	f.Add([]byte(`{"version":2,"digest":"` + k.Digest + `","builder":"t1"}`))
	f.Add([]byte(`{"version":1,"digest":"` + k.Digest + `","builder":"t1","indexDigest":"sha256:x"}`))
	f.Add([]byte(`{"version":1e400}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		const where = "/home/images/disk-images/x.json"
		info, err := ParseBaseInfo(b, k, where)
		if err != nil {
			if !errors.Is(err, ErrDamagedInfo) || !strings.Contains(err.Error(), where) {
				t.Fatalf("refusal %v does not name the file or is not ErrDamagedInfo", err)
			}
			return
		}
		if info.Digest != k.Digest || info.Builder != k.Builder {
			t.Fatalf("accepted a record of another base: %+v", info)
		}
		if info.IndexDigest != "" && !digestRE.MatchString(info.IndexDigest) {
			t.Fatalf("accepted index digest %q", info.IndexDigest)
		}
	})
}
