package e2e

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// guestModules is the order the guest must load Debian's modular ext4 and
// virtio-blk drivers in (dependencies first).
var guestModules = []string{
	"crc16", "crc32c_generic", "mbcache", "jbd2", "ext4",
	"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
}

// guestMarkerFile is what the guest writes on its root disk.
const guestMarkerFile = "/e2e-guest-wrote-this"

type guest struct{ kernel, initrd string }

// guestFillFile is what the guest writes when told e2e_fill=1: 1 GiB of
// zeros, far more than the base's own size, so it fits only because the
// plugin grew the filesystem to the claim's size.
const (
	guestFillFile = "/e2e-fill"
	guestFillMiB  = 1024
)

// guestGrow is where the initramfs keeps cmd/ext4grow.
const guestGrow = "/bin/ext4grow"

// guestInit is the initramfs's /init: it mounts the box's root disk,
// prints the marker an earlier guest left there ("E2E-GUEST found ...",
// which is how a restored or cloned disk shows what it holds), writes
// the marker the kernel command line carries (e2e_marker=..., which the
// kernel hands to init as an environment variable) and powers off. More
// words on the command line ask for more:
//
//   - e2e_fill=1 prints df of the root and writes guestFillFile;
//   - e2e_resize=1 grows the mounted root to the whole disk with
//     guestGrow, printing df before and after, and the fill file's size;
//   - e2e_hold=N sleeps N seconds after unmounting, so that QEMU keeps the
//     overlay open as a running VM does while nothing in the guest can be
//     hurt by the pod being killed.
//
// Every line the test reads starts with E2E-GUEST (or E2E-RESIZE, from
// guestGrow); "t=" is the guest's uptime in seconds, for timing.
const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d' ' -f1 /proc/uptime; }
gdf() { df -k /mnt | awk -v w="$1" 'NR==2{print "E2E-GUEST df " w " total_kib=" $2 " avail_kib=" $4}'; }
for m in %[1]s; do insmod /lib/modules/$m.ko || echo "E2E-GUEST insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt; then
	echo "E2E-GUEST t=$(up) mounted"
	[ -f /mnt%[2]s ] && echo "E2E-GUEST found $(cat /mnt%[2]s)"
	echo "$e2e_marker" > /mnt%[2]s
	ls /mnt/bin/busybox /mnt/etc/e2e-image && echo "E2E-GUEST image $(cat /mnt/etc/e2e-image)"
	if [ "$e2e_fill" = 1 ]; then
		gdf fill
		if dd if=/dev/zero of=/mnt%[3]s bs=1M count=%[4]d 2>/dev/null && sync; then
			echo "E2E-GUEST t=$(up) filled $(stat -c %%s /mnt%[3]s)"
		else
			echo "E2E-GUEST fill failed"
		fi
		gdf filled
	fi
	if [ "$e2e_resize" = 1 ]; then
		gdf before
		%[5]s /dev/vda /mnt && echo "E2E-GUEST t=$(up) resized"
		gdf after
		echo "E2E-GUEST fill file $(stat -c %%s /mnt%[3]s)"
	fi
	sync
	umount /mnt && echo "E2E-GUEST wrote $e2e_marker"
else
	echo "E2E-GUEST mount failed"
fi
if [ -n "$e2e_hold" ]; then
	echo "E2E-GUEST t=$(up) holding $e2e_hold"
	sleep "$e2e_hold"
fi
poweroff -f
`

// guestInitScript is guestInit filled in.
func guestInitScript() string {
	return fmt.Sprintf(guestInit, strings.Join(guestModules, " "), guestMarkerFile, guestFillFile, guestFillMiB, guestGrow)
}

// buildGuest downloads (never installs) the Debian kernel package the
// linux-image-amd64 metapackage points at, and makes a busybox initramfs
// with the modules the guest needs, the init script and grow (the static
// cmd/ext4grow). Both are cached per kernel version and per content of
// the init script and grow, so that changing either builds a new
// initramfs rather than booting a stale one.
func buildGuest(t testing.TB, grow string) guest {
	t.Helper()
	out := runCmd(t, "", nil, "apt-cache", "depends", "linux-image-amd64")
	pkg := ""
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			pkg = f[1]
		}
	}
	if pkg == "" {
		t.Fatalf("no kernel package in apt-cache depends linux-image-amd64:\n%s", out)
	}
	kver := strings.TrimPrefix(pkg, "linux-image-")
	init := guestInitScript()
	h := sha256.New()
	fmt.Fprintf(h, "%d\n%s", len(init), init)
	h.Write([]byte(sha256File(t, grow)))
	bin := cached(t, "guest-"+kver+"-"+hex.EncodeToString(h.Sum(nil))[:12], func(dir string) {
		runCmd(t, dir, nil, "apt-get", "download", pkg)
		debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
		if len(debs) != 1 {
			t.Fatalf("apt-get download %s: got %v", pkg, debs)
		}
		x := filepath.Join(dir, "x")
		runCmd(t, dir, nil, "dpkg", "-x", debs[0], x)
		kernel := filepath.Join(x, "boot", "vmlinuz-"+kver)
		if err := os.Rename(kernel, filepath.Join(dir, "bin", "vmlinuz")); err != nil {
			t.Fatal(err)
		}
		root := filepath.Join(dir, "initramfs")
		for _, d := range []string{"bin", "lib/modules"} {
			if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		runCmd(t, "", nil, "cp", busyboxHost, filepath.Join(root, "bin", "busybox"))
		for _, m := range guestModules {
			var found []string
			filepath.Walk(filepath.Join(x, "lib", "modules", kver), func(p string, fi os.FileInfo, err error) error {
				if err == nil && !fi.IsDir() && (filepath.Base(p) == m+".ko" || filepath.Base(p) == strings.ReplaceAll(m, "_", "-")+".ko") {
					found = append(found, p)
				}
				return nil
			})
			if len(found) != 1 {
				t.Fatalf("module %s in %s: found %v", m, pkg, found)
			}
			runCmd(t, "", nil, "cp", found[0], filepath.Join(root, "lib", "modules", m+".ko"))
		}
		if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
			t.Fatal(err)
		}
		runCmd(t, "", nil, "cp", grow, filepath.Join(root, guestGrow))
		cmd := exec.Command("sh", "-c", "find . | busybox cpio -o -H newc")
		cmd.Dir = root
		var cpio, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &cpio, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("cpio: %v\n%s", err, stderr.String())
		}
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write(cpio.Bytes())
		zw.Close()
		if err := os.WriteFile(filepath.Join(dir, "bin", "initrd.gz"), gz.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		os.RemoveAll(x)
		os.RemoveAll(root)
		for _, d := range debs {
			os.Remove(d)
		}
	})
	return guest{kernel: filepath.Join(bin, "vmlinuz"), initrd: filepath.Join(bin, "initrd.gz")}
}
