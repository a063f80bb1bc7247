package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// stage says where an error happened, because the same failure means
// different things to the CO: an image that does not exist is the user's
// NotFound at CreateVolume, but a precondition failure at NodeStage, where
// NotFound would claim the volume itself is gone.
type stage int

const (
	atController stage = iota
	atNode
)

// toStatus turns an internal error into the gRPC status the CO acts on.
// Everything ends up with a deliberate code; nothing leaves as Unknown.
func toStatus(err error, where stage) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	msg := err.Error()
	var badID *layout.InvalidVolumeIDError
	switch {
	case errors.As(err, &badID), errors.Is(err, errInvalidParam), source.IsInvalidArgument(err):
		return status.Error(codes.InvalidArgument, msg)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
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
	default:
		return status.Error(codes.Internal, msg)
	}
}

func invalid(format string, args ...any) error {
	return status.Error(codes.InvalidArgument, fmt.Sprintf(format, args...))
}
