package testimage

import (
	"archive/tar"
	"os"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
)

// BusyboxPath is where Debian's busybox-static installs the binary.
const BusyboxPath = "/bin/busybox"

// BusyboxApplets are the symlinks to busybox the image has in /bin.
var BusyboxApplets = []string{"cat", "echo", "env", "id", "ls", "mkdir", "sh", "sleep", "true"}

// BusyboxConfig is the config of the Busybox image.
func BusyboxConfig() v1.Config {
	return v1.Config{
		Env: []string{
			"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			"GREETING=hello=world",
			"NOEQ",
			"EMPTY=",
		},
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{"echo $GREETING"},
		WorkingDir: "/root",
		User:       "0:0",
	}
}

// Busybox is a one-layer image holding the host's static busybox
// (Debian package busybox-static) at /bin/busybox, applet symlinks,
// /etc/passwd and /etc/group, with BusyboxConfig. It skips the test when
// /bin/busybox is absent. Its digest depends on the installed busybox.
func Busybox(t testing.TB) v1.Image {
	t.Helper()
	bin, err := os.ReadFile(BusyboxPath)
	if os.IsNotExist(err) {
		testenv.Unmet(t, "%s is not installed (apt-get install busybox-static)", BusyboxPath)
	}
	if err != nil {
		t.Fatalf("testimage: %v", err)
	}
	mtime := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	dir := func(name string, mode int64) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, ModTime: mtime}}
	}
	file := func(name string, mode int64, body []byte) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, ModTime: mtime}, body: body}
	}
	entries := []tarEntry{
		dir("bin", 0o755),
		file("bin/busybox", 0o755, bin),
	}
	for _, a := range BusyboxApplets {
		entries = append(entries, tarEntry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777, ModTime: mtime}})
	}
	entries = append(entries,
		dir("etc", 0o755),
		file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")),
		file("etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n")),
		dir("root", 0o700),
		dir("tmp", 0o1777),
	)
	return build(t, BusyboxConfig(), tarLayer(t, entries))
}
