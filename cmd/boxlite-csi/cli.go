package main

// The operator commands run in the same binary as the plugin, on --home
// directly: `boxlite-csi cache ls` and `boxlite-csi box ls`. They only
// read, take no lock and change nothing, so they are safe beside a
// running plugin (kubectl exec into the DaemonSet's pod runs them there).

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

// cliCommand is one operator command.
type cliCommand struct {
	name, help string
	run        func(home string, out io.Writer, asJSON bool) error
}

// cliCommands are the operator commands.
func cliCommands() []cliCommand {
	return []cliCommand{
		{"cache ls", "Lists the base disks in the node cache: digest, builder version, size, the\nspace it occupies, how many links (boxes, owned copies) hold it, and when\nit was last used, which is what eviction orders by.", cacheLs},
		{"box ls", "Lists the volumes: image, disk and filesystem size, space allocated, and\nthe staging and target paths that show the box.", boxLs},
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
		fmt.Fprintf(stderr, "boxlite-csi: unknown command %q; the commands are: cache ls, box ls\n", strings.Join(args[:min(len(args), 2)], " "))
		return 2
	}
	fs := flag.NewFlagSet("boxlite-csi "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	home := fs.String("home", "/var/lib/boxlite-csi", "the plugin's home to read")
	output := fs.String("o", "table", "output format: table or json")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: boxlite-csi %s [--home DIR] [-o table|json]\n\n%s\n\nFlags:\n", cmd.name, cmd.help)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[2:]); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || (*output != "table" && *output != "json") {
		fs.Usage()
		return 2
	}
	if err := cmd.run(*home, stdout, *output == "json"); err != nil {
		fmt.Fprintf(stderr, "boxlite-csi %s: %v\n", cmd.name, err)
		return 1
	}
	return 0
}

func cacheLs(home string, out io.Writer, asJSON bool) error {
	bases, err := rootfs.ListBases(layout.NewHome(home, layout.Config{}))
	if err != nil {
		return err
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
		return writeJSON(out, rows)
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "DIGEST\tBUILDER\tSIZE\tON DISK\tLINKS\tLAST USED")
	for _, b := range bases {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\n", shortDigest(b.Key.Digest), b.Key.Builder, human(b.Size), human(b.Bytes), b.Links, b.LastUsed.UTC().Format(time.RFC3339))
	}
	return w.Flush()
}

func boxLs(home string, out io.Writer, asJSON bool) error {
	vols, err := driver.ListVolumes(home)
	if err != nil {
		return err
	}
	if asJSON {
		if vols == nil {
			vols = []driver.VolumeInfo{}
		}
		return writeJSON(out, vols)
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VOLUME\tNAME\tIMAGE\tDISK\tFILESYSTEM\tALLOCATED\tMOUNTS\tPROBLEM")
	for _, v := range vols {
		fsys := "base"
		if v.FilesystemBytes > 0 {
			fsys = human(int64(v.FilesystemBytes))
		}
		disk := "-"
		if v.DiskBytes > 0 {
			disk = human(int64(v.DiskBytes))
		}
		name := v.Name
		if v.Ephemeral {
			name = "(inline)"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", v.ID, orDash(name), v.Image, disk, fsys, human(v.AllocatedBytes), len(v.Mounts), orDash(v.Problem))
	}
	return w.Flush()
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
