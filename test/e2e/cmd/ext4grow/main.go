// Command ext4grow grows a mounted ext4 filesystem to fill its block
// device, as resize2fs does for a mounted filesystem: it asks the kernel
// with the EXT4_IOC_RESIZE_FS ioctl on the mount point. It runs inside the
// e2e guest, whose initramfs has busybox but no e2fsprogs, after the
// plugin has grown the box's disk (NodeExpandVolume); the plugin never
// touches the filesystem, so growing it is the guest's job.
//
// Usage: ext4grow DEVICE MOUNTPOINT. It prints one line before and one
// after, each prefixed E2E-RESIZE, and exits non-zero on any failure.
package main

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"
)

const (
	// blkGetSize64 is BLKGETSIZE64, _IOR(0x12, 114, size_t): the device's
	// size in bytes.
	blkGetSize64 = 0x80081272
	// ext4IocResizeFS is EXT4_IOC_RESIZE_FS, _IOW('f', 16, __u64): grow
	// the mounted filesystem to the given number of blocks.
	ext4IocResizeFS = 0x40086610
)

func ioctl(fd uintptr, req uintptr, arg unsafe.Pointer) error {
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(arg)); errno != 0 {
		return errno
	}
	return nil
}

func fail(format string, args ...any) {
	fmt.Printf("E2E-RESIZE failed: "+format+"\n", args...)
	os.Exit(1)
}

// report prints what statfs says about the mounted filesystem: the block
// size, and the total and available space in KiB as df -k shows them.
func report(when, mnt string) syscall.Statfs_t {
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); err != nil {
		fail("statfs %s: %v", mnt, err)
	}
	bs := uint64(st.Bsize)
	fmt.Printf("E2E-RESIZE %s bsize=%d total_kib=%d avail_kib=%d\n", when, bs, st.Blocks*bs/1024, st.Bavail*bs/1024)
	return st
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: ext4grow DEVICE MOUNTPOINT")
	}
	devPath, mnt := os.Args[1], os.Args[2]
	dev, err := os.Open(devPath)
	if err != nil {
		fail("%v", err)
	}
	var devSize uint64
	if err := ioctl(dev.Fd(), blkGetSize64, unsafe.Pointer(&devSize)); err != nil {
		fail("BLKGETSIZE64 on %s: %v", devPath, err)
	}
	dev.Close()
	st := report("before", mnt)
	// statfs's block count leaves out the filesystem's own metadata, so
	// it is not the superblock's block count; the kernel takes the new
	// total, which is the whole device in filesystem blocks. Asking for
	// the count the filesystem already has is not an error.
	blocks := devSize / uint64(st.Bsize)
	fmt.Printf("E2E-RESIZE device=%s device_bytes=%d new_blocks=%d\n", devPath, devSize, blocks)
	// The ioctl is made on any file of the mounted filesystem; the mount
	// point itself is one.
	root, err := os.Open(mnt)
	if err != nil {
		fail("%v", err)
	}
	if err := ioctl(root.Fd(), ext4IocResizeFS, unsafe.Pointer(&blocks)); err != nil {
		fail("EXT4_IOC_RESIZE_FS on %s to %d blocks: %v", mnt, blocks, err)
	}
	root.Close()
	report("after", mnt)
	fmt.Println("E2E-RESIZE ok")
}
