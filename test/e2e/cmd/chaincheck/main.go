// Command chaincheck runs inside a test pod, against the box the pod has
// mounted, and proves what the pod itself can see: the overlay's backing
// chain resolves through the box's own base/ link, the overlay names its
// base the way boxlite-csi writes it, and the base cannot be written.
//
// It prints one line per check and exits non-zero on the first failure,
// so the e2e test can assert on both the exit status and the output.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

func main() {
	box := flag.String("box", "/box", "mounted box directory")
	flag.Parse()
	if err := run(*box); err != nil {
		fmt.Printf("FAIL %v\n", err)
		os.Exit(1)
	}
	fmt.Println("CHAINCHECK OK")
}

func run(box string) error {
	overlay := filepath.Join(box, "disks", "guest-rootfs.qcow2")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	links, err := qcow2.Chain(ctx, overlay)
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	for i, l := range links {
		fmt.Printf("link %d %s %s\n", i, l.Format, l.Path)
	}
	if len(links) != 2 {
		return fmt.Errorf("chain has %d links, want overlay + base", len(links))
	}
	base := filepath.Join(box, "base", "rootfs.ext4")
	if filepath.Clean(links[1].Path) != base || links[1].Format != qcow2.FormatRaw {
		return fmt.Errorf("chain ends at %s (%s), want raw %s", links[1].Path, links[1].Format, base)
	}
	if _, err := qcow2.Verify(overlay, qcow2.Expect{BackingFile: "../base/rootfs.ext4", BackingFormat: qcow2.FormatRaw}); err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	fmt.Printf("overlay size %d backing %s\n", links[0].Header.Size, links[0].Header.BackingFile)

	// The base is shared by every box on the node: a pod, even one running
	// as root, must not be able to change it.
	f, err := os.OpenFile(base, os.O_WRONLY, 0)
	if err == nil {
		f.Close()
		return errors.New("base opened for writing")
	}
	if !errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("writing base: want EROFS, got %w", err)
	}
	fmt.Printf("base write refused: %v\n", err)
	var st syscall.Stat_t
	if err := syscall.Stat(base, &st); err != nil {
		return err
	}
	fmt.Printf("base dev %d ino %d size %d\n", st.Dev, st.Ino, st.Size)
	return nil
}
