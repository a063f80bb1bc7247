package driver

import (
	"context"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/internal/testregistry"
	"github.com/boxlite-csi/boxlite-csi/pkg/rootfs"
)

// needRoot stops tests that make real bind mounts unless they run as root.
func needRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "the driver makes real bind mounts")
}

// plugin is a driver serving on a unix socket in a temp directory.
type plugin struct {
	dir    string
	sock   string
	home   string
	d      *Driver
	conn   *grpc.ClientConn
	cancel context.CancelFunc
	done   chan error
}

func (p *plugin) controller() csi.ControllerClient { return csi.NewControllerClient(p.conn) }
func (p *plugin) node() csi.NodeClient             { return csi.NewNodeClient(p.conn) }
func (p *plugin) identity() csi.IdentityClient     { return csi.NewIdentityClient(p.conn) }

func testConfig(dir string) Config {
	return Config{
		DriverName: "csi.boxlite.dev",
		Version:    "test",
		NodeID:     "node-1",
		Endpoint:   "unix://" + filepath.Join(dir, "csi.sock"),
		Home:       filepath.Join(dir, "home"),
	}
}

// startPlugin runs a driver until the test ends (or stop is called) and
// checks, once it has stopped, that nothing under dir is left mounted.
func startPlugin(t testing.TB, dir string, cfg Config) *plugin {
	t.Helper()
	return startPluginWith(t, dir, cfg, &rootfs.Ext4Builder{})
}

// startPluginWith is startPlugin with a builder of the test's choosing,
// e.g. with small image limits.
func startPluginWith(t testing.TB, dir string, cfg Config, builder BaseBuilder) *plugin {
	t.Helper()
	// Cleanups run last-in first-out: these run after p.stop below.
	t.Cleanup(func() { unsealAll(t, cfg.Home) })
	t.Cleanup(func() { assertNoMounts(t, dir) })
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, cfg, builder)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	p := &plugin{dir: dir, sock: strings.TrimPrefix(cfg.Endpoint, "unix://"), home: cfg.Home, d: d, cancel: cancel, done: make(chan error, 1)}
	go func() { p.done <- d.Run(ctx) }()
	// Ready, not just listening: the registration socket and the rest of
	// Run come up after the CSI socket does.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if c, err := net.Dial("unix", p.sock); err == nil {
			c.Close()
			if d.isServing() {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin never became ready on %s", p.sock)
		}
	}
	p.conn, err = grpc.NewClient("unix://"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	return p
}

// stop shuts the plugin down as SIGTERM would; it is safe to call twice.
func (p *plugin) stop() {
	if p.cancel == nil {
		return
	}
	p.conn.Close()
	p.cancel()
	<-p.done
	p.cancel = nil
}

// unsealAll lifts the immutable attribute of every file under dir, as the
// plugin seals frozen layers and t.TempDir's cleanup could not remove
// them. Nothing is removed: a later step of the test may use the home.
func unsealAll(t testing.TB, dir string) {
	filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() {
			return nil
		}
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil
		}
		defer unix.Close(fd)
		if v, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS); err == nil && v&immutableFlag != 0 {
			if err := unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, v&^immutableFlag); err != nil {
				t.Errorf("unseal %s: %v", p, err)
			}
		}
		return nil
	})
}

// immutableFlag is FS_IMMUTABLE_FL.
const immutableFlag = 0x10

// assertNoMounts fails if anything under dir is still mounted, and cleans
// it up so one failing test does not poison the next.
func assertNoMounts(t testing.TB, dir string) {
	t.Helper()
	ms, err := testenv.MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, mi := range ms {
		t.Errorf("leaked mount %s", mi.MountPoint)
	}
	if err := testenv.UnmountAll(dir); err != nil {
		t.Error(err)
	}
}

// testImage serves Debian's busybox-static as an image from an in-process
// registry and returns the StorageClass parameters that name it.
func testImage(t testing.TB) (params map[string]string, reg *testregistry.Registry) {
	t.Helper()
	reg = testregistry.NewInProcess(t)
	ref := reg.Ref("busybox:1")
	reg.Push(t, "busybox:1", testimage.Busybox(t))
	return map[string]string{ParamImage: ref, ParamPlainHTTP: "true"}, reg
}
