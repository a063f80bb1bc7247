// Command boxlite-csi is the boxlite-csi node plugin: a CSI driver that
// hands each volume a ready-to-boot micro-VM box whose root disk is a qcow2
// overlay over a shared, read-only base disk built from an OCI image.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// version is stamped at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// options are the command-line settings; flags bind to its fields so that
// nothing global is mutated.
type options struct {
	home        string
	showVersion bool
}

func newFlagSet(o *options, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("boxlite-csi", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.home, "home", "/var/lib/boxlite-csi",
		"node cache and box directory: images/disk-images holds shared base disks, boxes/<volume> one box per volume; tmp, bases and images must be on one filesystem")
	fs.BoolVar(&o.showVersion, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: boxlite-csi [flags]

boxlite-csi is a Kubernetes CSI node plugin for micro-VM sandboxes. Each
volume is a box directory whose disks/guest-rootfs.qcow2 is a copy-on-write
overlay over a read-only ext4 base disk, built once per image digest and
shared from the node cache under --home.

Flags:
`)
		fs.PrintDefaults()
	}
	return fs
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o options
	fs := newFlagSet(&o, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "boxlite-csi: unexpected arguments %q\n", fs.Args())
		fs.Usage()
		return 2
	}
	if o.showVersion {
		fmt.Fprintf(stdout, "boxlite-csi %s %s %s/%s\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return 0
	}
	return serve(ctx, o, stderr)
}

// serve prepares the node home. The CSI endpoint is added by the CSI
// driver work; until then the plugin checks its home and exits.
func serve(ctx context.Context, o options, stderr io.Writer) int {
	if err := ctx.Err(); err != nil {
		fmt.Fprintf(stderr, "boxlite-csi: %v\n", err)
		return 1
	}
	home := layout.NewHome(o.home, layout.Config{BindMountSupported: true})
	if err := home.Prepare(); err != nil {
		fmt.Fprintf(stderr, "boxlite-csi: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "boxlite-csi %s: home %s prepared; the CSI endpoint is not implemented yet\n", version, home.Dir())
	return 0
}
