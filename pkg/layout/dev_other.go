//go:build !linux

package layout

import "strconv"

// formatDev falls back to the raw number. The major/minor split is
// platform-specific, and the plugin ships only for Linux.
func formatDev(dev uint64) string {
	return strconv.FormatUint(dev, 10)
}
