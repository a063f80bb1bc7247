// Command k8s-schemas turns the Kubernetes OpenAPI v2 document
// (api/openapi-spec/swagger.json inside the k8s.io/kubernetes module) into
// one standalone, strict JSON schema per kind, so kubeconform can validate
// manifests with no network access.
//
// Files are named the way kubeconform's -schema-location template
// "<dir>/{{.ResourceKind}}{{.KindSuffix}}.json" expands: the lower-case
// kind, then "-<first label of the group>" unless the group is core, then
// "-<version>" (daemonset-apps-v1.json, csidriver-storage-v1.json,
// pod-v1.json).
//
// The schemas are stricter than the API server in three deliberate ways,
// because they judge templates and examples, not live objects:
//   - every object type that lists its properties gets
//     additionalProperties: false, so a misspelt or misplaced field fails;
//   - null is never accepted: in a rendered manifest it almost always means
//     a template printed an empty value;
//   - apiVersion and kind are required and pinned to the file's own.
//
// It is a separate module with no dependencies so the main module never
// requires k8s.io/kubernetes: the swagger file is fetched with
// `go mod download -json k8s.io/kubernetes@<version>` and passed by path.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("k8s-schemas", flag.ContinueOnError)
	fs.SetOutput(stderr)
	swagger := fs.String("swagger", "", "path of the Kubernetes swagger.json (OpenAPI v2)")
	out := fs.String("out", "", "directory to write the schemas into; created if missing")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: k8s-schemas -swagger swagger.json -out DIR\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *swagger == "" || *out == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	data, err := os.ReadFile(*swagger)
	if err != nil {
		fmt.Fprintf(stderr, "k8s-schemas: %v\n", err)
		return 1
	}
	files, err := generate(data)
	if err != nil {
		fmt.Fprintf(stderr, "k8s-schemas: %s: %v\n", *swagger, err)
		return 1
	}
	if err := writeFiles(*out, files); err != nil {
		fmt.Fprintf(stderr, "k8s-schemas: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "k8s-schemas: wrote %d schemas to %s\n", len(files), *out)
	return 0
}

const (
	refPrefix = "#/definitions/"
	// quantityDef is resource.Quantity: a string in swagger, but YAML
	// authors write `cpu: 1` as often as `cpu: "1"`.
	quantityDef = "io.k8s.apimachinery.pkg.api.resource.Quantity"
	// quantityPattern is the API server's quantity grammar: a signed
	// decimal with a binary-SI, decimal-SI or exponent suffix. It catches
	// the classic "512MB" (not a Kubernetes unit).
	quantityPattern = `^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$`
	draft4          = "http://json-schema.org/draft-04/schema#"
)

// gvk is one x-kubernetes-group-version-kind entry.
type gvk struct {
	Group   string `json:"group"`
	Version string `json:"version"`
	Kind    string `json:"kind"`
}

func (g gvk) apiVersion() string {
	if g.Group == "" {
		return g.Version
	}
	return g.Group + "/" + g.Version
}

// fileName mirrors kubeconform's schemaPath: {{.ResourceKind}} is the
// lower-case kind and {{.KindSuffix}} is "-" plus the first dot-separated
// label of the apiVersion's group part, plus "-<version>" when there is a
// group.
func fileName(kind, apiVersion string) string {
	groupParts := strings.Split(apiVersion, "/")
	suffix := "-" + strings.ToLower(strings.Split(groupParts[0], ".")[0])
	if len(groupParts) > 1 {
		suffix += "-" + strings.ToLower(groupParts[1])
	}
	return strings.ToLower(kind) + suffix + ".json"
}

// definition is a swagger definition as decoded, plus its kinds.
type definition struct {
	schema map[string]any
	gvks   []gvk
}

// generate returns file name -> schema document for every kind the
// swagger document defines.
func generate(swagger []byte) (map[string][]byte, error) {
	var doc struct {
		Definitions map[string]map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(swagger, &doc); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if len(doc.Definitions) == 0 {
		return nil, errors.New("no definitions: not a Kubernetes swagger.json")
	}

	// Convert every definition once; files then share the results.
	converted := make(map[string]map[string]any, len(doc.Definitions))
	deps := make(map[string][]string, len(doc.Definitions))
	defs := make(map[string]definition, len(doc.Definitions))
	for name, raw := range doc.Definitions {
		d := definition{schema: raw}
		if v, ok := raw["x-kubernetes-group-version-kind"]; ok {
			b, _ := json.Marshal(v)
			if err := json.Unmarshal(b, &d.gvks); err != nil {
				return nil, fmt.Errorf("%s: x-kubernetes-group-version-kind: %w", name, err)
			}
		}
		defs[name] = d
		refs := map[string]bool{}
		s, err := convertDefinition(name, raw, refs)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		converted[name] = s
		for r := range refs {
			if _, ok := doc.Definitions[r]; !ok {
				return nil, fmt.Errorf("%s: $ref to undefined %s", name, r)
			}
			deps[name] = append(deps[name], r)
		}
	}

	files := map[string][]byte{}
	owner := map[string]string{} // file name -> definition, to catch collisions
	names := make([]string, 0, len(defs))
	for name := range defs {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		for _, g := range defs[name].gvks {
			if g.Kind == "" || g.Version == "" {
				return nil, fmt.Errorf("%s: incomplete group-version-kind %+v", name, g)
			}
			fn := fileName(g.Kind, g.apiVersion())
			if prev, ok := owner[fn]; ok && prev != name {
				return nil, fmt.Errorf("%s and %s both map to %s", prev, name, fn)
			}
			owner[fn] = name
			b, err := json.Marshal(standalone(name, g, converted, deps))
			if err != nil {
				return nil, fmt.Errorf("%s: %w", fn, err)
			}
			files[fn] = append(b, '\n')
		}
	}
	if len(files) == 0 {
		return nil, errors.New("no definition carries x-kubernetes-group-version-kind")
	}
	return files, nil
}

// standalone builds one file: the kind's schema at the root, pinned to its
// apiVersion and kind, with every definition it reaches under
// "definitions" so the file needs nothing else.
func standalone(name string, g gvk, converted map[string]map[string]any, deps map[string][]string) map[string]any {
	root := make(map[string]any, len(converted[name])+2)
	for k, v := range converted[name] {
		root[k] = v
	}
	if props, ok := root["properties"].(map[string]any); ok {
		p := make(map[string]any, len(props))
		for k, v := range props {
			p[k] = v
		}
		if _, ok := p["apiVersion"]; ok {
			p["apiVersion"] = map[string]any{"type": "string", "enum": []string{g.apiVersion()}}
		}
		if _, ok := p["kind"]; ok {
			p["kind"] = map[string]any{"type": "string", "enum": []string{g.Kind}}
		}
		root["properties"] = p
		req, _ := root["required"].([]string)
		req = slices.Clone(req)
		for _, k := range []string{"apiVersion", "kind"} {
			if _, ok := p[k]; ok && !slices.Contains(req, k) {
				req = append(req, k)
			}
		}
		sort.Strings(req)
		root["required"] = req
	}

	// Transitive closure of the references, in a stable order.
	seen := map[string]bool{}
	queue := slices.Clone(deps[name])
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		if seen[d] {
			continue
		}
		seen[d] = true
		queue = append(queue, deps[d]...)
	}
	if len(seen) > 0 {
		defs := make(map[string]any, len(seen))
		for d := range seen {
			defs[d] = converted[d]
		}
		root["definitions"] = defs
	}
	root["$schema"] = draft4
	return root
}

// convertDefinition converts a top-level definition, special-casing the
// types whose JSON form is wider than their swagger type.
func convertDefinition(name string, s map[string]any, refs map[string]bool) (map[string]any, error) {
	if name == quantityDef {
		return map[string]any{"oneOf": []any{
			map[string]any{"type": "string", "pattern": quantityPattern},
			map[string]any{"type": "number"},
		}}, nil
	}
	return convert(s, refs)
}

// convert turns one swagger schema node into a draft-04 JSON schema node,
// recording the definitions it references in refs. Descriptions, defaults,
// formats and x-kubernetes-* extensions are dropped: they do not validate
// anything and would triple the files' size.
func convert(s map[string]any, refs map[string]bool) (map[string]any, error) {
	if ref, ok := s["$ref"].(string); ok {
		name, found := strings.CutPrefix(ref, refPrefix)
		if !found || name == "" {
			return nil, fmt.Errorf("unsupported $ref %q", ref)
		}
		refs[name] = true
		// Siblings of $ref (description, default) are ignored by draft 4.
		return map[string]any{"$ref": ref}, nil
	}
	if s["format"] == "int-or-string" {
		return map[string]any{"oneOf": []any{
			map[string]any{"type": "string"},
			map[string]any{"type": "integer"},
		}}, nil
	}

	out := map[string]any{}
	if all, ok := s["allOf"].([]any); ok {
		conv, err := convertList(all, refs)
		if err != nil {
			return nil, fmt.Errorf("allOf: %w", err)
		}
		// Kubernetes wraps a lone $ref in allOf to give it a default;
		// unwrap it when nothing else constrains the node.
		if len(conv) == 1 && s["type"] == nil && s["properties"] == nil && s["items"] == nil {
			return conv[0].(map[string]any), nil
		}
		out["allOf"] = conv
	}
	for _, kw := range []string{"oneOf", "anyOf"} {
		if list, ok := s[kw].([]any); ok {
			conv, err := convertList(list, refs)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", kw, err)
			}
			out[kw] = conv
		}
	}
	if t, ok := s["type"]; ok {
		out["type"] = t
	}
	if e, ok := s["enum"]; ok {
		out["enum"] = e
	}
	if r, ok := s["required"].([]any); ok && len(r) > 0 {
		req := make([]string, 0, len(r))
		for _, v := range r {
			str, ok := v.(string)
			if !ok {
				return nil, fmt.Errorf("required: %v is not a string", v)
			}
			req = append(req, str)
		}
		out["required"] = req
	}
	if it, ok := s["items"].(map[string]any); ok {
		conv, err := convert(it, refs)
		if err != nil {
			return nil, fmt.Errorf("items: %w", err)
		}
		out["items"] = conv
	}
	props, _ := s["properties"].(map[string]any)
	if len(props) > 0 {
		p := make(map[string]any, len(props))
		for k, v := range props {
			m, ok := v.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("property %s is not a schema", k)
			}
			conv, err := convert(m, refs)
			if err != nil {
				return nil, fmt.Errorf("property %s: %w", k, err)
			}
			p[k] = conv
		}
		out["properties"] = p
	}
	switch ap := s["additionalProperties"].(type) {
	case bool:
		out["additionalProperties"] = ap
	case map[string]any:
		conv, err := convert(ap, refs)
		if err != nil {
			return nil, fmt.Errorf("additionalProperties: %w", err)
		}
		out["additionalProperties"] = conv
	case nil:
		if len(props) > 0 {
			// The strictness this generator exists for.
			out["additionalProperties"] = false
		}
	default:
		return nil, fmt.Errorf("additionalProperties of type %T", ap)
	}
	return out, nil
}

func convertList(list []any, refs map[string]bool) ([]any, error) {
	out := make([]any, 0, len(list))
	for i, v := range list {
		m, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("item %d is not a schema", i)
		}
		conv, err := convert(m, refs)
		if err != nil {
			return nil, fmt.Errorf("item %d: %w", i, err)
		}
		out = append(out, conv)
	}
	return out, nil
}

// writeFiles writes every schema into dir.
func writeFiles(dir string, files map[string][]byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}
