package driver

import (
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/internal/safeopen"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// checkInline applies what an inline ephemeral volume may ask for. Its
// attributes are written by whoever writes the pod, not by the admin, so
// they may not make the privileged plugin open host paths or talk to a
// registry without TLS checks unless the admin allowed it.
func (d *Driver) checkInline(p volumeParams) error {
	if !d.cfg.AllowInlineInsecure && (p.PlainHTTP || p.InsecureSkipTLSVerify) {
		return status.Errorf(codes.PermissionDenied, "inline volume attributes %s and %s are not allowed on this node (the admin can allow them with --allow-inline-insecure-registries, or use a StorageClass)", ParamPlainHTTP, ParamInsecureSkipTLSVerify)
	}
	ref, err := source.Parse(p.Image)
	if err != nil {
		return err
	}
	if ref.Transport() == source.TransportRegistry {
		return nil
	}
	if d.cfg.LocalImageRoot == "" {
		return status.Errorf(codes.PermissionDenied, "inline volume image %q is a local path, which inline volumes may not name on this node (the admin can allow a directory with --local-image-root, or use a StorageClass)", p.Image)
	}
	return d.checkLocalPath(ref.Path())
}

// checkLocalPath confines a local image source named by an inline volume
// to the admin's directory: below it lexically, with no symbolic link on
// the way, and a directory (oci:) or regular file (the archives) at the
// end, so that nothing is opened that the admin did not put there.
func (d *Driver) checkLocalPath(p string) error {
	root := d.cfg.LocalImageRoot
	rel, err := filepath.Rel(root, filepath.Clean(p))
	if err != nil || !filepath.IsLocal(rel) {
		return status.Errorf(codes.PermissionDenied, "inline volume image path %s is outside the local image root %s", p, root)
	}
	r, err := safeopen.OpenRoot(root)
	if err != nil {
		return status.Errorf(codes.FailedPrecondition, "local image root: %v", err)
	}
	defer r.Close()
	st, err := r.Lstat(rel)
	if err != nil {
		return status.Errorf(codes.PermissionDenied, "inline volume image path %s: %v", p, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR, unix.S_IFREG:
		return nil
	}
	return status.Error(codes.PermissionDenied, fmt.Sprintf("inline volume image path %s is neither a directory nor a regular file (mode %#o)", p, st.Mode&unix.S_IFMT))
}
