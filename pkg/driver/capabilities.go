package driver

import (
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// checkCapabilities accepts what a box can be: a directory (mount access
// type) used from one node. Block access has no meaning for a directory,
// and a box lives in one node's cache.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	for _, c := range caps {
		if c.GetBlock() != nil {
			return fmt.Errorf("block access type is not supported: a box is a directory; use the mount access type")
		}
		if c.GetMount() == nil {
			return fmt.Errorf("access type is required (mount)")
		}
		switch m := c.GetAccessMode().GetMode(); m {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
		case csi.VolumeCapability_AccessMode_UNKNOWN:
			return fmt.Errorf("access mode is required")
		default:
			return fmt.Errorf("access mode %s is not supported: a box lives on one node", m)
		}
	}
	return nil
}

func wrapInt64(v int64) *wrapperspb.Int64Value { return wrapperspb.Int64(v) }
