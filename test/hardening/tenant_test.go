package hardening

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	ocilayout "github.com/google/go-containerregistry/pkg/v1/layout"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"

	"github.com/boxlite-csi/boxlite-csi/internal/testenv"
	"github.com/boxlite-csi/boxlite-csi/internal/testimage"
	"github.com/boxlite-csi/boxlite-csi/pkg/qcow2"
)

// tenantRPCDeadline bounds every CSI call of the suite. The plugin has
// nothing else to do, so a call still unanswered by then hangs (on a
// planted FIFO, typically), and the suite names it.
const tenantRPCDeadline = 4 * time.Second

// tenantEvictWait is how long an unreferenced base may survive: the plugin
// runs with a 200 ms grace and a pass every 50 ms.
const tenantEvictWait = 3 * time.Second

// TestTenantIsolation attacks a published box the way a tenant (a pod's
// root) could, and checks that nothing of the node or of another tenant
// is touched. The attacker (test/hardening/cmd/tenant) runs in its own
// mount namespace, either as uid 0 with every capability but
// CAP_DAC_OVERRIDE dropped from all its sets, no_new_privs set ("caps"),
// or as root of a user namespace of its own ("userns"); it proves that
// confinement from the inside before it attacks, and works only through
// the published target path.
//
// For each attack a new volume (tenant A) is created, staged and
// published; the attack runs; then the calls kubelet and the provisioner
// would make follow (each row lists them), the plugin is killed and
// restarted, and the volume is torn down. Another tenant's volume (tenant
// B, on another image) stays published throughout. After the attack and
// after every call the suite checks:
//
//   - the mount table: no mount on / or above the test's directory came or
//     went, and nothing of the test's directory is mounted outside it (the
//     rest of the machine's table belongs to whatever else runs there);
//     inside it, only tenant B's mounts and tenant A's staging and target mounts
//     (each showing its own box), and inside A's paths only A's own base,
//     read-only; nothing stacked, nothing left after an unstage;
//   - sentinels outside the box (a file, a FIFO, a directory holding a
//     file named like an overlay and another FIFO) are unchanged, and
//     nothing opened them (inotify) or holds a FIFO open;
//   - tenant B's record, box.json and base are unchanged, B's base is
//     still cached, and nothing in A's box is B's base inode;
//   - every call answers within tenantRPCDeadline;
//   - a NodeStage that succeeds leaves a whole box: disks/ a directory, a
//     regular overlay, A's own base inode, a box.json naming A's image;
//   - while the attacked box exists, eviction still runs (a canary
//     volume's base is evicted once the canary is deleted), and after a
//     restart the plugin serves;
//   - DeleteVolume leaves nothing (no box, no set-aside box, no record, no
//     mount in the home), and A's base is then evicted.
func TestTenantIsolation(t *testing.T) {
	testenv.RequireRoot(t, "the plugin makes real bind mounts and the attacker needs namespaces")
	s := &tenantSuite{
		unshare: testenv.RequireTool(t, "unshare", "apt-get install util-linux"),
		setpriv: testenv.RequireTool(t, "setpriv", "apt-get install util-linux"),
		mount:   testenv.RequireTool(t, "mount", "apt-get install mount"),
	}
	if pluginBin == "" || tenantBin == "" {
		t.Fatal("TestMain did not build the plugin and the attacker")
	}
	start := time.Now()
	s.setup(t)

	for _, c := range tenantConfinements(s) {
		for _, r := range tenantRows {
			if c.rows != nil && !c.rows[r.id] {
				continue
			}
			t.Run(c.name+"/"+r.id, func(t *testing.T) {
				if s.down {
					t.Fatal("the plugin did not come back after an earlier row")
				}
				s.runRow(t, c, r)
			})
		}
	}
	if err := s.p.stop(); err != nil {
		t.Error(err)
	}
	t.Logf("tenant isolation: %d plugin starts in %v", s.p.starts, time.Since(start).Round(time.Millisecond))
}

// tenantOp is one call that follows an attack.
type tenantOp string

const (
	opUnpublish tenantOp = "NodeUnpublishVolume"
	opUnstage   tenantOp = "NodeUnstageVolume"
	opStage     tenantOp = "NodeStageVolume"
	opStats     tenantOp = "NodeGetVolumeStats"
	opHealth    tenantOp = "NodeGetVolumeHealth"
	opExpand    tenantOp = "NodeExpandVolume"
	opDelete    tenantOp = "DeleteVolume"
)

type tenantRow struct {
	id     string
	attack string // the attacker's subcommand
	steps  []tenantOp
	// mustStage: a NodeStage after the attack must succeed (the tenant only
	// hurt its own, recoverable state, or nothing at all). Otherwise it may
	// also be refused with FailedPrecondition, never anything else.
	mustStage bool
	// unhealthy: while the attack stands, NodeGetVolumeHealth must report
	// a problem with the box.
	unhealthy bool
}

// Unpublish, unstage and delete must always succeed: kubelet and the
// provisioner must be able to take a tampered volume away.
var tenantRows = []tenantRow{
	{id: "1-base-renamed-symlink-to-host-file-restaged", attack: "rename-base",
		steps: []tenantOp{opUnpublish, opUnstage, opStage}},
	{id: "2-base-renamed-symlink-to-host-file-deleted", attack: "rename-base",
		steps: []tenantOp{opUnpublish, opUnstage, opDelete}},
	{id: "3a-box.json-replaced-by-fifo", attack: "fifo-manifest",
		steps: []tenantOp{opStats, opHealth, opUnpublish, opUnstage, opStage}},
	{id: "3b-overlay-replaced-by-fifo", attack: "fifo-overlay", unhealthy: true,
		steps: []tenantOp{opStats, opHealth, opExpand, opUnpublish, opUnstage, opStage}},
	{id: "3c-disks-replaced-by-symlink-to-host-dir", attack: "disks-symlink", unhealthy: true,
		steps: []tenantOp{opStats, opHealth, opExpand, opUnpublish, opUnstage, opStage}},
	{id: "4-box.json-forged-overlay-deleted", attack: "edit-manifest", mustStage: true,
		steps: []tenantOp{opUnpublish, opUnstage, opStage}},
	{id: "5-links-fifos-sockets-planted-everywhere", attack: "plant", mustStage: true,
		steps: []tenantOp{opExpand, opUnpublish, opUnstage, opStage, opStats, opHealth, opUnstage, opDelete}},
	{id: "5b-box-dirs-replaced-by-symlinks-to-host-dir", attack: "dirs-symlink",
		steps: []tenantOp{opStats, opHealth, opExpand, opUnpublish, opUnstage, opStage, opStats, opHealth, opUnstage, opDelete}},
	{id: "6-remount-bind-write-base", attack: "mount", mustStage: true,
		steps: []tenantOp{opStats, opHealth, opExpand, opUnpublish, opUnstage, opStage, opUnstage, opDelete}},
}

type tenantConfinement struct {
	name string
	args []string // the command line up to the attacker binary
	mode string   // the attacker's -confine
	rows map[string]bool
}

// tenantConfinements: a tenant without CAP_SYS_ADMIN (CAP_DAC_OVERRIDE
// kept, as a pod's root has it, so that a write to the base is stopped by
// the read-only mount and not by the file's mode), and root of a user
// namespace, which may mount in its own mount namespace but inherits the
// box's mounts locked.
func tenantConfinements(s *tenantSuite) []tenantConfinement {
	return []tenantConfinement{
		{name: "caps", mode: "caps", args: []string{s.unshare, "--mount", "--propagation", "slave", "--",
			s.setpriv, "--no-new-privs", "--bounding-set=-all,+dac_override", "--inh-caps=-all", "--ambient-caps=-all", "--"}},
		{name: "userns", mode: "userns", args: []string{s.unshare, "--user", "--map-root-user", "--mount", "--propagation", "slave", "--",
			s.setpriv, "--no-new-privs", "--"},
			rows: map[string]bool{tenantRows[0].id: true, tenantRows[6].id: true, tenantRows[8].id: true}},
	}
}

type tenantSuite struct {
	unshare, setpriv, mount string

	dir, home, cacheDir string
	p                   *proc
	down                bool
	hostMnt, hostUser   string

	paramsA, paramsC map[string]string
	sent             *sentinels
	outside          *hostMounts

	// Tenant B, the neighbour.
	other       *volume
	otherDev    uint64
	otherIno    uint64
	otherBase   string // its cached base
	otherVer    fileVersion
	otherFiles  map[string]string // path: sha256, of B's record and box.json
	otherDigest string
}

// tenantVol is tenant A's volume and what the suite knows of it.
type tenantVol struct {
	*volume
	staged, published, deleted bool
	digest                     string
	baseDev, baseIno           uint64
	baseSum                    string
}

func (s *tenantSuite) setup(t *testing.T) {
	s.dir = t.TempDir()
	// Registered after TempDir, so it runs before the directory goes (and
	// after the plugin is killed, which newProc registers later).
	t.Cleanup(func() { unmountAll(t, s.dir) })
	s.home = filepath.Join(s.dir, "home")
	s.cacheDir = filepath.Join(s.home, "images", "disk-images")
	var err error
	if s.hostMnt, err = os.Readlink("/proc/self/ns/mnt"); err != nil {
		t.Fatal(err)
	}
	if s.hostUser, err = os.Readlink("/proc/self/ns/user"); err != nil {
		t.Fatal(err)
	}
	layout := func(name string, seed int64) map[string]string {
		p := filepath.Join(s.dir, "oci-"+name)
		lp, err := ocilayout.Write(p, empty.Index)
		if err != nil {
			t.Fatal(err)
		}
		if err := lp.AppendImage(testimage.Random(t, seed, 1, 40, 256<<10)); err != nil {
			t.Fatal(err)
		}
		return map[string]string{"image": "oci:" + p}
	}
	s.paramsA, s.paramsC = layout("a", 21), layout("canary", 23)
	paramsB := layout("b", 22)
	s.sent = newSentinels(t, filepath.Join(s.dir, "host"))

	// A cache that holds nothing unreferenced for long: every base no box
	// links is evicted 200 ms after its last use.
	s.p = newProc(t, s.dir, "--base-min-size=4Mi", "--base-headroom=1Mi",
		"--eviction-interval=50ms", "--cache-grace=200ms", "--cache-max-size=1")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin log tail:\n%s", s.p.logTail(16<<10))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.p.start(ctx); err != nil {
		t.Fatal(err)
	}

	s.other = s.newVolume("tenant-b", paramsB)
	for _, st := range []step{stepCreate, stepStage, stepPublish} {
		if err := s.call(st.String()+" tenant-b", func(ctx context.Context) error { return s.p.call(ctx, s.other, st) }); err != nil {
			t.Fatal(err)
		}
		if st == stepCreate {
			s.other.box = filepath.Join(s.home, "boxes", s.other.id)
		}
	}
	s.otherDigest = s.other.volumeContext["digest"]
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(s.other.box, "base", "rootfs.ext4"), &st); err != nil {
		t.Fatal(err)
	}
	s.otherDev, s.otherIno = st.Dev, st.Ino
	cached := s.cached(s.otherDigest)
	if len(cached) != 1 {
		t.Fatalf("tenant B's base: cache holds %v", cached)
	}
	s.otherBase = cached[0]
	if s.otherVer, err = statVersion(s.otherBase); err != nil {
		t.Fatal(err)
	}
	if s.otherVer.ino != s.otherIno {
		t.Fatalf("tenant B's box links inode %d, the cache holds %s as %d", s.otherIno, s.otherBase, s.otherVer.ino)
	}
	s.otherFiles = map[string]string{}
	for _, p := range []string{s.recordPath(s.other.id), filepath.Join(s.other.box, "box.json")} {
		s.otherFiles[p] = fileSum(p)
	}
	if s.outside, err = newHostMounts(s.dir); err != nil {
		t.Fatal(err)
	}
	if errs := s.invariants(nil); len(errs) > 0 {
		t.Fatalf("before any attack: %v", errors.Join(errs...))
	}
}

func (s *tenantSuite) newVolume(name string, params map[string]string) *volume {
	return &volume{
		name:     name,
		params:   params,
		capacity: 64 << 20,
		staging:  filepath.Join(s.dir, "kubelet", "plugins", "staging", name),
		target:   filepath.Join(s.dir, "kubelet", "pods", name, "volumes", "box"),
	}
}

func (s *tenantSuite) recordPath(id string) string {
	return filepath.Join(s.home, "volumes", id+".json")
}

func (s *tenantSuite) cached(digest string) []string {
	m, _ := filepath.Glob(filepath.Join(s.cacheDir, strings.Replace(digest, ":", "-", 1)+".*.ext4"))
	return m
}

// errHung marks a call that did not answer within tenantRPCDeadline.
var errHung = errors.New("hung")

// call runs one CSI call with the suite's deadline. A call that hangs
// is reported as such, and the plugin is restarted so that the stuck call
// (and the lock it holds) does not take the following ones with it.
func (s *tenantSuite) call(what string, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), tenantRPCDeadline)
	defer cancel()
	start := time.Now()
	err := f(ctx)
	if status.Code(err) == codes.DeadlineExceeded || ctx.Err() != nil {
		err = fmt.Errorf("%s %w: no answer within %v (%v)", what, errHung, time.Since(start).Round(time.Millisecond), err)
		if rerr := s.restart(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return err
	}
	return err
}

// restart kills the plugin and starts it again on the same home.
func (s *tenantSuite) restart() error {
	s.p.kill()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := s.p.start(ctx); err != nil {
		s.down = true
		return fmt.Errorf("the plugin does not restart: %w", err)
	}
	return nil
}

func (s *tenantSuite) runRow(t *testing.T, c tenantConfinement, r tenantRow) {
	s.sent.populate(t)
	a := &tenantVol{volume: s.newVolume("tenant-a-"+c.name+"-"+r.id[:strings.IndexByte(r.id, '-')], s.paramsA)}
	check := func(when string) {
		t.Helper()
		if errs := s.invariants(a); len(errs) > 0 {
			t.Errorf("%s: %v", when, errors.Join(errs...))
		}
	}
	for _, st := range []step{stepCreate, stepStage, stepPublish} {
		if err := s.call(st.String(), func(ctx context.Context) error { return s.p.call(ctx, a.volume, st) }); err != nil {
			t.Fatalf("%s before the attack: %v", st, err)
		}
		switch st {
		case stepCreate:
			a.box = filepath.Join(s.home, "boxes", a.id)
			a.digest = a.volumeContext["digest"]
			t.Cleanup(func() { s.forceDelete(t, a) })
		case stepStage:
			a.staged = true
			var stt unix.Stat_t
			if err := unix.Lstat(filepath.Join(a.box, "base", "rootfs.ext4"), &stt); err != nil {
				t.Fatal(err)
			}
			a.baseDev, a.baseIno = stt.Dev, stt.Ino
			cached := s.cached(a.digest)
			if len(cached) != 1 {
				t.Fatalf("tenant A's base: cache holds %v", cached)
			}
			a.baseSum = fileSum(cached[0])
		case stepPublish:
			a.published = true
		}
	}
	check("before the attack")
	// A fresh process per row: what an earlier row did to the plugin (a
	// stuck eviction pass) must not be blamed on this one.
	if err := s.restart(); err != nil {
		t.Fatal(err)
	}

	s.attack(t, c, r.attack, a)
	check("after the attack")

	for _, op := range r.steps {
		s.step(t, r, a, op)
		check("after " + string(op))
		if s.down {
			t.FailNow()
		}
	}

	// Eviction must still run while the attacked box exists: a canary
	// volume's base, unreferenced once it is deleted, must go.
	s.canary(t, a)
	check("after the canary")

	if err := s.restart(); err != nil {
		t.Fatal(err)
	}
	if err := s.serves(); err != nil {
		t.Errorf("after the restart: %v", err)
	}
	check("after the restart")

	s.checkBaseA(t, a)

	// Tear down as kubelet and the provisioner would.
	for _, op := range []tenantOp{opUnpublish, opUnstage, opDelete} {
		if (op == opUnpublish && !a.published) || (op == opUnstage && !a.staged) || a.deleted {
			continue
		}
		s.step(t, r, a, op)
		check("after the teardown's " + string(op))
		if s.down {
			t.FailNow()
		}
	}
	if a.deleted {
		s.waitEvicted(t, "tenant A's", a.digest)
	}
}

// checkBaseA: the shared base of A's image, which its box still links,
// is byte for byte what was built.
func (s *tenantSuite) checkBaseA(t *testing.T, a *tenantVol) {
	t.Helper()
	if a.deleted {
		return
	}
	if cached := s.cached(a.digest); len(cached) != 1 {
		t.Errorf("tenant A's base is no longer cached while its box links it: %v", cached)
	} else if sum := fileSum(cached[0]); sum != a.baseSum {
		t.Errorf("tenant A's base %s changed: sha256 %s, built as %s", cached[0], sum, a.baseSum)
	}
}

// step issues one call of a row and checks its answer.
func (s *tenantSuite) step(t *testing.T, r tenantRow, a *tenantVol, op tenantOp) {
	t.Helper()
	node := func() csi.NodeClient { return csi.NewNodeClient(s.p.conn) }
	want := func(err error, ok ...codes.Code) {
		t.Helper()
		for _, c := range ok {
			if status.Code(err) == c {
				return
			}
		}
		t.Errorf("%s after the attack: %v (want %v)", op, err, ok)
	}
	var err error
	switch op {
	case opUnpublish, opUnstage, opDelete:
		if op == opDelete {
			s.checkBaseA(t, a)
		}
		st := map[tenantOp]step{opUnpublish: stepUnpublish, opUnstage: stepUnstage, opDelete: stepDelete}[op]
		err = s.call(string(op), func(ctx context.Context) error { return s.p.call(ctx, a.volume, st) })
		want(err, codes.OK)
		if err == nil {
			switch op {
			case opUnpublish:
				a.published = false
			case opUnstage:
				a.staged = false
			case opDelete:
				a.deleted = true
				if errs := s.gone(a); len(errs) > 0 {
					t.Errorf("after DeleteVolume: %v", errors.Join(errs...))
				}
			}
		}
	case opStage:
		err = s.call(string(op), func(ctx context.Context) error { return s.p.call(ctx, a.volume, stepStage) })
		if r.mustStage {
			want(err, codes.OK)
		} else {
			want(err, codes.OK, codes.FailedPrecondition)
		}
		if err == nil {
			a.staged = true
			if errs := s.wholeBox(a); len(errs) > 0 {
				t.Errorf("NodeStageVolume succeeded on a box that is not whole: %v", errors.Join(errs...))
			}
		} else if !errors.Is(err, errHung) {
			t.Logf("NodeStageVolume after the attack: %v", err)
		}
	case opStats:
		p := a.staging
		if a.published {
			p = a.target
		}
		var resp *csi.NodeGetVolumeStatsResponse
		err = s.call(string(op), func(ctx context.Context) (err error) {
			resp, err = node().NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: a.id, VolumePath: p})
			return err
		})
		if a.staged {
			want(err, codes.OK, codes.FailedPrecondition)
		} else {
			want(err, codes.OK, codes.FailedPrecondition, codes.NotFound)
		}
		t.Logf("%s: %v %v", op, resp.GetUsage(), err)
	case opExpand:
		// The disk grows, or the call is refused for what the tenant did
		// (FailedPrecondition) or a size it cannot take (OutOfRange); the
		// checks after every call show nothing else was touched.
		p := a.staging
		if a.published {
			p = a.target
		}
		var resp *csi.NodeExpandVolumeResponse
		err = s.call(string(op), func(ctx context.Context) (err error) {
			resp, err = node().NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: a.id, VolumePath: p,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 30}})
			return err
		})
		want(err, codes.OK, codes.FailedPrecondition, codes.OutOfRange)
		t.Logf("%s: %d bytes, %v", op, resp.GetCapacityBytes(), err)
	case opHealth:
		req := &csi.NodeGetVolumeHealthRequest{VolumeId: a.id}
		if a.published {
			req.VolumePublishPath = a.target
		}
		if a.staged {
			req.StagingTargetPath = a.staging
		}
		var resp *csi.NodeGetVolumeHealthResponse
		err = s.call(string(op), func(ctx context.Context) (err error) {
			resp, err = node().NodeGetVolumeHealth(ctx, req)
			return err
		})
		want(err, codes.OK)
		var problems []string
		for _, h := range resp.GetVolumeHealth().GetHealthStatuses() {
			if h.GetReason() != "CacheAboveHighWatermark" {
				problems = append(problems, h.GetReason()+": "+h.GetMessage())
			}
		}
		t.Logf("%s: %q", op, problems)
		if err == nil && r.unhealthy && a.published && len(problems) == 0 {
			t.Errorf("%s reports the attacked box healthy", op)
		}
	}
}

// attack runs the attacker on A's target path.
func (s *tenantSuite) attack(t *testing.T, c tenantConfinement, attack string, a *tenantVol) {
	t.Helper()
	args := append(append([]string{}, c.args...), tenantBin,
		"-confine="+c.mode, fmt.Sprintf("-caps=%#x", 1<<unix.CAP_DAC_OVERRIDE),
		"-host-mnt-ns="+s.hostMnt, "-host-user-ns="+s.hostUser,
		"-secret="+s.sent.secret, "-fifo="+s.sent.fifo, "-host-dir="+s.sent.hostDir,
		"-links="+strings.Join([]string{s.other.box, s.recordPath(s.other.id), s.otherBase, s.cacheDir}, ","),
		"-other-digest="+s.otherDigest, "-other-pinned="+s.other.volumeContext["pinned"], fmt.Sprintf("-other-inode=%d", s.otherIno),
		"-mount="+s.mount,
		attack, a.target)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 3 {
		t.Fatalf("the attacker is not confined: %s\n%s", strings.Join(args, " "), out)
	}
	if err != nil {
		t.Errorf("attacker failed (%v): %s\n%s", err, strings.Join(args, " "), out)
		return
	}
	t.Logf("attacker: %s\n%s", strings.Join(args, " "), out)
}

// canary creates, stages, unstages and deletes a volume of a third image
// next to the attacked box, and waits for eviction to remove its base.
func (s *tenantSuite) canary(t *testing.T, a *tenantVol) {
	t.Helper()
	v := s.newVolume("canary-"+a.name, s.paramsC)
	for _, st := range []step{stepCreate, stepStage, stepUnstage, stepDelete} {
		if err := s.call("canary "+st.String(), func(ctx context.Context) error { return s.p.call(ctx, v, st) }); err != nil {
			t.Errorf("canary %s next to the attacked box: %v", st, err)
			return
		}
	}
	s.waitEvicted(t, "the canary's", v.volumeContext["digest"])
}

func (s *tenantSuite) waitEvicted(t *testing.T, whose, digest string) {
	t.Helper()
	deadline := time.Now().Add(tenantEvictWait)
	for {
		left := s.cached(digest)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("eviction did not remove %s unreferenced base %v within %v (%d bases evicted so far, plugin log: %d eviction failures)",
				whose, left, tenantEvictWait, countInFile(s.p.log.Name(), "Evicted base disk"), countInFile(s.p.log.Name(), "Eviction pass failed"))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serves: the restarted plugin answers node calls for the neighbour.
func (s *tenantSuite) serves() error {
	return s.call("NodeGetVolumeStats of tenant B", func(ctx context.Context) error {
		_, err := csi.NewNodeClient(s.p.conn).NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: s.other.id, VolumePath: s.other.target})
		return err
	})
}

// forceDelete makes sure a failed row leaves no volume behind.
func (s *tenantSuite) forceDelete(t *testing.T, a *tenantVol) {
	if a.deleted || s.down || s.p.conn == nil {
		return
	}
	for _, st := range []step{stepUnpublish, stepUnstage, stepDelete} {
		if err := s.call("cleanup "+st.String(), func(ctx context.Context) error { return s.p.call(ctx, a.volume, st) }); err != nil {
			t.Logf("cleanup %s of %s: %v", st, a.id, err)
		}
	}
	a.deleted = true
}

// wholeBox checks the box a successful NodeStage hands to the runtime.
func (s *tenantSuite) wholeBox(a *tenantVol) []error {
	var errs []error
	if fi, err := os.Lstat(filepath.Join(a.box, "disks")); err != nil || !fi.IsDir() {
		errs = append(errs, fmt.Errorf("disks/ is not a directory (%v, %v)", modeOf(fi), err))
	}
	overlay := filepath.Join(a.box, "disks", "guest-rootfs.qcow2")
	if fi, err := os.Lstat(overlay); err != nil || !fi.Mode().IsRegular() {
		errs = append(errs, fmt.Errorf("the overlay is not a regular file (%v, %v)", modeOf(fi), err))
	} else if h, err := qcow2.ReadHeader(overlay); err != nil || h.BackingFile != "../base/rootfs.ext4" {
		errs = append(errs, fmt.Errorf("the overlay does not back onto ../base/rootfs.ext4: %+v, %v", h, err))
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(a.box, "base", "rootfs.ext4"), &st); err != nil {
		errs = append(errs, fmt.Errorf("no base: %w", err))
	} else if st.Dev != a.baseDev || st.Ino != a.baseIno {
		who := "an unknown file"
		if st.Dev == s.otherDev && st.Ino == s.otherIno {
			who = "TENANT B'S BASE"
		}
		errs = append(errs, fmt.Errorf("base/rootfs.ext4 is %s (inode %d), not the base of its own image (inode %d)", who, st.Ino, a.baseIno))
	}
	mp := filepath.Join(a.box, "box.json")
	if fi, err := os.Lstat(mp); err != nil || !fi.Mode().IsRegular() {
		errs = append(errs, fmt.Errorf("box.json is not a regular file (%v, %v)", modeOf(fi), err))
	} else {
		var m struct {
			Digest    string            `json:"digest"`
			Image     string            `json:"image"`
			Ephemeral bool              `json:"ephemeral"`
			Params    map[string]string `json:"parameters"`
			BaseInode uint64            `json:"baseInode"`
		}
		b, _ := os.ReadFile(mp)
		if err := json.Unmarshal(b, &m); err != nil || m.Digest != a.digest || m.Image != s.paramsA["image"] || m.Ephemeral ||
			m.Params["image"] != s.paramsA["image"] || (m.BaseInode != 0 && m.BaseInode != a.baseIno) {
			errs = append(errs, fmt.Errorf("box.json does not describe the volume (digest %s, image %s, ephemeral %v, base inode %d): %v\n%s",
				a.digest, s.paramsA["image"], false, a.baseIno, err, b))
		}
	}
	return errs
}

// gone: a deleted volume leaves nothing.
func (s *tenantSuite) gone(a *tenantVol) []error {
	var errs []error
	if _, err := os.Lstat(a.box); !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("box %s still exists (%v)", a.box, err))
	}
	if debris, _ := filepath.Glob(filepath.Join(s.home, "boxes", "."+a.id+"*")); len(debris) > 0 {
		errs = append(errs, fmt.Errorf("set-aside box left: %v", debris))
	}
	if _, err := os.Lstat(s.recordPath(a.id)); !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("record %s still exists (%v)", s.recordPath(a.id), err))
	}
	ms, err := testenv.MountsUnder(s.home)
	if err != nil {
		return append(errs, err)
	}
	for _, m := range ms {
		if m.MountPoint != filepath.Join(s.other.box, "base") && m.MountPoint != filepath.Join(s.other.box, "box.json") {
			errs = append(errs, fmt.Errorf("mount left in the home: %s", m.MountPoint))
		}
	}
	return errs
}

// invariants is everything that must hold at any time; a is tenant A's
// volume, or nil before any exists.
func (s *tenantSuite) invariants(a *tenantVol) []error {
	errs := s.sent.check()
	errs = append(errs, s.outside.check()...)
	errs = append(errs, s.checkMounts(a)...)
	// Each change is reported once: the new state is the one to compare
	// with from then on.
	for p, sum := range s.otherFiles {
		if got := fileSum(p); got != sum {
			errs = append(errs, fmt.Errorf("tenant B's %s changed (sha256 %s, was %s)", p, got, sum))
			s.otherFiles[p] = got
		}
	}
	if v, err := statVersion(s.otherBase); err != nil || v != s.otherVer {
		errs = append(errs, fmt.Errorf("tenant B's cached base %s changed or went: %+v, was %+v (%v)", s.otherBase, v, s.otherVer, err))
		s.otherVer = v
	}
	if a != nil && !a.deleted && a.box != "" {
		// A persistent volume lives until DeleteVolume, whatever its
		// box.json claims.
		for _, p := range []string{a.box, s.recordPath(a.id)} {
			if _, err := os.Lstat(p); err != nil {
				errs = append(errs, fmt.Errorf("tenant A's volume lost %s before DeleteVolume: %w", p, err))
			}
		}
		for _, root := range []string{a.box, a.target} {
			if root == a.target && !a.published {
				continue
			}
			_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				var st unix.Stat_t
				if err == nil && unix.Lstat(p, &st) == nil && st.Dev == s.otherDev && st.Ino == s.otherIno {
					errs = append(errs, fmt.Errorf("tenant B's base is reachable from tenant A's box at %s", p))
				}
				return nil
			})
		}
	}
	return errs
}

// isOwnedMount says whether mp is where stage mounts a plugin-owned file
// in a view of a box.
func isOwnedMount(mp string) bool {
	return strings.HasSuffix(mp, "/base") || strings.HasSuffix(mp, "/box.json")
}

// checkOwnedMount checks a mount of a plugin-owned file of volume id: it
// is read-only and shows the plugin's own file, the base directory
// holding the volume's base (dev, ino), or its manifest.
func (s *tenantSuite) checkOwnedMount(m mount.MountInfo, id string, dev, ino uint64) error {
	if !readOnly(m) {
		return fmt.Errorf("mount %s is writable (options %v)", m.MountPoint, m.MountOptions)
	}
	var st unix.Stat_t
	if strings.HasSuffix(m.MountPoint, "/base") {
		if err := unix.Lstat(filepath.Join(m.MountPoint, "rootfs.ext4"), &st); err != nil || st.Dev != dev || st.Ino != ino {
			return fmt.Errorf("base mount %s does not hold the volume's own base (inode %d, want %d; root %s; %v)", m.MountPoint, st.Ino, ino, m.Root, err)
		}
		return nil
	}
	var mine unix.Stat_t
	owned := filepath.Join(s.home, "volumes", id+".box.json")
	if err := unix.Lstat(m.MountPoint, &st); err != nil || unix.Lstat(owned, &mine) != nil || st.Dev != mine.Dev || st.Ino != mine.Ino {
		return fmt.Errorf("box.json mount %s does not show the plugin's %s (root %s; %v)", m.MountPoint, owned, m.Root, err)
	}
	return nil
}

// checkMounts compares the mount table under the test's directory with
// what kubelet's requests explain.
func (s *tenantSuite) checkMounts(a *tenantVol) []error {
	ms, err := testenv.MountsUnder(s.dir)
	if err != nil {
		return []error{err}
	}
	var errs []error
	ino := func(p string) (uint64, uint64) {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return 0, 0
		}
		return st.Dev, st.Ino
	}
	boxDev, boxIno := uint64(0), uint64(0)
	if a != nil && !a.deleted {
		boxDev, boxIno = ino(a.box)
	}
	otherBoxDev, otherBoxIno := ino(s.other.box)
	want := volumeMounts(s.other, true, true)
	wantB := map[string]bool{}
	for _, p := range want {
		wantB[p] = true
	}
	seen := map[string]int{}
	inBox := 0
	for _, m := range ms {
		mp := m.MountPoint
		seen[mp]++
		d, i := ino(mp)
		switch {
		case wantB[mp]:
			if isOwnedMount(mp) {
				if err := s.checkOwnedMount(m, s.other.id, s.otherDev, s.otherIno); err != nil {
					errs = append(errs, fmt.Errorf("tenant B's %w", err))
				}
			} else if d != otherBoxDev || i != otherBoxIno {
				errs = append(errs, fmt.Errorf("tenant B's mount %s does not show B's box", mp))
			}
		case a != nil && ((mp == a.staging && a.staged) || (mp == a.target && a.published)):
			if d != boxDev || i != boxIno {
				errs = append(errs, fmt.Errorf("tenant A's mount %s does not show A's box (inode %d, box %d)", mp, i, boxIno))
			}
		case a != nil && (testenv.Within(mp, a.box) || testenv.Within(mp, a.staging) || testenv.Within(mp, a.target)):
			var err error
			if !isOwnedMount(mp) {
				err = fmt.Errorf("mount %s is neither base/ nor box.json (root %s)", mp, m.Root)
			} else {
				err = s.checkOwnedMount(m, a.id, a.baseDev, a.baseIno)
			}
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("in tenant A's paths: %w", err))
			case testenv.Within(mp, a.box) && !a.staged:
				errs = append(errs, fmt.Errorf("base mount %s left in tenant A's unstaged box", mp))
			case testenv.Within(mp, a.box):
				inBox++
			}
		default:
			errs = append(errs, fmt.Errorf("unexpected mount %s (root %s, source %s, options %v)", mp, m.Root, m.Source, m.MountOptions))
		}
	}
	var stacked, missing []string
	for p, n := range seen {
		if n > 1 {
			stacked = append(stacked, fmt.Sprintf("%s (%dx)", p, n))
		}
	}
	for _, p := range want {
		if seen[p] == 0 {
			missing = append(missing, p)
		}
	}
	if a != nil && a.staged && seen[a.staging] == 0 {
		missing = append(missing, a.staging)
	}
	if a != nil && a.published && seen[a.target] == 0 {
		missing = append(missing, a.target)
	}
	if a != nil && a.staged && inBox == 0 {
		missing = append(missing, "the read-only base in "+a.box)
	}
	sort.Strings(stacked)
	sort.Strings(missing)
	if len(stacked) > 0 {
		errs = append(errs, fmt.Errorf("mounts stacked: %v", stacked))
	}
	if len(missing) > 0 {
		errs = append(errs, fmt.Errorf("mounts missing: %v", missing))
	}
	return errs
}

// hostMounts is what the suite checks of the mount table outside its
// directory. Other work on the machine (other packages' tests, a cluster)
// mounts and unmounts there at the same time, so the whole table cannot
// be compared. What the plugin could do there by following a planted
// name is: mount something of the test's directory (a box, a base, a
// sentinel) somewhere else, or stack a mount on, or remove one from, "/"
// or a directory above the test's (where the symlinks to / lead).
type hostMounts struct {
	dir       string
	dev       string // major:minor of the file system holding dir
	rootInFS  string // dir's path inside that file system
	ancestors map[string]int
}

func newHostMounts(dir string) (*hostMounts, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	h := &hostMounts{dir: dir}
	var via *mount.MountInfo
	for i := range infos {
		if mi := &infos[i]; testenv.Within(dir, mi.MountPoint) && (via == nil || len(mi.MountPoint) >= len(via.MountPoint)) {
			via = mi
		}
	}
	if via == nil {
		return nil, fmt.Errorf("no mount holds %s", dir)
	}
	rel, _ := filepath.Rel(via.MountPoint, dir)
	h.dev, h.rootInFS = fmt.Sprintf("%d:%d", via.Major, via.Minor), filepath.Join(via.Root, rel)
	h.ancestors, _ = h.snapshot(infos)
	return h, nil
}

// snapshot returns the mounts on dir's ancestors, and every mount outside
// dir that shows part of dir.
func (h *hostMounts) snapshot(infos []mount.MountInfo) (map[string]int, []string) {
	anc := map[string]int{}
	var leaks []string
	for _, mi := range infos {
		if testenv.Within(mi.MountPoint, h.dir) {
			continue
		}
		if testenv.Within(h.dir, mi.MountPoint) {
			anc[fmt.Sprintf("%s (root %s, dev %d:%d, %s)", mi.MountPoint, mi.Root, mi.Major, mi.Minor, strings.Join(mi.MountOptions, ","))]++
		}
		if fmt.Sprintf("%d:%d", mi.Major, mi.Minor) == h.dev && testenv.Within(mi.Root, h.rootInFS) {
			leaks = append(leaks, fmt.Sprintf("%s shows %s", mi.MountPoint, mi.Root))
		}
	}
	return anc, leaks
}

func (h *hostMounts) check() []error {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return []error{err}
	}
	anc, leaks := h.snapshot(infos)
	var errs []error
	if d := diffCounts(h.ancestors, anc); len(d) > 0 {
		errs = append(errs, fmt.Errorf("mounts on / or above the test's directory changed: %v", d))
	}
	if len(leaks) > 0 {
		errs = append(errs, fmt.Errorf("mounts outside the test's directory show part of it: %v", leaks))
	}
	return errs
}

func diffCounts(before, after map[string]int) []string {
	var d []string
	for k, n := range after {
		if n > before[k] {
			d = append(d, fmt.Sprintf("new: %s", k))
		}
	}
	for k, n := range before {
		if n > after[k] {
			d = append(d, fmt.Sprintf("gone: %s", k))
		}
	}
	sort.Strings(d)
	return d
}

func fileSum(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return "error: " + err.Error()
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func modeOf(fi fs.FileInfo) any {
	if fi == nil {
		return "missing"
	}
	return fi.Mode()
}

// sentinels are files and directories outside every box that nothing may
// open, read, change or even hold open: a secret file, a FIFO (which
// whoever opens it for reading blocks on), and a directory that looks
// like a box's disks/ (an overlay with the right backing name, a FIFO).
// An inotify watch records any access; a hash of the tree any change.
type sentinels struct {
	root, secret, fifo, hostDir string
	fd                          int
	wds                         map[int]string
	want                        map[string]string
}

func newSentinels(t *testing.T, root string) *sentinels {
	t.Helper()
	s := &sentinels{root: root, secret: filepath.Join(root, "secret"), fifo: filepath.Join(root, "fifo"),
		hostDir: filepath.Join(root, "hostdir"), wds: map[int]string{}}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	s.fd = fd
	s.populate(t)
	return s
}

// populate (re)creates the sentinels, so that what one row did to them
// is reported once, by that row.
func (s *sentinels) populate(t *testing.T) {
	t.Helper()
	for wd := range s.wds {
		_, _ = unix.InotifyRmWatch(s.fd, uint32(wd))
	}
	clear(s.wds)
	if err := os.RemoveAll(s.root); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.hostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.secret, []byte("root:$6$sentinel$secret:19000:0:99999:7:::\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The note is named like a temp file the plugin removes from a box's
	// disks/ after a crash.
	if err := os.WriteFile(filepath.Join(s.hostDir, ".note.tmp-host"), []byte("a host directory\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := qcow2.CreateOverlay(context.Background(), filepath.Join(s.hostDir, "guest-rootfs.qcow2"),
		qcow2.OverlayOptions{BackingFile: "../base/rootfs.ext4", BackingFormat: qcow2.FormatRaw, Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{s.fifo, filepath.Join(s.hostDir, "fifo")} {
		if err := unix.Mkfifo(f, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{s.root, s.hostDir} {
		wd, err := unix.InotifyAddWatch(s.fd, d, unix.IN_ALL_EVENTS)
		if err != nil {
			t.Fatal(err)
		}
		s.wds[wd] = d
	}
	s.want = s.hash()
	s.events()
}

// events drains the inotify queue and describes what it held.
func (s *sentinels) events() []string {
	var out []string
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(s.fd, buf)
		if err != nil || n <= 0 {
			return out
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			out = append(out, fmt.Sprintf("%s: %s", filepath.Join(s.wds[int(ev.Wd)], name), inotifyMask(ev.Mask)))
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

func inotifyMask(m uint32) string {
	var out []string
	for _, b := range []struct {
		bit  uint32
		name string
	}{{unix.IN_ACCESS, "ACCESS"}, {unix.IN_MODIFY, "MODIFY"}, {unix.IN_ATTRIB, "ATTRIB"}, {unix.IN_CLOSE_WRITE, "CLOSE_WRITE"},
		{unix.IN_CLOSE_NOWRITE, "CLOSE_NOWRITE"}, {unix.IN_OPEN, "OPEN"}, {unix.IN_MOVED_FROM, "MOVED_FROM"}, {unix.IN_MOVED_TO, "MOVED_TO"},
		{unix.IN_CREATE, "CREATE"}, {unix.IN_DELETE, "DELETE"}, {unix.IN_DELETE_SELF, "DELETE_SELF"}, {unix.IN_MOVE_SELF, "MOVE_SELF"},
		{unix.IN_ISDIR, "ISDIR"}} {
		if m&b.bit != 0 {
			out = append(out, b.name)
		}
	}
	return strings.Join(out, "|")
}

// hash records every path under root: type, mode, owner, size, times
// (ctime included: nothing can set it back) and content or link target.
func (s *sentinels) hash() map[string]string {
	out := map[string]string{}
	_ = filepath.WalkDir(s.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			out[p] = "error: " + err.Error()
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			out[p] = "error: " + err.Error()
			return nil
		}
		v := fmt.Sprintf("mode %o uid %d gid %d size %d nlink %d mtime %d ctime %d", st.Mode, st.Uid, st.Gid, st.Size, st.Nlink, st.Mtim.Nano(), st.Ctim.Nano())
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			v += " sha256 " + fileSum(p)
		case unix.S_IFLNK:
			l, _ := os.Readlink(p)
			v += " -> " + l
		}
		out[p] = v
		return nil
	})
	return out
}

func (s *sentinels) check() []error {
	var errs []error
	if evs := s.events(); len(evs) > 0 {
		errs = append(errs, fmt.Errorf("something (the call, or an eviction pass meanwhile) opened or changed the sentinels outside the box: %v", evs))
	}
	// Opening a FIFO for writing without blocking fails with ENXIO
	// exactly when no one has it open for reading.
	for _, f := range []string{s.fifo, filepath.Join(s.hostDir, "fifo")} {
		fd, err := unix.Open(f, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
			errs = append(errs, fmt.Errorf("someone holds the sentinel FIFO %s open for reading", f))
		} else if !errors.Is(err, unix.ENXIO) {
			errs = append(errs, fmt.Errorf("probe sentinel FIFO %s: %w", f, err))
		}
	}
	got := s.hash()
	var diff []string
	for p, v := range s.want {
		if got[p] != v {
			diff = append(diff, fmt.Sprintf("%s: %s, was %s", p, got[p], v))
		}
	}
	for p, v := range got {
		if _, ok := s.want[p]; !ok {
			diff = append(diff, fmt.Sprintf("%s: new, %s", p, v))
		}
	}
	sort.Strings(diff)
	if len(diff) > 0 {
		errs = append(errs, fmt.Errorf("sentinels outside the box changed: %v", diff))
		s.want = got // report each change once
	}
	s.events() // our own probes and reads
	return errs
}
