package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestFileName(t *testing.T) {
	tests := []struct {
		kind, apiVersion, want string
	}{
		{"Pod", "v1", "pod-v1.json"},
		{"DaemonSet", "apps/v1", "daemonset-apps-v1.json"},
		{"CSIDriver", "storage.k8s.io/v1", "csidriver-storage-v1.json"},
		{"CSIStorageCapacity", "storage.k8s.io/v1", "csistoragecapacity-storage-v1.json"},
		{"ClusterRoleBinding", "rbac.authorization.k8s.io/v1", "clusterrolebinding-rbac-v1.json"},
		{"FlowSchema", "flowcontrol.apiserver.k8s.io/v1beta3", "flowschema-flowcontrol-v1beta3.json"},
	}
	for _, tt := range tests {
		if got := fileName(tt.kind, tt.apiVersion); got != tt.want {
			t.Errorf("fileName(%q, %q) = %q, want %q", tt.kind, tt.apiVersion, got, tt.want)
		}
	}
}

// testSwagger exercises every construct the converter handles: $ref,
// allOf-wrapped $ref, int-or-string, Quantity, maps, arrays, recursion and
// a kind in the core and in a named group.
const testSwagger = `{
  "definitions": {
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": "string", "description": "long text"},
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": {
      "type": "object",
      "properties": {
        "name": {"type": "string", "description": "drop me"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}}
      }
    },
    "io.k8s.api.core.v1.Widget": {
      "type": "object",
      "required": ["spec"],
      "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Widget"}],
      "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"allOf": [{"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "default": {}},
        "spec": {"$ref": "#/definitions/io.k8s.api.core.v1.WidgetSpec", "description": "sibling"}
      }
    },
    "io.k8s.api.core.v1.WidgetSpec": {
      "type": "object",
      "properties": {
        "size": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.api.resource.Quantity"},
        "port": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
        "children": {"type": "array", "items": {"$ref": "#/definitions/io.k8s.api.core.v1.WidgetSpec"}},
        "raw": {"type": "object"},
        "mode": {"type": "string", "enum": ["A", "B"]},
        "x-kubernetes-list-type": {"type": "string"}
      },
      "x-kubernetes-list-type": "atomic"
    },
    "io.k8s.api.things.v2.Gadget": {
      "type": "object",
      "x-kubernetes-group-version-kind": [{"group": "things.example.io", "version": "v2", "kind": "Gadget"}],
      "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}}
    }
  }
}`

func TestGenerate(t *testing.T) {
	files, err := generate([]byte(testSwagger))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := range files {
		names = append(names, n)
	}
	if want := map[string]bool{"widget-v1.json": true, "gadget-things-v2.json": true}; len(files) != len(want) || !want[names[0]] || !want[names[1]] {
		t.Fatalf("files = %v, want %v", names, want)
	}

	var widget map[string]any
	if err := json.Unmarshal(files["widget-v1.json"], &widget); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path string // slash-separated, as a JSON pointer without the leading /
		want any
	}{
		{"$schema", draft4},
		{"additionalProperties", false},
		{"required", []any{"apiVersion", "kind", "spec"}},
		{"properties/kind/enum", []any{"Widget"}},
		{"properties/apiVersion/enum", []any{"v1"}},
		// allOf around a lone $ref is unwrapped; siblings are dropped.
		{"properties/metadata", map[string]any{"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}},
		{"properties/spec", map[string]any{"$ref": "#/definitions/io.k8s.api.core.v1.WidgetSpec"}},
		// Strict where properties are listed; maps keep their value schema.
		{"definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta/additionalProperties", false},
		{"definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta/properties/labels/additionalProperties", map[string]any{"type": "string"}},
		{"definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta/properties/name", map[string]any{"type": "string"}},
		{"definitions/io.k8s.api.core.v1.WidgetSpec/additionalProperties", false},
		// A property named like an extension is still a property.
		{"definitions/io.k8s.api.core.v1.WidgetSpec/properties/x-kubernetes-list-type", map[string]any{"type": "string"}},
		{"definitions/io.k8s.api.core.v1.WidgetSpec/properties/mode/enum", []any{"A", "B"}},
		// An object with no listed properties stays open.
		{"definitions/io.k8s.api.core.v1.WidgetSpec/properties/raw", map[string]any{"type": "object"}},
		{"definitions/io.k8s.api.core.v1.WidgetSpec/properties/children/items", map[string]any{"$ref": "#/definitions/io.k8s.api.core.v1.WidgetSpec"}},
		{"definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString", map[string]any{"oneOf": []any{map[string]any{"type": "string"}, map[string]any{"type": "integer"}}}},
		{"definitions/io.k8s.apimachinery.pkg.api.resource.Quantity", map[string]any{"oneOf": []any{map[string]any{"type": "string", "pattern": quantityPattern}, map[string]any{"type": "number"}}}},
	}
	for _, tt := range tests {
		got := lookup(widget, tt.path)
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s = %#v, want %#v", tt.path, got, tt.want)
		}
	}
	if defs, _ := widget["definitions"].(map[string]any); len(defs) != 4 {
		t.Errorf("widget has %d definitions, want the 4 it reaches (ObjectMeta, WidgetSpec, Quantity, IntOrString)", len(defs))
	}
	if strings.Contains(string(files["widget-v1.json"]), "description") {
		t.Error("descriptions were kept")
	}

	var gadget map[string]any
	if err := json.Unmarshal(files["gadget-things-v2.json"], &gadget); err != nil {
		t.Fatal(err)
	}
	if got := lookup(gadget, "properties/apiVersion/enum"); !reflect.DeepEqual(got, []any{"things.example.io/v2"}) {
		t.Errorf("gadget apiVersion enum = %v", got)
	}
	if _, ok := gadget["definitions"]; ok {
		t.Error("gadget refers to nothing but has definitions")
	}
}

func TestGenerateErrors(t *testing.T) {
	tests := []struct {
		name, swagger, want string
	}{
		{"not JSON", `{`, "decode"},
		{"no definitions", `{"definitions": {}}`, "no definitions"},
		{"no kinds", `{"definitions": {"a.B": {"type": "object"}}}`, "no definition carries"},
		{"dangling ref", `{"definitions": {"a.B": {"x-kubernetes-group-version-kind": [{"version": "v1", "kind": "B"}], "properties": {"c": {"$ref": "#/definitions/nope"}}}}}`, "undefined nope"},
		{"remote ref", `{"definitions": {"a.B": {"properties": {"c": {"$ref": "other.json#/x"}}}}}`, "unsupported $ref"},
		{"collision", `{"definitions": {
			"a.v1.B": {"x-kubernetes-group-version-kind": [{"group": "x.io", "version": "v1", "kind": "B"}]},
			"b.v1.B": {"x-kubernetes-group-version-kind": [{"group": "x.example.com", "version": "v1", "kind": "B"}]}}}`, "both map to b-x-v1.json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := generate([]byte(tt.swagger))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestRun(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "swagger.json")
	if err := os.WriteFile(in, []byte(testSwagger), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out", "schemas")
	var stderr strings.Builder
	if code := run([]string{"-swagger", in, "-out", out}, &stderr); code != 0 {
		t.Fatalf("run = %d: %s", code, stderr.String())
	}
	for _, f := range []string{"widget-v1.json", "gadget-things-v2.json"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Error(err)
		}
	}
	if code := run([]string{"-swagger", in}, &stderr); code != 2 {
		t.Errorf("run without -out = %d, want 2", code)
	}
}

// lookup follows a slash-separated path through decoded JSON objects.
func lookup(v any, path string) any {
	for _, k := range strings.Split(path, "/") {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	return v
}
