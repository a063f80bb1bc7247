package layout

import (
	"fmt"
	"strings"
)

// maxVolumeIDLen is NAME_MAX on Linux. A longer ID could never be a single
// directory entry under boxes/.
const maxVolumeIDLen = 255

// maxQuotedIDLen bounds how much of a rejected ID goes into an error
// message, so a hostile multi-kilobyte ID cannot flood logs.
const maxQuotedIDLen = 64

// InvalidVolumeIDError reports a CSI volume ID that cannot name a box
// directory. It is always the caller's fault, so drivers find it with
// errors.As and map it to gRPC InvalidArgument rather than Internal.
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
	return fmt.Sprintf("invalid volume ID %q%s: %s", id, suffix, e.Reason)
}

// ValidateVolumeID reports whether id can be used verbatim as a box
// directory name.
//
// The policy is to reject, never to encode. An encoding (escaping, hashing)
// would make the on-disk name differ from the volume ID. The driver rebuilds
// its state by listing boxes/ (Home.BoxIDs), so names must map back to IDs
// without a lookup table. The plugin's own CreateVolume chooses the IDs, so
// a well-behaved controller never produces one that is rejected.
//
// ValidateVolumeID rejects the empty string, "." and "..", anything that
// contains '/' or NUL, and anything longer than 255 bytes (NAME_MAX). It
// also rejects anything that starts with '.', because dot-names under
// boxes/ are reserved for the plugin's temporary entries, such as
// half-created boxes that are later renamed into place. Together these
// rules make the ID exactly one path element, so every box path stays
// inside boxes/<id>.
func ValidateVolumeID(id string) error {
	reason := ""
	switch {
	case id == "":
		reason = "it must not be empty"
	case len(id) > maxVolumeIDLen:
		reason = fmt.Sprintf("it is longer than the limit of %d bytes", maxVolumeIDLen)
	case id == "." || id == "..":
		reason = "it must not be . or .."
	case strings.HasPrefix(id, "."):
		reason = "it must not start with '.', which is reserved for the plugin's temporary entries"
	case strings.ContainsRune(id, '/'):
		reason = "it must not contain '/'"
	case strings.ContainsRune(id, 0):
		reason = "it must not contain a NUL byte"
	default:
		return nil
	}
	return &InvalidVolumeIDError{ID: id, Reason: reason}
}
