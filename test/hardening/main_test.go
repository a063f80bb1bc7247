// Package hardening holds the tests of tracker issue 5: a crash campaign
// that SIGKILLs a real boxlite-csi process at random points of volume
// lifecycles and checks what survives, and a load test that runs many
// concurrent lifecycles over several images against one process while
// cache eviction runs.
//
// Both need root (the plugin makes real bind mounts) and qemu-img/qemu-io
// (they judge the overlays); they skip with a message otherwise.
package hardening

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

var (
	crashRuns = flag.Int("crash.runs", 100, "crash campaign: how many kill -9 runs (each one volume lifecycle with one kill)")
	crashSeed = flag.Uint64("crash.seed", 0, "crash campaign: RNG seed (0 picks one from the clock and logs it)")

	loadLifecycles  = flag.Int("load.lifecycles", 200, "load test: how many full volume lifecycles")
	loadConcurrency = flag.Int("load.concurrency", 50, "load test: most lifecycles in flight at once (at 200 every image stays referenced, so eviction only runs at the end)")
	loadHold        = flag.Bool("load.hold", true, "load test: keep each volume published for a random 0-600 ms, as a pod would (off: measure the plugin's own throughput)")

	pluginRace = flag.Bool("plugin.race", false, "build the boxlite-csi binary under test with -race (slower, finds data races in the plugin)")
)

// pluginBin is the boxlite-csi binary TestMain builds. It is set once,
// before any test runs, and only read afterwards.
var pluginBin string

// tenantBin is the attacker program of the tenant-isolation suite
// (cmd/tenant), built by TestMain next to the plugin.
var tenantBin string

// TestMain builds the plugin as the real binary, because a crash test has
// to kill a process: an in-process driver cannot be SIGKILLed.
func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 {
		// The tests skip; building would only cost time.
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "boxlite-hardening-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "hardening:", err)
		os.Exit(1)
	}
	pluginBin = filepath.Join(dir, "boxlite-csi")
	args := []string{"build", "-o", pluginBin}
	if *pluginRace {
		args = append(args, "-race")
	}
	args = append(args, "github.com/boxlite-csi/boxlite-csi/cmd/boxlite-csi")
	start := time.Now()
	if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "hardening: go %v: %v\n%s", args, err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	tenantBin = filepath.Join(dir, "tenant")
	tenantArgs := []string{"build", "-o", tenantBin, "github.com/boxlite-csi/boxlite-csi/test/hardening/cmd/tenant"}
	if out, err := exec.Command("go", tenantArgs...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "hardening: go %v: %v\n%s", tenantArgs, err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	if testing.Verbose() {
		fmt.Printf("hardening: built %s in %v (race=%v)\n", pluginBin, time.Since(start).Round(time.Millisecond), *pluginRace)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
