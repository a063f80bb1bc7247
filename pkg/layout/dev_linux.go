package layout

import "fmt"

// formatDev renders a device number as major:minor. stat(1), lsblk and
// /proc/self/mountinfo show that form, so an operator can match the error
// message against those tools. The bit layout is glibc's 64-bit dev_t
// (gnu_dev_major and gnu_dev_minor), a superset of the kernel's encoding.
func formatDev(dev uint64) string {
	major := (dev>>8)&0x00000fff | (dev>>32)&0xfffff000
	minor := dev&0x000000ff | (dev>>12)&0xffffff00
	return fmt.Sprintf("%d:%d", major, minor)
}
