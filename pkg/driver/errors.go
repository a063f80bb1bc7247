package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// service says which CSI service answers, because the same failure means
// different things to the CO. An image that does not exist is the user's
// NotFound at CreateVolume, but a failed precondition at NodeStage, where
// NotFound would claim that the volume itself is gone.
type service int

const (
	atController service = iota
	atNode
)

// toStatus turns an internal error into the gRPC status the CO acts on.
// Everything ends up with a deliberate code; nothing leaves as Unknown.
func toStatus(err error, where service) error {
	if err == nil {
		return nil
	}
	// A status made deeper down already says what went wrong and names
	// the volume; it is passed on as made, not printed inside a wrapper.
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus().Err()
	}
	msg := err.Error()
	var badID *layout.InvalidVolumeIDError
	var limit *ext4.LimitError
	var entry *ext4.EntryError
	var tooLarge *source.ManifestTooLargeError
	switch {
	case errors.As(err, &badID), errors.Is(err, errInvalidParam), source.IsInvalidArgument(err):
		return status.Error(codes.InvalidArgument, msg)
	case errors.Is(err, rootfs.ErrBuilding), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		// The base build outlives the call; the retry joins it.
		return status.Error(codes.Aborted, msg)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return status.Error(codes.ResourceExhausted, msg)
	case source.IsUnauthorized(err):
		return status.Error(codes.PermissionDenied, msg)
	case source.IsUnavailable(err):
		return status.Error(codes.Unavailable, msg)
	case source.IsNotFound(err):
		if where == atController {
			return status.Error(codes.NotFound, msg)
		}
		return status.Error(codes.FailedPrecondition, msg)
	case errors.Is(err, rootfs.ErrRefusedOverlay), qcow2.IsTampered(err):
		return status.Error(codes.FailedPrecondition, msg)
	case errors.Is(err, rootfs.ErrLayerDigest):
		// Registry layers are classed Unavailable above (a retry fetches
		// them again); this is a local archive or layout that is broken.
		return status.Error(codes.FailedPrecondition, msg)
	case errors.As(err, &limit):
		// The image is what it is: retrying cannot help until the node's
		// limits change, so name the flag that sets this one.
		return status.Error(codes.FailedPrecondition, fmt.Sprintf("%s (raise --%s to allow it)", msg, limitFlag(limit.Limit)))
	case errors.As(err, &tooLarge):
		// Like an image over the builder's limits: refused as it is, and
		// asking again gets the same document.
		return status.Error(codes.FailedPrecondition, msg)
	case errors.As(err, &entry):
		// A layer the builder refuses (a path escaping the root, a hard
		// link to nothing): the image is unusable, not the node.
		return status.Error(codes.FailedPrecondition, msg)
	default:
		return status.Error(codes.Internal, msg)
	}
}

// nodeError is the answer of node call op on box when err stops it. An
// error that is a status already names the volume and is passed on as it
// is; wrapping it would print the status inside the message.
func nodeError(op string, box layout.Box, err error) error {
	if _, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		return err
	}
	return toStatus(fmt.Errorf("%s %s: %w", op, box.ID(), err), atNode)
}

// recordStatus maps a failure to read a volume's record. A missing volume
// is NotFound; anything else is the node's problem.
func recordStatus(box layout.Box, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return status.Errorf(codes.NotFound, "volume %s does not exist on this node", box.ID())
	}
	return status.Errorf(codes.Internal, "volume %s: %v", box.ID(), err)
}

func invalid(format string, args ...any) error {
	return status.Error(codes.InvalidArgument, fmt.Sprintf(format, args...))
}

// limitFlag names the command-line flag that sets an ext4.Options limit.
func limitFlag(l ext4.Limit) string {
	switch l {
	case ext4.LimitTotalBytes:
		return "image-max-bytes"
	case ext4.LimitFileSize:
		return "image-max-file-size"
	case ext4.LimitFiles:
		return "image-max-files"
	}
	return l.String()
}
