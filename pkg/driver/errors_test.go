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

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
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
		where service
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

// TestNodeError pins what node calls answer when a step fails. Before
// node calls went through nodeError they answered Internal for every
// failure; now a full disk is ResourceExhausted, as in CreateVolume.
func TestNodeError(t *testing.T) {
	box, err := layout.NewHome(t.TempDir(), layout.Config{}).Box("bx-1")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		code codes.Code
		msg  string
	}{
		{"disk full", fmt.Errorf("mkdir /k/t: %w", syscall.ENOSPC), codes.ResourceExhausted, "NodeStageVolume bx-1: mkdir /k/t: no space left on device"},
		{"status kept whole", status.Error(codes.FailedPrecondition, "volume bx-1 is not staged at /s"), codes.FailedPrecondition, "volume bx-1 is not staged at /s"},
		{"anything else", errors.New("boom"), codes.Internal, "NodeStageVolume bx-1: boom"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := status.FromError(nodeError("NodeStageVolume", box, tc.err))
			if s.Code() != tc.code || s.Message() != tc.msg {
				t.Errorf("got %v %q, want %v %q", s.Code(), s.Message(), tc.code, tc.msg)
			}
		})
	}
}
