package driver

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs/source"
)

// FuzzParseParams feeds StorageClass parameters / inline attributes (user
// input) to the parser: it must never panic, must refuse with an
// InvalidArgument-class error, and must only accept a parseable image.
func FuzzParseParams(f *testing.F) {
	f.Add("image", "127.0.0.1:5000/busybox:1", "plainHTTP", "true")
	f.Add("image", "oci:/var/lib/images/x@sha256:"+strings.Repeat("a", 64), "pullPolicy", "Never")
	f.Add("image", "busybox", "pullPolicy", "Never")
	f.Add("imgae", "x", "csi.storage.k8s.io/pod.name", "p")
	f.Add("image", "", "insecureSkipTLSVerify", "maybe")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		p, err := parseParams(map[string]string{k1: v1, k2: v2})
		if err != nil {
			if !errors.Is(err, errInvalidParam) && !source.IsInvalidArgument(err) {
				t.Fatalf("refusal %v is not an InvalidArgument-class error", err)
			}
			return
		}
		if p.Image == "" {
			t.Fatal("accepted parameters without an image")
		}
		if _, err := source.Parse(p.Image); err != nil {
			t.Fatalf("accepted unparseable image %q: %v", p.Image, err)
		}
		if p.PullPolicy != PullIfNotPresent && p.PullPolicy != PullNever {
			t.Fatalf("accepted pull policy %q", p.PullPolicy)
		}
	})
}

func TestVolumeIDForName(t *testing.T) {
	for _, name := range []string{"pvc-1", strings.Repeat("x", maxNameLen), "../../etc", "a/b\x00c", "sanity-Node Service-1"} {
		id := volumeIDForName(name)
		if len(id) != 43 || !strings.HasPrefix(id, "bx-") || id != volumeIDForName(name) {
			t.Errorf("%q -> %q", name, id)
		}
	}
	if volumeIDForName("a") == volumeIDForName("b") {
		t.Error("distinct names share an ID")
	}
}

// FuzzVolumeIDForName: CreateVolume names come from the CO and may hold
// anything. Whatever the name, its ID must be a valid volume ID whose box
// stays directly under boxes/, the same every time, and different for a
// different name.
func FuzzVolumeIDForName(f *testing.F) {
	f.Add("pvc-1", "pvc-2")
	f.Add("../../etc/passwd", "..")
	f.Add("a/b\x00c", strings.Repeat("x", 4096))
	f.Add("", ".")
	home := layout.NewHome("/var/lib/boxlite-csi", layout.Config{})
	f.Fuzz(func(t *testing.T, a, b string) {
		id := volumeIDForName(a)
		if id != volumeIDForName(a) {
			t.Fatalf("name %q maps to two IDs", a)
		}
		if err := layout.ValidateVolumeID(id); err != nil {
			t.Fatalf("name %q -> invalid ID %q: %v", a, id, err)
		}
		box, err := home.Box(id)
		if err != nil {
			t.Fatalf("name %q -> ID %q has no box: %v", a, id, err)
		}
		if filepath.Dir(box.Root()) != home.BoxesDir() {
			t.Fatalf("name %q -> box %s outside %s", a, box.Root(), home.BoxesDir())
		}
		if a != b && id == volumeIDForName(b) {
			t.Fatalf("names %q and %q share ID %s", a, b, id)
		}
	})
}

// FuzzParseRecord feeds bytes to the volume record parser. Records are the
// plugin's own files, but a damaged one (or, once, an earlier release's
// box.json that a pod could have written) must never panic the plugin,
// and whatever is accepted must be this release's record of this volume.
func FuzzParseRecord(f *testing.F) {
	f.Add([]byte(`{"version":1,"volumeID":"bx-1","parameters":{"image":"a"},"capacityBytes":5,"image":"a","digest":"sha256:` + strings.Repeat("a", 64) + `","pinned":"a@sha256:` + strings.Repeat("a", 64) + `","baseInode":12}`))
	f.Add([]byte(`{"version":2,"volumeID":"bx-1"}`))
	f.Add([]byte(`{"version":1,"volumeID":"bx-2"}`))
	f.Add([]byte(`{"version":1,"volumeID":"bx-1","ephemeral":true,"Env":["A=B"],"virtualSize":268435456,"backing":"../base/rootfs.ext4"}`))
	f.Add([]byte(`{"version":1e400}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRecord(b, "bx-1", "/home/volumes/bx-1.json")
		if err != nil {
			if !strings.Contains(err.Error(), "/home/volumes/bx-1.json") {
				t.Fatalf("refusal %v does not name the file", err)
			}
			return
		}
		if r.VolumeID != "bx-1" || r.Version < 1 || r.Version > recordVersion {
			t.Fatalf("accepted record %+v", r)
		}
	})
}
