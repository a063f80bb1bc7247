// Command pause is the sandbox ("pause") image's only process: it holds
// the pod's namespaces open and exits when the runtime signals it. No
// image can be pulled on the e2e node, so containerd's sandbox_image is
// built from this.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// As PID 1 of the sandbox it must also reap orphans: containers that
	// share the pod's PID namespace would otherwise leave zombies.
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
