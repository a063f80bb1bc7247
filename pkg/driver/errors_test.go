package driver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/ext4"
)

// TestToStatus pins the code each internal error becomes: kubelet and the
// provisioner decide whether and how to retry from it.
func TestToStatus(t *testing.T) {
	wrapped := func(err error) error { return fmt.Errorf("volume bx-1: build: %w", err) }
	cases := []struct {
		name  string
		err   error
		where stage
		code  codes.Code
		msg   string
	}{
		{"status passes through", status.Error(codes.Aborted, "busy"), atNode, codes.Aborted, "busy"},
		{"param", wrapped(fmt.Errorf("%w: bad", errInvalidParam)), atController, codes.InvalidArgument, "bad"},
		{"deadline", wrapped(context.DeadlineExceeded), atNode, codes.Aborted, "deadline"},
		{"disk full", wrapped(syscall.ENOSPC), atNode, codes.ResourceExhausted, "no space"},
		{"local layer corrupt", wrapped(fmt.Errorf("%w: manifest says x", rootfs.ErrLayerDigest)), atNode, codes.FailedPrecondition, "layer digest mismatch"},
		{"image over a limit", wrapped(&ext4.EntryError{Path: "f", Err: &ext4.LimitError{Limit: ext4.LimitFiles, Max: 10}}), atNode, codes.FailedPrecondition, "raise --image-max-files"},
		{"entry escaping", wrapped(&ext4.EntryError{Path: "../x", Err: errors.New("escapes the root")}), atNode, codes.FailedPrecondition, `"../x"`},
		{"overlay refused", wrapped(rootfs.ErrRefusedOverlay), atNode, codes.FailedPrecondition, "overlay refused"},
		{"anything else", wrapped(errors.New("boom")), atNode, codes.Internal, "volume bx-1: build: boom"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st := status.Convert(toStatus(tc.err, tc.where))
			if st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
				t.Errorf("got %s %q, want %s containing %q", st.Code(), st.Message(), tc.code, tc.msg)
			}
		})
	}
	if toStatus(nil, atNode) != nil {
		t.Error("nil error became a status")
	}
}
