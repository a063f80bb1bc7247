//go:build !linux

package layout

import "strconv"

// formatDev falls back to the raw number: the major/minor split is
// platform-specific and the plugin only ships for Linux.
func formatDev(dev uint64) string {
	return strconv.FormatUint(dev, 10)
}
