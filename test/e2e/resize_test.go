package e2e

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// claimObject is the part of a PersistentVolumeClaim that volume expansion
// reads and writes.
type claimObject struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Spec struct {
		VolumeName string `json:"volumeName"`
	} `json:"spec"`
	Status struct {
		Capacity                  map[string]string `json:"capacity"`
		AllocatedResources        map[string]string `json:"allocatedResources"`
		AllocatedResourceStatuses map[string]string `json:"allocatedResourceStatuses"`
		Conditions                []claimCondition  `json:"conditions"`
	} `json:"status"`
}

type claimCondition struct {
	Type               string `json:"type"`
	Status             string `json:"status"`
	Reason             string `json:"reason,omitempty"`
	Message            string `json:"message,omitempty"`
	LastProbeTime      string `json:"lastProbeTime,omitempty"`
	LastTransitionTime string `json:"lastTransitionTime,omitempty"`
}

// resizeConditions are the claim conditions that belong to expansion
// (knownResizeConditions in Kubernetes' pkg/volume/util/resize_util.go).
var resizeConditions = map[string]bool{
	"FileSystemResizePending": true, "Resizing": true, "ControllerResizeError": true, "NodeResizeError": true,
}

// mergeResizeConditions is what MergeResizeConditionOnPVC in
// resize_util.go does: conditions outside expansion stay, a new one
// replaces an old one of its type only when its status differs, and old
// expansion conditions stay only when keepOld is set.
func mergeResizeConditions(old, add []claimCondition, keepOld bool) []claimCondition {
	done := map[string]bool{}
	byType := map[string]claimCondition{}
	for _, c := range add {
		byType[c.Type] = c
	}
	out := []claimCondition{}
	for _, c := range old {
		n, isNew := byType[c.Type]
		switch {
		case !resizeConditions[c.Type]:
			out = append(out, c)
		case isNew:
			if n.Status != c.Status {
				out = append(out, n)
			} else {
				out = append(out, c)
			}
			done[c.Type] = true
		case keepOld:
			out = append(out, c)
		}
	}
	for _, c := range add {
		if !done[c.Type] {
			out = append(out, c)
		}
	}
	return out
}

func (s *suite) getClaim(t testing.TB, name string) claimObject {
	t.Helper()
	var cl claimObject
	out := s.c.kubectl(t, "get", "pvc", name, "-n", testNamespace, "-o", "json")
	if err := json.Unmarshal([]byte(out), &cl); err != nil {
		t.Fatalf("pvc %s: %v\n%s", name, err, out)
	}
	return cl
}

// patchClaimStatus merge-patches a claim's status through the status
// subresource, with the resourceVersion it was read at, as the resizer's
// PatchPVCStatus does, so that a concurrent change fails the patch rather
// than being overwritten.
func (s *suite) patchClaimStatus(t testing.TB, name string, read claimObject, status map[string]any, annotations map[string]string) {
	t.Helper()
	meta := map[string]any{"resourceVersion": read.Metadata.ResourceVersion}
	if annotations != nil {
		meta["annotations"] = annotations
	}
	p, err := json.Marshal(map[string]any{"metadata": meta, "status": status})
	if err != nil {
		t.Fatal(err)
	}
	s.c.kubectl(t, "patch", "pvc", name, "-n", testNamespace, "--subresource=status", "--type=merge", "-p", string(p))
}

// resizeClaim grows a bound claim to size (a quantity such as 3Gi) the
// way a user and a central external-resizer do for a driver that has node
// expansion but no ControllerExpandVolume, which is all kubelet needs to
// call NodeExpandVolume. The external-resizer cannot be built here, so
// its steps are made by hand, in the order and with the fields that
// Kubernetes' own resize controller uses (expandAndRecoverFunction and
// markForPendingNodeExpansion in
// pkg/volume/util/operationexecutor/operation_generator.go, with the
// helpers of pkg/volume/util/resize_util.go, v1.34.4):
//
//  1. the user raises spec.resources.requests; the PersistentVolumeClaimResize
//     admission plugin allows it only if the StorageClass allows expansion;
//  2. MarkControllerReisizeInProgress: status.allocatedResources holds the
//     new size, allocatedResourceStatuses says ControllerResizeInProgress,
//     a Resizing condition replaces older expansion conditions (so a
//     NodeResizeError of an earlier attempt goes), and the claim is
//     annotated with the resizer's name;
//  3. the driver has no controller expansion, so there is nothing to call
//     and UpdatePVSize raises the PV's spec.capacity;
//  4. MarkForFSResize: allocatedResourceStatuses says NodeResizePending
//     and a FileSystemResizePending condition joins Resizing;
//     AddAnnPreResizeCapacity records the claim's old capacity on the PV
//     unless an earlier resize did.
//
// Kubelet then expands on the node because the claim's status.capacity is
// below the PV's spec.capacity, once the volume is mounted
// (expandVolumeDuringMount, called after SetUp in GenerateMountVolumeFunc)
// or, for a pod already running, when its periodic pod sync notices
// (checkVolumeFSResize in the desired-state populator, then
// GenerateExpandInUseVolumeFunc). The size it asks for is
// status.allocatedResources, and NodeResizePending is what lets it go on
// (runPreCheck in node_expander.go); it sets NodeResizeInProgress first,
// and on success sets status.capacity and clears the status and the
// expansion conditions (MarkNodeExpansionFinishedWithRecovery). On a
// FailedPrecondition it adds a NodeResizeError condition with the
// driver's message and does not retry while the volume stays mounted.
func (s *suite) resizeClaim(t testing.TB, name, size string) {
	t.Helper()
	c := s.c
	want := parseQuantity(t, size)
	now := time.Now().UTC().Format(time.RFC3339)
	cl := s.getClaim(t, name)
	pv := cl.Spec.VolumeName
	if pv == "" {
		t.Fatalf("claim %s is not bound", name)
	}
	oldCap := cl.Status.Capacity["storage"]
	if parseQuantity(t, oldCap) >= want {
		t.Fatalf("claim %s has capacity %s already, not below %s", name, oldCap, size)
	}

	c.kubectl(t, "patch", "pvc", name, "-n", testNamespace, "--type=merge",
		"-p", fmt.Sprintf(`{"spec":{"resources":{"requests":{"storage":%q}}}}`, size))

	cl = s.getClaim(t, name)
	s.patchClaimStatus(t, name, cl, map[string]any{
		"allocatedResources":        map[string]string{"storage": size},
		"allocatedResourceStatuses": map[string]string{"storage": "ControllerResizeInProgress"},
		"conditions": mergeResizeConditions(cl.Status.Conditions,
			[]claimCondition{{Type: "Resizing", Status: "True", LastTransitionTime: now}}, false),
	}, map[string]string{"volume.kubernetes.io/storage-resizer": driverName})

	c.kubectl(t, "patch", "pv", pv, "--type=merge", "-p", fmt.Sprintf(`{"spec":{"capacity":{"storage":%q}}}`, size))

	cl = s.getClaim(t, name)
	s.patchClaimStatus(t, name, cl, map[string]any{
		"allocatedResourceStatuses": map[string]string{"storage": "NodeResizePending"},
		"conditions": mergeResizeConditions(cl.Status.Conditions, []claimCondition{{
			Type: "FileSystemResizePending", Status: "True", LastTransitionTime: now,
			Message: "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
		}}, true),
	}, nil)
	const preResize = "volume.alpha.kubernetes.io/pre-resize-capacity"
	if !strings.Contains(c.jsonpath("", "pv/"+pv, "{.metadata.annotations}"), preResize) {
		c.kubectl(t, "annotate", "pv", pv, preResize+"="+oldCap)
	}

	// With a pod running on the claim, kubelet's online expansion may
	// already have taken it from NodeResizePending on (InProgress, then
	// Failed when the plugin refuses) by the time it is read back.
	cl = s.getClaim(t, name)
	st := cl.Status.AllocatedResourceStatuses["storage"]
	if (st != "NodeResizePending" && st != "NodeResizeInProgress" && st != "NodeResizeFailed") || cl.Status.AllocatedResources["storage"] != size {
		t.Fatalf("claim %s after the resizer's steps: allocatedResources %v, allocatedResourceStatuses %v",
			name, cl.Status.AllocatedResources, cl.Status.AllocatedResourceStatuses)
	}
	t.Logf("claim %s: %s -> %s, PV %s raised, waiting for node expansion (conditions %+v)", name, oldCap, size, pv, cl.Status.Conditions)
}

// waitClaimResized waits until kubelet has recorded a finished node
// expansion to size bytes: status.capacity at that size, no expansion
// status and no expansion condition left.
func (s *suite) waitClaimResized(t testing.TB, name string, size int64, timeout time.Duration) claimObject {
	t.Helper()
	var cl claimObject
	waitFor(t, fmt.Sprintf("claim %s resized to %d bytes", name, size), timeout, func() (bool, string) {
		cl = s.getClaim(t, name)
		got := cl.Status.Capacity["storage"]
		n, err := quantityBytes(got)
		if err != nil || n != size || len(cl.Status.AllocatedResourceStatuses) != 0 {
			return false, fmt.Sprintf("capacity %q, allocatedResourceStatuses %v, conditions %+v", got, cl.Status.AllocatedResourceStatuses, cl.Status.Conditions)
		}
		for _, cd := range cl.Status.Conditions {
			if resizeConditions[cd.Type] {
				return false, fmt.Sprintf("condition %+v left", cd)
			}
		}
		return true, ""
	})
	return cl
}

// quantityBytes reads the storage quantities this test and the API
// server write: a whole number with no suffix or a binary one (Ki to Ti).
func quantityBytes(q string) (int64, error) {
	mult := int64(1)
	for i, suf := range []string{"Ki", "Mi", "Gi", "Ti"} {
		if strings.HasSuffix(q, suf) {
			q, mult = strings.TrimSuffix(q, suf), int64(1)<<(10*(i+1))
			break
		}
	}
	n, err := strconv.ParseInt(q, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("storage quantity %q: not a whole number of bytes, Ki, Mi, Gi or Ti", q)
	}
	return n * mult, nil
}

func parseQuantity(t testing.TB, q string) int64 {
	t.Helper()
	n, err := quantityBytes(q)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
