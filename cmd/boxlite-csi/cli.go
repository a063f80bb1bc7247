package main

// The operator commands run in the same binary as the plugin, on --home
// directly: `boxlite-csi cache ls`, `box ls`, `box inspect VOLUME` and
// `box check VOLUME`. They only read, take no lock and change nothing,
// so they are safe beside a running plugin (kubectl exec into the
// DaemonSet's pod runs them there).

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/boxlite-csi/boxlite-csi/pkg/driver"
	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// cliCommand is one operator command: its two words, the arguments it
// takes after them, and what it does. run's exit code is 0 unless it
// says otherwise (box check: 1 when the disk has a problem).
type cliCommand struct {
	name, args, help string
	run              func(home string, args []string, out io.Writer, asJSON bool) (int, error)
}

// cliCommands are the operator commands.
func cliCommands() []cliCommand {
	return []cliCommand{
		{"cache ls", "", "Lists the base disks in the node cache: digest, builder version, size, the\nspace it occupies, how many links (boxes, owned copies) hold it, and when\nit was last used, which is what eviction orders by.", cacheLs},
		{"box ls", "", "Lists the volumes: image, disk and filesystem size, space allocated, the\nstaging and target paths that show the box, and what is wrong with it.", boxLs},
		{"box inspect", "VOLUME", "Shows one volume: its record, its disk and filesystem sizes, its mounts\nand the health of its disk.", boxInspect},
		{"box check", "VOLUME", "Judges one volume's disk as NodeGetVolumeHealth does, and exits 1 when\nit has a problem.", boxCheck},
	}
}

// isCLI reports whether args name an operator command rather than the
// plugin's flags.
func isCLI(args []string) bool {
	return len(args) > 0 && (args[0] == "cache" || args[0] == "box")
}

// runCLI runs an operator command: its two words, then --home and -o.
func runCLI(args []string, stdout, stderr io.Writer) int {
	var cmd *cliCommand
	for _, c := range cliCommands() {
		if len(args) >= 2 && c.name == args[0]+" "+args[1] {
			cmd = &c
		}
	}
	if cmd == nil {
		fmt.Fprintf(stderr, "boxlite-csi: unknown command %q; the commands are: cache ls, box ls, box inspect VOLUME, box check VOLUME\n", strings.Join(args[:min(len(args), 2)], " "))
		return 2
	}
	fs := flag.NewFlagSet("boxlite-csi "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	home := fs.String("home", "/var/lib/boxlite-csi", "the plugin's home to read")
	output := fs.String("o", "table", "output format: table or json")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: boxlite-csi %s [--home DIR] [-o table|json] %s\n\n%s\n\nFlags:\n", cmd.name, cmd.args, cmd.help)
		fs.PrintDefaults()
	}
	// Flags may come before or after the arguments.
	var positional []string
	for rest := args[2:]; ; {
		if err := fs.Parse(rest); err != nil {
			if err == flag.ErrHelp {
				return 0
			}
			return 2
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if len(positional) != len(strings.Fields(cmd.args)) || (*output != "table" && *output != "json") {
		fs.Usage()
		return 2
	}
	code, err := cmd.run(*home, positional, stdout, *output == "json")
	if err != nil {
		fmt.Fprintf(stderr, "boxlite-csi %s: %v\n", cmd.name, err)
		return 1
	}
	return code
}

func cacheLs(home string, _ []string, out io.Writer, asJSON bool) (int, error) {
	bases, err := rootfs.ListBases(layout.NewHome(home, layout.Config{}))
	if err != nil {
		return 1, err
	}
	if asJSON {
		type row struct {
			Digest, Builder, Path  string
			SizeBytes, OnDiskBytes int64
			Links                  int
			LastUsed               time.Time
			IndexDigest            string `json:",omitempty"`
			Anonymous              bool
			RecordProblem          string `json:",omitempty"`
		}
		rows := []row{}
		for _, b := range bases {
			rows = append(rows, row{b.Key.Digest, b.Key.Builder, b.Path, b.Size, b.Bytes, b.Links, b.LastUsed.UTC(),
				b.Info.IndexDigest, b.Info.Anonymous, b.InfoErr})
		}
		return 0, writeJSON(out, rows)
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "DIGEST\tBUILDER\tSIZE\tON DISK\tLINKS\tLAST USED")
	for _, b := range bases {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\n", shortDigest(b.Key.Digest), b.Key.Builder, human(b.Size), human(b.Bytes), b.Links, b.LastUsed.UTC().Format(time.RFC3339))
	}
	return 0, w.Flush()
}

func boxLs(home string, _ []string, out io.Writer, asJSON bool) (int, error) {
	vols, err := driver.ListVolumes(home)
	if err != nil {
		return 1, err
	}
	if asJSON {
		if vols == nil {
			vols = []driver.VolumeInfo{}
		}
		return 0, writeJSON(out, vols)
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VOLUME\tNAME\tIMAGE\tDISK\tFILESYSTEM\tALLOCATED\tMOUNTS\tPROBLEM")
	for _, v := range vols {
		name := v.Name
		if v.Ephemeral {
			name = "(inline)"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", v.ID, orDash(name), v.Image, diskText(v), fsText(v), human(v.AllocatedBytes), len(v.Mounts), orDash(problem(v)))
	}
	return 0, w.Flush()
}

func boxInspect(home string, args []string, out io.Writer, asJSON bool) (int, error) {
	v, err := driver.InspectVolume(home, args[0])
	if err != nil {
		return 1, err
	}
	if asJSON {
		return 0, writeJSON(out, v)
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	for _, kv := range [][2]string{
		{"Volume", v.ID}, {"Name", orDash(v.Name)}, {"Ephemeral", fmt.Sprint(v.Ephemeral)},
		{"Image", v.Image}, {"Digest", v.Digest},
		{"Capacity", human(v.Capacity)}, {"Expanded to", orDash(humanIf(v.ExpandedBytes))},
		{"Disk", diskText(v)}, {"Filesystem", fsText(v)}, {"Allocated", human(v.AllocatedBytes)},
		{"Chain", strings.Join(append([]string{"guest-rootfs.qcow2"}, v.Chain...), " -> ")}, {"Source", orDash(v.Source)},
		{"Mounts", orDash(strings.Join(v.Mounts, ", "))}, {"Health", orDash(problem(v))},
	} {
		fmt.Fprintf(w, "%s:\t%s\n", kv[0], kv[1])
	}
	return 0, w.Flush()
}

func boxCheck(home string, args []string, out io.Writer, asJSON bool) (int, error) {
	v, err := driver.InspectVolume(home, args[0])
	if err != nil {
		return 1, err
	}
	code := 0
	if len(v.Health) > 0 || v.Problem != "" {
		code = 1
	}
	if asJSON {
		verdicts := v.Health
		if verdicts == nil {
			verdicts = []driver.Verdict{}
		}
		return code, writeJSON(out, verdicts)
	}
	if code == 0 {
		fmt.Fprintf(out, "%s: healthy\n", v.ID)
		return 0, nil
	}
	if v.Problem != "" {
		fmt.Fprintf(out, "%s: %s\n", v.ID, v.Problem)
	}
	for _, h := range v.Health {
		fmt.Fprintf(out, "%s: %s %s: %s\n", v.ID, h.Status, h.Reason, h.Message)
	}
	return code, nil
}

func diskText(v driver.VolumeInfo) string {
	if v.DiskBytes == 0 {
		return "-"
	}
	return human(int64(v.DiskBytes))
}

func fsText(v driver.VolumeInfo) string {
	if v.FilesystemBytes == 0 {
		return "base"
	}
	return human(int64(v.FilesystemBytes))
}

// problem is what is wrong with a volume, in a few words.
func problem(v driver.VolumeInfo) string {
	var out []string
	if v.Problem != "" {
		out = append(out, v.Problem)
	}
	for _, h := range v.Health {
		out = append(out, h.Reason)
	}
	return strings.Join(out, ", ")
}

func humanIf(n int64) string {
	if n == 0 {
		return ""
	}
	return human(n)
}

func writeJSON(out io.Writer, v any) error {
	e := json.NewEncoder(out)
	e.SetIndent("", "  ")
	return e.Encode(v)
}

// shortDigest is a digest's algorithm and first 12 hex digits.
func shortDigest(d string) string {
	if alg, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return alg + ":" + hex[:12]
	}
	return d
}

// human is a byte count in binary units, as the size flags take them.
func human(n int64) string {
	for _, u := range []struct {
		shift int
		name  string
	}{{40, "Ti"}, {30, "Gi"}, {20, "Mi"}, {10, "Ki"}} {
		if n >= 1<<u.shift {
			return fmt.Sprintf("%.1f%s", float64(n)/float64(int64(1)<<u.shift), u.name)
		}
	}
	return fmt.Sprintf("%dB", n)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
