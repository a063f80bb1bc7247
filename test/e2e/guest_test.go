package e2e

import (
	"bytes"
	"compress/gzip"
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

// guestInit is the initramfs's /init: it mounts the box's root disk, writes
// the marker the kernel command line carries (e2e_marker=..., which the
// kernel hands to init as an environment variable) and powers off.
const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in %s; do insmod /lib/modules/$m.ko || echo "E2E-GUEST insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt; then
	echo "$e2e_marker" > /mnt%s
	ls /mnt/bin/busybox /mnt/etc/e2e-image && echo "E2E-GUEST image $(cat /mnt/etc/e2e-image)"
	sync
	umount /mnt && echo "E2E-GUEST wrote $e2e_marker"
else
	echo "E2E-GUEST mount failed"
fi
poweroff -f
`

// buildGuest downloads (never installs) the Debian kernel package the
// linux-image-amd64 metapackage points at, and makes a busybox initramfs
// with the modules the guest needs. Both are cached per kernel version.
func buildGuest(t testing.TB) guest {
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
	bin := cached(t, "guest-"+kver, func(dir string) {
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
		init := fmt.Sprintf(guestInit, strings.Join(guestModules, " "), guestMarkerFile)
		if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
			t.Fatal(err)
		}
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
