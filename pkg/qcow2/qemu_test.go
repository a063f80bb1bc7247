package qcow2

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// needQemu returns the path of a qemu-utils tool: parity can only be
// judged by QEMU itself.
func needQemu(t *testing.T, tool string) string {
	t.Helper()
	return testenv.RequireTool(t, tool, "apt-get install qemu-utils")
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func sha256File(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// writeBase writes a raw base of random bytes, so a read that fell through
// to anything else (zeros, the wrong file) would not compare equal.
func writeBase(t *testing.T, p string, size int) {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

type qemuInfo struct {
	VirtualSize           uint64 `json:"virtual-size"`
	Format                string `json:"format"`
	BackingFilename       string `json:"backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
	FullBackingFilename   string `json:"full-backing-filename"`
}

func TestQemuParity(t *testing.T) {
	qemuImg := needQemu(t, "qemu-img")
	sizes := []struct {
		name string
		size uint64
	}{
		{"1MiB", 1 << 20},
		{"512MiB+1", 512<<20 + 1},
		{"10GiB", 10 << 30},
		{"2TiB", 2 << 40},
		{"64TiB", 64 << 40},
	}
	for _, sz := range sizes {
		t.Run(sz.name, func(t *testing.T) {
			t.Parallel()
			// The box shape: the overlay in disks/, the base reached by a
			// relative name through ../base/.
			box := t.TempDir()
			base := filepath.Join(box, "base", "rootfs.ext4")
			writeBase(t, base, 1<<20)
			baseSum := sha256File(t, base)
			overlay := filepath.Join(box, "disks", "guest-rootfs.qcow2")
			if err := os.Mkdir(filepath.Dir(overlay), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := CreateOverlay(context.Background(), overlay, OverlayOptions{
				BackingFile: "../base/rootfs.ext4", BackingFormat: FormatRaw, Size: sz.size,
			}); err != nil {
				t.Fatal(err)
			}

			out := run(t, qemuImg, "check", overlay)
			if !strings.Contains(out, "No errors were found") {
				t.Fatalf("qemu-img check: %s", out)
			}
			var info qemuInfo
			if err := json.Unmarshal([]byte(run(t, qemuImg, "info", "--output=json", overlay)), &info); err != nil {
				t.Fatal(err)
			}
			if info.Format != "qcow2" || info.BackingFilename != "../base/rootfs.ext4" || info.BackingFilenameFormat != "raw" {
				t.Fatalf("qemu-img info: %+v", info)
			}
			if want := (sz.size + 511) &^ 511; info.VirtualSize != want {
				t.Fatalf("qemu sees virtual size %d, want %d", info.VirtualSize, want)
			}
			if info.FullBackingFilename != base && !strings.HasSuffix(info.FullBackingFilename, "disks/../base/rootfs.ext4") {
				t.Fatalf("qemu resolved the backing to %q, want %s", info.FullBackingFilename, base)
			}
			out = run(t, qemuImg, "compare", overlay, base)
			if !strings.Contains(out, "Images are identical") {
				t.Fatalf("qemu-img compare: %s", out)
			}
			if sha256File(t, base) != baseSum {
				t.Fatal("base changed")
			}
		})
	}
}

// TestQemuWriteThroughChain writes through QEMU's block layer, reads the
// pattern back through the chain, and checks the base never changed.
func TestQemuWriteThroughChain(t *testing.T) {
	qemuImg := needQemu(t, "qemu-img")
	qemuIO := needQemu(t, "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	writeBase(t, base, 1<<20)
	baseSum := sha256File(t, base)
	overlay := newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: "base.raw", Size: 1 << 20})

	run(t, qemuIO, "-f", "qcow2", "-c", "write -P 0xab 0 64k", overlay)
	// read -P fails unless every byte matches the pattern.
	run(t, qemuIO, "-f", "qcow2", "-c", "read -P 0xab 0 64k", overlay)
	// Bytes past the write still come from the base: compare them.
	out := run(t, qemuIO, "-f", "qcow2", "-c", "read -v 65536 16", overlay)
	b, _ := os.ReadFile(base)
	wantHex := strings.ToLower(strings.TrimSpace(hexBytes(b[65536 : 65536+16])))
	if !strings.Contains(strings.ToLower(out), wantHex) {
		t.Fatalf("read past the write did not fall through to the base:\n%s\nwant %s", out, wantHex)
	}
	if sha256File(t, base) != baseSum {
		t.Fatal("base changed after writing to the overlay")
	}
	if out := run(t, qemuImg, "check", overlay); !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check after write: %s", out)
	}
	// The header QEMU left must still verify as ours.
	if _, err := Verify(overlay, Expect{BackingFile: "base.raw", BackingFormat: FormatRaw}); err != nil {
		t.Fatalf("Verify after QEMU wrote: %v", err)
	}
}

func hexBytes(b []byte) string {
	var s []string
	for _, c := range b {
		s = append(s, strconv.FormatUint(uint64(c)|0x100, 16)[1:])
	}
	return strings.Join(s, " ")
}

// TestReadQemuImages parses images that qemu-img made: relative and
// absolute names, raw and qcow2 backings, version 2 and 3.
func TestReadQemuImages(t *testing.T) {
	qemuImg := needQemu(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	writeBase(t, base, 1<<20)
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, path    string
		args          []string
		backing       string
		backingFormat string
		version       uint32
		size          uint64
	}{
		{"relative raw", filepath.Join(dir, "rel.qcow2"), []string{"-F", "raw", "-b", "base.raw"}, "base.raw", "raw", 3, 1 << 20},
		{"relative up a directory", filepath.Join(sub, "up.qcow2"), []string{"-F", "raw", "-b", "../base.raw"}, "../base.raw", "raw", 3, 1 << 20},
		{"absolute raw", filepath.Join(dir, "abs.qcow2"), []string{"-F", "raw", "-b", base}, base, "raw", 3, 1 << 20},
		{"qcow2 backing", filepath.Join(dir, "top.qcow2"), []string{"-F", "qcow2", "-b", "rel.qcow2"}, "rel.qcow2", "qcow2", 3, 1 << 20},
		{"version 2", filepath.Join(dir, "v2.qcow2"), []string{"-o", "compat=0.10", "-F", "raw", "-b", "base.raw"}, "base.raw", "raw", 2, 1 << 20},
		{"bigger than backing", filepath.Join(dir, "big.qcow2"), []string{"-F", "raw", "-b", "base.raw"}, "base.raw", "raw", 3, 10 << 30},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"create", "-q", "-f", "qcow2"}, tc.args...)
			args = append(args, tc.path, strconv.FormatUint(tc.size, 10))
			run(t, qemuImg, args...)
			h, err := ReadHeader(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if h.BackingFile != tc.backing || h.BackingFormat != tc.backingFormat || h.Version != tc.version || h.Size != tc.size {
				t.Fatalf("header = %+v", h)
			}
			chain, err := Chain(context.Background(), tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if last := chain[len(chain)-1]; last.Format != FormatRaw || filepath.Clean(last.Path) != base {
				t.Fatalf("chain ends at %+v, want raw %s", last, base)
			}
		})
	}
	// Our overlay on top of QEMU's qcow2: QEMU must see a three-link chain.
	ours := newOverlay(t, dir, "ours.qcow2", OverlayOptions{BackingFile: "top.qcow2", BackingFormat: FormatQcow2})
	out := run(t, qemuImg, "info", "--backing-chain", ours)
	for _, want := range []string{"ours.qcow2", "top.qcow2", "rel.qcow2", "base.raw"} {
		if !strings.Contains(out, want) {
			t.Fatalf("qemu-img info --backing-chain lacks %s:\n%s", want, out)
		}
	}
	chain, err := Chain(context.Background(), ours)
	if err != nil || len(chain) != 4 {
		t.Fatalf("Chain = %d links, %v; want 4", len(chain), err)
	}
}
