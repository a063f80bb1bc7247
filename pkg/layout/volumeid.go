package layout

import (
	"fmt"
	"strings"
)

// maxVolumeIDLen is NAME_MAX on Linux: a longer ID could never be a single
// directory entry under boxes/.
const maxVolumeIDLen = 255

// maxQuotedIDLen bounds how much of a rejected ID goes into an error
// message, so a hostile multi-kilobyte ID cannot flood logs.
const maxQuotedIDLen = 64

// InvalidVolumeIDError reports a CSI volume ID that cannot name a box
// directory. It is always the caller's fault, so drivers map it (via
// errors.As) to gRPC InvalidArgument rather than Internal.
type InvalidVolumeIDError struct {
	ID     string
	Reason string
}

func (e *InvalidVolumeIDError) Error() string {
	id := e.ID
	suffix := ""
	if len(id) > maxQuotedIDLen {
		suffix = fmt.Sprintf("... (%d bytes)", len(id))
		id = id[:maxQuotedIDLen]
	}
	return fmt.Sprintf("layout: invalid volume ID %q%s: %s", id, suffix, e.Reason)
}

// ValidateVolumeID reports whether id can be used verbatim as a box
// directory name.
//
// Policy: reject, never encode. An encoding (escaping, hashing) would make
// the on-disk name differ from the volume ID, and the driver rebuilds its
// state by listing boxes/ (Home.BoxIDs), so names must map back to IDs
// without a lookup table. IDs are chosen by this plugin's own CreateVolume,
// so a well-behaved controller never produces a rejected one.
//
// Rejected: the empty string, "." and "..", anything containing '/' or NUL,
// anything longer than 255 bytes (NAME_MAX), and anything starting with '.',
// because dot-names under boxes/ are reserved for the plugin's temporary
// entries (for example half-created boxes that are renamed into place).
// Together these guarantee the ID is exactly one path element, so every box
// path stays inside boxes/<id>.
func ValidateVolumeID(id string) error {
	reason := ""
	switch {
	case id == "":
		reason = "must not be empty"
	case len(id) > maxVolumeIDLen:
		reason = fmt.Sprintf("longer than %d bytes (%d)", maxVolumeIDLen, len(id))
	case id == "." || id == "..":
		reason = "must not be . or .."
	case strings.HasPrefix(id, "."):
		reason = "must not start with '.' (reserved for temporary entries)"
	case strings.ContainsRune(id, '/'):
		reason = "must not contain '/'"
	case strings.ContainsRune(id, 0):
		reason = "must not contain a NUL byte"
	default:
		return nil
	}
	return &InvalidVolumeIDError{ID: id, Reason: reason}
}
