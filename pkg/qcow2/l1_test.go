package qcow2

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// setIncompat ORs bits into a version 3 image's incompatible_features.
func setIncompat(t *testing.T, p string, bits uint64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], offIncompatibleFeatures); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(be64(binary.BigEndian.Uint64(b[:])|bits), offIncompatibleFeatures); err != nil {
		t.Fatal(err)
	}
}

// qemuTopData asks QEMU whether the top image maps any guest cluster:
// "data" if `qemu-img map` reports an extent at depth 0, "none" if every
// extent comes from the backing file, "" if QEMU cannot open the image.
// QEMU opens a corrupt-flagged image read-only, which is all map needs.
func qemuTopData(t *testing.T, qemuImg, p string) string {
	t.Helper()
	out, err := exec.Command(qemuImg, "map", "-f", "qcow2", "--output=json", p).Output()
	if err != nil {
		return ""
	}
	var extents []struct {
		Depth   int  `json:"depth"`
		Present bool `json:"present"`
	}
	if err := json.Unmarshal(out, &extents); err != nil {
		t.Fatalf("qemu-img map %s: %v\n%s", p, err, out)
	}
	for _, e := range extents {
		if e.Depth == 0 && e.Present {
			return "data"
		}
	}
	return "none"
}

// TestProbeL1 decides, for real images, whether discarding one could lose
// guest data, and QEMU judges: whenever ProbeL1 says Empty, `qemu-img map`
// must show no cluster of the top image. The cases where ProbeL1 says "may
// hold data" although QEMU sees none are the conservative ones, and each
// says why.
func TestProbeL1(t *testing.T) {
	qemuImg := needQemu(t, "qemu-img")
	qemuIO := needQemu(t, "qemu-io")
	qio := func(cmd string) func(t *testing.T, p string) {
		return func(t *testing.T, p string) { run(t, qemuIO, "-f", "qcow2", "-c", cmd, p) }
	}
	corrupt := func(t *testing.T, p string) { setIncompat(t, p, IncompatCorrupt) }
	seq := func(fs ...func(*testing.T, string)) func(*testing.T, string) {
		return func(t *testing.T, p string) {
			for _, f := range fs {
				f(t, p)
			}
		}
	}
	at := func(off int64, b []byte) func(*testing.T, string) {
		return func(t *testing.T, p string) { patch(t, p, off, b) }
	}
	replace := func(b []byte) func(*testing.T, string) {
		return func(t *testing.T, p string) { must(t, os.WriteFile(p, b, 0o644)) }
	}
	truncAtL1 := func(t *testing.T, p string) {
		h, err := ReadHeader(p)
		must(t, err)
		must(t, os.Truncate(p, int64(h.L1TableOffset)+4))
	}
	cases := []struct {
		name   string
		qemu   bool   // create with qemu-img instead of our writer
		compat string // qemu-img -o compat=
		size   uint64
		mutate func(t *testing.T, p string)
		empty  bool
		reason string // substring of Reason
		// conservative: QEMU sees no data, but ProbeL1 cannot prove it.
		conservative bool
	}{
		{name: "fresh overlay (our writer)", empty: true, reason: "all 2 entries"},
		{name: "fresh overlay (qemu-img create)", qemu: true, empty: true, reason: "are zero"},
		{name: "64 KiB written", mutate: qio("write -P 0xab 0 64k"), reason: "L1 entry 0 is"},
		{name: "64 KiB written at 600 MiB", mutate: qio("write -P 0xab 600M 64k"), reason: "L1 entry 1 is"},
		{name: "zeros written (a zero cluster is data over the base)", mutate: qio("write -z 0 64k"), reason: "L1 entry 0 is"},
		{name: "64 KiB discarded (a zero cluster hides the base)", mutate: qio("discard 0 64k"), reason: "L1 entry 0 is"},
		{name: "last cluster of a 64 TiB overlay (L1 read in chunks)", size: 64 << 40, mutate: qio("write -P 0xab 70368744112128 64k"), reason: "L1 entry 131071 is"},
		{name: "corrupt-flagged, nothing written", mutate: corrupt, empty: true},
		{name: "corrupt-flagged after a write", mutate: seq(qio("write -P 0xab 0 64k"), corrupt), reason: "L1 entry 0 is"},
		{name: "unknown incompatible bit, nothing written", mutate: func(t *testing.T, p string) { setIncompat(t, p, 1<<40) }, empty: true},
		{name: "internal snapshot of an empty image", qemu: true, mutate: func(t *testing.T, p string) { run(t, qemuImg, "snapshot", "-c", "s1", p) }, reason: "1 internal snapshots", conservative: true},
		{name: "external data file bit", mutate: func(t *testing.T, p string) { setIncompat(t, p, IncompatExternalData) }, reason: "external data file"},
		{name: "l1_size 0", mutate: at(offL1Size, be32(0)), empty: true, reason: "l1_size 0"},
		{name: "l1_size beyond QEMU's limit", mutate: at(offL1Size, be32(MaxL1Entries+1)), reason: "exceeds"},
		{name: "l1_size 2^32-1", mutate: at(offL1Size, be32(^uint32(0))), reason: "exceeds"},
		{name: "L1 offset unaligned", mutate: at(offL1TableOffset, be64(3*ClusterSize+8)), reason: "unaligned"},
		// QEMU reads this "L1 table" from the header itself; ProbeL1 will not.
		{name: "L1 offset zero", mutate: at(offL1TableOffset, be64(0)), reason: "zero or unaligned", conservative: true},
		{name: "L1 offset near 2^64", mutate: at(offL1TableOffset, be64(^uint64(0)&^(ClusterSize-1))), reason: "runs past the end"},
		// QEMU reads the missing part as zeros; ProbeL1 reads no table the
		// file does not hold.
		{name: "cut inside the L1 table", mutate: truncAtL1, reason: "runs past the end", conservative: true},
		{name: "cluster_bits 30", mutate: at(offClusterBits, be32(30)), reason: "cluster_bits 30"},
		{name: "version 4", mutate: at(offVersion, be32(4)), reason: "version 4"},
		{name: "magic gone", mutate: at(0, []byte("XXXX")), reason: "no qcow2 magic"},
		{name: "256 KiB of zeros", mutate: replace(make([]byte, 256<<10)), reason: "no qcow2 magic"},
		{name: "10 bytes", mutate: replace(make([]byte, 10)), empty: true, reason: "too short"},
		{name: "cut to 100 bytes", mutate: func(t *testing.T, p string) { must(t, os.Truncate(p, 100)) }, empty: true, reason: "too short"},
		{name: "512 bytes of 0xff", mutate: replace([]byte(strings.Repeat("\xff", 512))), empty: true, reason: "too short"},
		{name: "513 bytes of 0xff", mutate: replace([]byte(strings.Repeat("\xff", 513))), reason: "no qcow2 magic"},
		{name: "version 2, nothing written", qemu: true, compat: "0.10", empty: true},
		{name: "version 2 after a write", qemu: true, compat: "0.10", mutate: qio("write -P 0xab 0 64k"), reason: "L1 entry 0 is"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			writeBase(t, filepath.Join(dir, "base.raw"), 1<<20)
			size := tc.size
			if size == 0 {
				size = 1 << 30
			}
			p := filepath.Join(dir, "o.qcow2")
			if tc.qemu {
				args := []string{"create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw"}
				if tc.compat != "" {
					args = append(args, "-o", "compat="+tc.compat)
				}
				run(t, qemuImg, append(args, p, "1G")...)
			} else {
				newOverlay(t, dir, "o.qcow2", OverlayOptions{BackingFile: "base.raw", Size: size})
			}
			if tc.mutate != nil {
				tc.mutate(t, p)
			}
			f, err := os.Open(p)
			must(t, err)
			defer f.Close()
			got, err := ProbeL1File(f)
			if err != nil {
				t.Fatal(err)
			}
			if got.Empty != tc.empty || !strings.Contains(got.Reason, tc.reason) {
				t.Fatalf("ProbeL1 = %+v, want empty=%v with a reason mentioning %q", got, tc.empty, tc.reason)
			}
			switch q := qemuTopData(t, qemuImg, p); {
			case q == "":
				// QEMU cannot open it either; nothing to compare.
			case got.Empty && q != "none":
				t.Fatalf("ProbeL1 says empty, but QEMU maps data in the top image")
			case !got.Empty && q == "none" && !tc.conservative:
				t.Fatalf("ProbeL1 says %q, but QEMU maps nothing in the top image", got.Reason)
			case !got.Empty && q == "data" && tc.conservative:
				t.Fatalf("case marked conservative, but QEMU maps data")
			}
		})
	}
}

func TestProbeL1ReadFailure(t *testing.T) {
	_, err := ProbeL1("dev", failingReader{}, 1<<20)
	if !IsIO(err) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("err = %v, want an I/O error wrapping EIO", err)
	}
}
