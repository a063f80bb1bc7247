package testenv

import "testing"

// Reason is why a test is skipped on purpose. Every such skip in the tree
// names one of these, so the list below is the complete list of them.
type Reason string

const (
	// RootBypassesPermissions: root ignores file modes, so an EACCES case
	// cannot be provoked as root; another case covers the same code path.
	RootBypassesPermissions Reason = "root bypasses file permissions, so EACCES cannot be provoked; the read-failure case covers the same path"
	// LinuxOnly: the case checks a Linux-specific result.
	LinuxOnly Reason = "the case checks a Linux-only result"
	// NoDynamicBinary: the case needs a dynamically linked /bin/true to
	// copy its interpreter, and this system's is static.
	NoDynamicBinary Reason = "no dynamically linked /bin/true on this system"
)

// ByDesign skips the test for a reason that holds on every machine, CI
// included.
func ByDesign(t testing.TB, r Reason) {
	t.Helper()
	t.Skip(string(r))
}
