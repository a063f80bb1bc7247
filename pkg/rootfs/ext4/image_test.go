package ext4

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// want is the expected state of one path in a mounted image.
type want struct {
	typ      uint32 // S_IF* bits
	perm     uint32 // permission bits incl. setuid/setgid/sticky
	uid, gid uint32
	nlink    uint64 // 0: 1 for non-directories, computed for directories
	size     int64
	sha      string
	target   string
	rdev     uint64
	mtime    time.Time
	xattrs   map[string]string
}

func wantOf(e tentry) want {
	h := e.hdr
	w := want{perm: uint32(h.Mode & 0o7777), uid: uint32(h.Uid), gid: uint32(h.Gid), mtime: h.ModTime, target: h.Linkname}
	switch h.Typeflag {
	case tar.TypeReg:
		w.typ, w.size = syscall.S_IFREG, h.Size
		if e.data != nil {
			w.sha = sha256Of(e.data())
		} else {
			w.sha = sha256Of(bytes.NewReader(nil))
		}
	case tar.TypeDir:
		w.typ = syscall.S_IFDIR
	case tar.TypeSymlink:
		w.typ, w.perm = syscall.S_IFLNK, 0o777
	case tar.TypeChar, tar.TypeBlock:
		w.typ = map[byte]uint32{tar.TypeChar: syscall.S_IFCHR, tar.TypeBlock: syscall.S_IFBLK}[h.Typeflag]
		w.rdev = mkdev(uint64(h.Devmajor), uint64(h.Devminor))
	case tar.TypeFifo:
		w.typ = syscall.S_IFIFO
	}
	for k, v := range h.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if w.xattrs == nil {
				w.xattrs = map[string]string{}
			}
			w.xattrs[name] = v
		}
	}
	return w
}

// mkdev is glibc's makedev.
func mkdev(major, minor uint64) uint64 {
	return minor&0xff | (major&0xfff)<<8 | (minor&^0xff)<<12 | (major&^0xfff)<<32
}

func withXattrs(kv ...string) func(*tar.Header) {
	return func(h *tar.Header) {
		if h.PAXRecords == nil {
			h.PAXRecords = map[string]string{}
		}
		for i := 0; i < len(kv); i += 2 {
			h.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
		}
	}
}

func owner(uid, gid int) func(*tar.Header) {
	return func(h *tar.Header) { h.Uid, h.Gid = uid, gid }
}

// cyclicContent is cheap non-zero content for very large files: a random
// buffer of odd length repeated, so blocks differ from cycle to cycle.
func cyclicContent(seed uint64, size int64) func() io.Reader {
	return func() io.Reader {
		buf := make([]byte, 1<<20+4099)
		rand.NewChaCha8([32]byte{byte(seed)}).Read(buf)
		return io.LimitReader(&cyclic{buf: buf}, size)
	}
}

type cyclic struct {
	buf []byte
	off int
}

func (c *cyclic) Read(p []byte) (int, error) {
	n := copy(p, c.buf[c.off:])
	c.off = (c.off + n) % len(c.buf)
	return n, nil
}

// fragmentedContent alternates data blocks and zero blocks, which become
// holes: n data blocks give n extents, then a final hole.
func fragmentedContent(n int) (int64, func() io.Reader) {
	size := int64(2*n+3) * blockSize
	return size, func() io.Reader {
		var buf bytes.Buffer
		for i := range n {
			blk := bytes.Repeat([]byte{byte(i) | 1}, blockSize)
			binary.LittleEndian.PutUint32(blk, uint32(i))
			buf.Write(blk)
			buf.Write(make([]byte, blockSize))
		}
		buf.Write(make([]byte, 3*blockSize))
		return &buf
	}
}

func posixACL() string {
	le := binary.LittleEndian
	b := le.AppendUint32(nil, 2)
	for _, e := range []struct {
		tag, perm uint16
		id        uint32
	}{{1, 6, 0xffffffff}, {2, 4, 1000}, {4, 4, 0xffffffff}, {0x10, 4, 0xffffffff}, {0x20, 0, 0xffffffff}} {
		b = le.AppendUint16(b, e.tag)
		b = le.AppendUint16(b, e.perm)
		b = le.AppendUint32(b, e.id)
	}
	return string(b)
}

func TestImageEndToEnd(t *testing.T) {
	opts := Options{
		Headroom: 64 << 20,
		MinSize:  600 << 20, // several groups, so backup superblocks exist
		Label:    "rootfs-test",
		Time:     time.Unix(1710000000, 987654321),
	}
	capability := string([]byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}) // cap_net_raw+ep
	big600 := strings.Repeat("B", 600)
	big700 := strings.Repeat("C", 700)
	fragSize, fragData := fragmentedContent(1500) // > 1360 extents: a depth-2 tree

	root := dirE("./", 0o755)
	binLs := fileE("bin/ls", 0o755, []byte("ls binary"))
	binSu := fileE("bin/su", 0o4755, []byte("su binary"))
	binPing := fileE("bin/ping", 0o755, []byte("ping")).with(withXattrs("security.capability", capability, "user.big", big600))
	etc0 := dirE("etc", 0o755).with(withXattrs("user.dir", "1"))
	etc1 := dirE("etc", 0o750).with(withXattrs("user.dir", "2")).with(func(h *tar.Header) { h.ModTime = time.Unix(1600000000, 42) })
	passwd0 := fileE("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	passwd1 := fileE("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n"))
	shared1 := fileE("etc/shared1", 0o644, []byte("1")).with(withXattrs("user.big", big700, "user.small", "s"))
	shared2 := fileE("etc/shared2", 0o644, []byte("2")).with(withXattrs("user.big", big700, "user.small", "s"))
	trusted := fileE("etc/trusted", 0o600, []byte("t")).with(withXattrs("trusted.overlay.opaque", "y", "security.selinux", "system_u:object_r:etc_t:s0"))
	home := dirE("home/user", 0o700).with(owner(1000, 1000))
	notes := fileE("home/user/notes", 0o640, []byte("mine")).with(owner(1000, 1000))
	// Owners above 65535 need the high 16-bit fields; names with bytes
	// above 0x7f exercise the xattr hash's char signedness.
	intl := fileE("home/user/intl", 0o600, []byte("i")).with(owner(200000, 300001)).
		with(withXattrs("user.café", "crème", "user.naïve-big", big600))
	usrLib := dirE("usr/lib", 0o755)
	libfoo := fileE("lib/libfoo.so", 0o755, []byte("\x7fELF"))
	longTarget := strings.Repeat("a-rather-long-directory/", 5) + "target"
	five := genFileE("data/5m", 5<<20, randomContent(1, 5<<20))
	frag := genFileE("data/fragmented", fragSize, fragData)
	zeros := fileE("data/zeros", 0o644, make([]byte, 1<<20))
	old := genFileE("data/old", 3<<20, randomContent(2, 3<<20))
	acl := fileE("acl/file", 0o640, []byte("acl")).with(withXattrs("system.posix_acl_access", posixACL()))
	hlA := fileE("hl/a", 0o644, []byte("shared by hl/a and hl/b"))

	layer0 := []tentry{
		root, dirE("bin", 0o755), binLs, linkE("bin/dir", "bin/ls"), binSu, binPing,
		etc0, passwd0, shared1, shared2, trusted,
		home, notes, intl, usrLib, symlinkE("lib", "usr/lib"),
		symlinkE("short", "etc/passwd"), symlinkE("long", longTarget), symlinkE("abs", "/usr/lib"),
		fileE("data/empty", 0o644, nil), five, frag, zeros, old,
		devE("dev/null", tar.TypeChar, 1, 3).with(func(h *tar.Header) { h.Mode = 0o666 }),
		devE("dev/sda", tar.TypeBlock, 8, 0),
		devE("dev/big", tar.TypeChar, 300, 70000),
		devE("dev/fifo", tar.TypeFifo, 0, 0),
		fileE("opq/lower", 0o644, []byte("l")), fileE("opq/sub/lower", 0o644, []byte("l")),
		fileE("opq2/lower", 0o644, []byte("l")), fileE("opq2/sub/lower", 0o644, []byte("l")),
		fileE("wh/keep", 0o644, []byte("k")), fileE("wh/del", 0o644, []byte("d")), fileE("wh/deldir/x", 0o644, []byte("x")),
		fileE("gone/a", 0o644, []byte("a")), fileE("gone/b/c", 0o644, []byte("c")),
		fileE("replace-dir/x", 0o644, []byte("x")), fileE("replace-file", 0o644, []byte("f")),
		hlA, linkE("hl/b", "hl/a"),
		acl,
	}
	layer0 = append(layer0, manyFiles("many", 5000)...)
	var bigFile tentry
	if !testing.Short() {
		// Crosses the backup superblock area of group 1 and needs several
		// maximum-length extents.
		bigFile = genFileE("data/big", 130<<20, cyclicContent(3, 130<<20))
		layer0 = append(layer0, bigFile)
	}

	opqNew, opqSubNew := fileE("opq/new", 0o644, []byte("n")), fileE("opq/sub/new", 0o644, []byte("n"))
	opq2New, opq2SubNew := fileE("opq2/new", 0o644, []byte("n")), fileE("opq2/sub/new", 0o644, []byte("n"))
	replaceDir := fileE("replace-dir", 0o644, []byte("now a file"))
	replaceFile, replaceFileY := dirE("replace-file", 0o750), fileE("replace-file/y", 0o644, []byte("y"))
	layer1 := []tentry{
		fileE("wh/.wh.del", 0o644, nil), fileE("wh/.wh.deldir", 0o644, nil), fileE(".wh.gone", 0o644, nil),
		opqNew, fileE("opq/.wh..wh..opq", 0o644, nil), opqSubNew,
		opq2New, opq2SubNew, fileE("opq2/.wh..wh..opq", 0o644, nil),
		replaceDir, replaceFile, replaceFileY,
		passwd1, etc1, libfoo,
		linkE("bin/vdir", "bin/ls"),
		fileE("hl/.wh.a", 0o644, nil), fileE("data/.wh.old", 0o644, nil),
	}

	img, st := mustBuild(t, opts, layer0, layer1)

	// Expected tree.
	implicit := want{typ: syscall.S_IFDIR, perm: 0o755, mtime: opts.Time}
	wants := map[string]want{".": wantOf(root)}
	for _, e := range []tentry{
		dirE("bin", 0o755), binLs, binSu, binPing, etc1, passwd1, shared1, shared2, trusted,
		home, notes, intl, usrLib, symlinkE("lib", "usr/lib"),
		symlinkE("short", "etc/passwd"), symlinkE("long", longTarget), symlinkE("abs", "/usr/lib"),
		fileE("data/empty", 0o644, nil), five, frag, zeros,
		devE("dev/null", tar.TypeChar, 1, 3).with(func(h *tar.Header) { h.Mode = 0o666 }),
		devE("dev/sda", tar.TypeBlock, 8, 0), devE("dev/big", tar.TypeChar, 300, 70000), devE("dev/fifo", tar.TypeFifo, 0, 0),
		opqNew, opqSubNew, opq2New, opq2SubNew, fileE("wh/keep", 0o644, []byte("k")),
		replaceDir, replaceFile, replaceFileY, acl,
	} {
		wants[path.Clean(e.hdr.Name)] = wantOf(e)
	}
	for _, e := range manyFiles("many", 5000) {
		wants[e.hdr.Name] = wantOf(e)
	}
	if bigFile.data != nil {
		wants["data/big"] = wantOf(bigFile)
	}
	for _, d := range []string{"data", "dev", "home", "usr", "many", "opq", "opq/sub", "opq2", "opq2/sub", "wh", "hl", "acl"} {
		wants[d] = implicit
	}
	wants["lost+found"] = want{typ: syscall.S_IFDIR, perm: 0o700, mtime: opts.Time}
	ls := wantOf(binLs)
	ls.nlink = 3
	wants["bin/ls"], wants["bin/dir"], wants["bin/vdir"] = ls, ls, ls
	wants["usr/lib/libfoo.so"] = wantOf(libfoo)
	hl := wantOf(hlA)
	hl.nlink = 1
	wants["hl/b"] = hl

	t.Run("stats", func(t *testing.T) {
		if st.HardLinks != 2 || st.Specials != 4 || st.Symlinks != 4 {
			t.Errorf("stats = %+v", st)
		}
		if st.FreeBytes < opts.Headroom || st.ImageBytes < opts.MinSize || st.FreeInodes < minSpareInodes {
			t.Errorf("not enough free space or inodes: %+v", st)
		}
		fi, err := os.Stat(img)
		if err != nil || fi.Size() != st.ImageBytes {
			t.Errorf("image file size %v (%v), stats say %d", fi.Size(), err, st.ImageBytes)
		}
	})
	t.Run("e2fsck", func(t *testing.T) { fsck(t, img) })
	t.Run("dumpe2fs", func(t *testing.T) {
		h := dumpe2fsHeader(t, img)
		if f := h["Filesystem features"]; !strings.Contains(f, "has_journal") || !strings.Contains(f, "metadata_csum") {
			t.Errorf("features %q", f)
		}
		if h["Filesystem state"] != "clean" || h["Errors behavior"] != "Continue" {
			t.Errorf("state %q, errors %q", h["Filesystem state"], h["Errors behavior"])
		}
		if h["Filesystem volume name"] != opts.Label || h["Journal inode"] != "8" {
			t.Errorf("label %q, journal inode %q", h["Filesystem volume name"], h["Journal inode"])
		}
		free, _ := strconv.ParseInt(h["Free blocks"], 10, 64)
		if free*blockSize < opts.Headroom {
			t.Errorf("free blocks %d < headroom %d bytes", free, opts.Headroom)
		}
		if !strings.HasSuffix(h["Total journal size"], "M") {
			t.Errorf("journal size %q", h["Total journal size"])
		}
	})
	t.Run("extent tree depth", func(t *testing.T) {
		out, err := exec.Command(needTool(t, "debugfs"), "-R", "ex /data/fragmented", img).Output()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out), " 2/ 2 ") {
			t.Errorf("expected a depth-2 extent tree:\n%.600s", out)
		}
	})
	t.Run("mounted tree", func(t *testing.T) {
		dir, _ := mountImage(t, img, "ro")
		compareTree(t, dir, wants)
	})
	t.Run("read-write", func(t *testing.T) {
		dir, unmount := mountImage(t, img, "rw")
		content := randomContent(9, 10<<20)
		f, err := os.Create(filepath.Join(dir, "new-file"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(f, content()); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		for _, op := range []error{
			os.Mkdir(filepath.Join(dir, "new-dir"), 0o755),
			os.WriteFile(filepath.Join(dir, "new-dir", "small"), []byte("x"), 0o644),
			os.WriteFile(filepath.Join(dir, "many", "added"), []byte("x"), 0o644),
			os.Remove(filepath.Join(dir, "data", "5m")),
			os.Rename(filepath.Join(dir, "etc", "passwd"), filepath.Join(dir, "etc", "passwd.old")),
			syscall.Setxattr(filepath.Join(dir, "bin", "su"), "user.added", []byte("v"), 0),
		} {
			if op != nil {
				t.Fatal(op)
			}
		}
		// Top-level directories are spread over groups by the kernel, so
		// these land in groups whose inode bitmaps were never written.
		for i := range 16 {
			d := filepath.Join(dir, "top"+strconv.Itoa(i))
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, "f"), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		unmount()
		fsck(t, img)
		dir, _ = mountImage(t, img, "ro")
		f, err = os.Open(filepath.Join(dir, "new-file"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if got, want := sha256Of(f), sha256Of(content()); got != want {
			t.Errorf("new-file content changed across remount")
		}
	})
}

// compareTree checks that the tree under dir holds exactly wants.
func compareTree(t *testing.T, dir string, wants map[string]want) {
	t.Helper()
	subdirs := map[string]uint64{}
	for p, w := range wants {
		if w.typ == syscall.S_IFDIR && p != "." {
			subdirs[path.Dir(p)]++
		}
	}
	seen := map[string]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		seen[rel] = true
		w, ok := wants[rel]
		if !ok {
			t.Errorf("%s: unexpected", rel)
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if w.nlink == 0 {
			w.nlink = 1
			if w.typ == syscall.S_IFDIR {
				w.nlink = 2 + subdirs[rel]
			}
		}
		checkPath(t, p, rel, w)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range slices.Sorted(maps.Keys(wants)) {
		if !seen[p] {
			t.Errorf("%s: missing", p)
		}
	}
}

func checkPath(t *testing.T, p, rel string, w want) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Error(err)
		return
	}
	st := fi.Sys().(*syscall.Stat_t)
	if typ, perm := st.Mode&syscall.S_IFMT, st.Mode&0o7777; typ != w.typ || perm != w.perm {
		t.Errorf("%s: mode %o|%o, want %o|%o", rel, typ, perm, w.typ, w.perm)
	}
	if st.Uid != w.uid || st.Gid != w.gid {
		t.Errorf("%s: owner %d:%d, want %d:%d", rel, st.Uid, st.Gid, w.uid, w.gid)
	}
	if uint64(st.Nlink) != w.nlink {
		t.Errorf("%s: %d links, want %d", rel, st.Nlink, w.nlink)
	}
	if mtime := time.Unix(st.Mtim.Sec, st.Mtim.Nsec); !mtime.Equal(w.mtime) {
		t.Errorf("%s: mtime %v, want %v", rel, mtime, w.mtime)
	}
	switch w.typ {
	case syscall.S_IFREG:
		f, err := os.Open(p)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		if st.Size != w.size || sha256Of(f) != w.sha {
			t.Errorf("%s: content differs (size %d, want %d)", rel, st.Size, w.size)
		}
	case syscall.S_IFLNK:
		if target, err := os.Readlink(p); err != nil || target != w.target {
			t.Errorf("%s: symlink to %q (%v), want %q", rel, target, err, w.target)
		}
		return // no lgetxattr in package syscall
	case syscall.S_IFCHR, syscall.S_IFBLK:
		if st.Rdev != w.rdev {
			t.Errorf("%s: rdev %#x, want %#x", rel, st.Rdev, w.rdev)
		}
	}
	xs, err := xattrsOf(p)
	if err != nil {
		t.Errorf("%s: listing xattrs: %v", rel, err)
	}
	if len(xs) != 0 || len(w.xattrs) != 0 {
		if !maps.Equal(xs, w.xattrs) {
			t.Errorf("%s: xattrs %q, want %q", rel, xs, w.xattrs)
		}
	}
}

// TestReproducible checks that a fixed UUID and time give identical images.
func TestReproducible(t *testing.T) {
	opts := Options{UUID: [16]byte{1, 2, 3}, Time: time.Unix(1710000000, 0)}
	layer := append([]tentry{
		fileE("a", 0o644, []byte("a")).with(withXattrs("user.big", strings.Repeat("x", 300))),
		symlinkE("l", strings.Repeat("t", 100)),
	}, manyFiles("d", 300)...)
	var sums []string
	for range 2 {
		img, _ := mustBuild(t, opts, layer, []tentry{fileE(".wh.a", 0, nil)})
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		io.Copy(h, f)
		f.Close()
		sums = append(sums, string(h.Sum(nil)))
	}
	if sums[0] != sums[1] {
		t.Error("two builds with the same UUID and Time differ")
	}
}

// TestEmptyImage covers the smallest case: no layers at all.
func TestEmptyImage(t *testing.T) {
	img, st := mustBuild(t, Options{})
	if st.Dirs != 2 || st.Inodes != firstIno {
		t.Errorf("stats %+v", st)
	}
	fsck(t, img)
}

// TestImageIsSparse checks that data deleted by an upper layer is punched
// out of the image and that zero blocks are never written.
func TestImageIsSparse(t *testing.T) {
	layers := [][]tentry{
		{genFileE("secret", 8<<20, randomContent(5, 8<<20)), fileE("zeros", 0o644, make([]byte, 32<<20))},
		{fileE(".wh.secret", 0, nil)},
	}
	img, st := mustBuild(t, Options{Headroom: 256 << 20}, layers...)
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if allocated := fi.Sys().(*syscall.Stat_t).Blocks * 512; allocated > 2<<20 {
		t.Errorf("image of %d MiB has %d KiB allocated, want < 2 MiB", st.ImageBytes>>20, allocated>>10)
	}
	fsck(t, img)
}

func TestCanceled(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := NewWriter(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := tarStream([]tentry{fileE("a", 0o644, []byte("a"))})
	defer io.Copy(io.Discard, r)
	if err := b.ApplyLayer(ctx, r); !errors.Is(err, context.Canceled) {
		t.Fatalf("ApplyLayer with a canceled context: %v", err)
	}
	if _, err := b.Finish(context.Background()); !errors.Is(err, context.Canceled) {
		t.Fatalf("Finish after a canceled layer: %v", err)
	}
}

// TestHeadroomRatio checks the free space grows with the content, so the
// default can be upstream's content*1.1 + 64 MiB.
func TestHeadroomRatio(t *testing.T) {
	cases := []struct {
		ratio    float64
		headroom int64
		content  int64
	}{
		{0, 1 << 20, 16 << 20},
		{0.1, 64 << 20, 16 << 20},
		{1, 0, 16 << 20},
	}
	for _, tc := range cases {
		layer := []tentry{genFileE("data", tc.content, randomContent(7, tc.content))}
		img, st := mustBuild(t, Options{Headroom: tc.headroom, HeadroomRatio: tc.ratio}, layer)
		want := tc.headroom + int64(float64(tc.content)*tc.ratio)
		if st.FreeBytes < want {
			t.Errorf("ratio %v headroom %d: %d bytes free, want at least %d", tc.ratio, tc.headroom, st.FreeBytes, want)
		}
		if st.FreeBytes > want+64<<20 {
			t.Errorf("ratio %v headroom %d: %d bytes free, far more than the %d asked for", tc.ratio, tc.headroom, st.FreeBytes, want)
		}
		fsck(t, img)
	}
}
