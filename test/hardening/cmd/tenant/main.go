// Command tenant is the attacker of test/hardening's tenant-isolation
// suite (TestTenantIsolation). It is a pod's root without the privileges
// a pod does not get: the test starts it in its own mount namespace with
// every capability but CAP_DAC_OVERRIDE dropped (or as root of a new user
// namespace), and it works only through the published target path it is
// given. It first proves that confinement (and exits 3 if it is not
// confined), then runs one attack on the box and reports each step.
//
// Usage: tenant [flags] <attack> <target>
//
// Exit status: 0 every step went as the attack expects, 1 a step did not
// (a set-up step failed, or something that must be refused was not), 2
// usage, 3 not confined.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

var (
	confine   = flag.String("confine", "", "caps: uid 0 in the host user namespace holding exactly -caps; userns: root of a user namespace of its own")
	wantCaps  = flag.String("caps", "0", "with -confine=caps: the exact effective capability mask (hex) the attacker must hold")
	hostMnt   = flag.String("host-mnt-ns", "", "readlink of the test's /proc/self/ns/mnt: the attacker must be in another one")
	hostUser  = flag.String("host-user-ns", "", "readlink of the test's /proc/self/ns/user")
	secret    = flag.String("secret", "", "a sentinel file outside the box")
	fifo      = flag.String("fifo", "", "a sentinel FIFO outside the box")
	hostDir   = flag.String("host-dir", "", "a sentinel directory outside the box")
	links     = flag.String("links", "", "more paths outside the box to plant symlinks to, comma-separated")
	digest    = flag.String("other-digest", "", "the other tenant's image digest")
	pinned    = flag.String("other-pinned", "", "the other tenant's pinned image reference")
	otherIno  = flag.Uint64("other-inode", 0, "the inode of the other tenant's base")
	mountPath = flag.String("mount", "mount", "util-linux mount(8)")
)

type attacker struct {
	target string
	failed bool
}

func main() {
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: tenant [flags] <attack> <target>")
		os.Exit(2)
	}
	if err := checkConfinement(); err != nil {
		fmt.Printf("NOT CONFINED: %v\n", err)
		os.Exit(3)
	}
	a := &attacker{target: flag.Arg(1)}
	attacks := map[string]func(){
		"rename-base":   a.renameBase,
		"fifo-manifest": a.fifoManifest,
		"fifo-overlay":  a.fifoOverlay,
		"disks-symlink": a.disksSymlink,
		"edit-manifest": a.editManifest,
		"plant":         a.plant,
		"dirs-symlink":  a.dirsSymlink,
		"mount":         a.mount,
	}
	f, ok := attacks[flag.Arg(0)]
	if !ok {
		fmt.Fprintf(os.Stderr, "tenant: no attack %q\n", flag.Arg(0))
		os.Exit(2)
	}
	f()
	if a.failed {
		os.Exit(1)
	}
}

// checkConfinement proves from the inside what the test asked for: no
// CAP_SYS_ADMIN anywhere in the capability sets (or only over a user
// namespace of its own), no way to gain privileges, another mount
// namespace than the host's.
func checkConfinement() error {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err
	}
	st := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			st[k] = strings.TrimSpace(v)
		}
	}
	sets := map[string]uint64{}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		v, err := strconv.ParseUint(st[k], 16, 64)
		if err != nil {
			return fmt.Errorf("/proc/self/status %s: %q: %v", k, st[k], err)
		}
		sets[k] = v
	}
	mnt, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return err
	}
	user, err := os.Readlink("/proc/self/ns/user")
	if err != nil {
		return err
	}
	uidMap, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return err
	}
	if *hostMnt == "" || mnt == *hostMnt {
		return fmt.Errorf("in the host's mount namespace %s (host %q)", mnt, *hostMnt)
	}
	if st["NoNewPrivs"] != "1" {
		return fmt.Errorf("NoNewPrivs is %q: a set-user-ID program could give privileges back", st["NoNewPrivs"])
	}
	sysAdmin := uint64(1) << unix.CAP_SYS_ADMIN
	switch *confine {
	case "caps":
		want, err := strconv.ParseUint(*wantCaps, 0, 64)
		if err != nil {
			return fmt.Errorf("-caps %q: %v", *wantCaps, err)
		}
		if user != *hostUser {
			return fmt.Errorf("user namespace %s, want the host's %s for -confine=caps", user, *hostUser)
		}
		for k, v := range sets {
			if v&sysAdmin != 0 {
				return fmt.Errorf("CAP_SYS_ADMIN is in %s (%016x)", k, v)
			}
		}
		if sets["CapEff"] != want || sets["CapPrm"]&^want != 0 || sets["CapBnd"]&^want != 0 || sets["CapAmb"]&^want != 0 {
			return fmt.Errorf("capabilities CapEff %016x CapPrm %016x CapBnd %016x CapAmb %016x, want exactly %016x", sets["CapEff"], sets["CapPrm"], sets["CapBnd"], sets["CapAmb"], want)
		}
	case "userns":
		// Root of its own user namespace: its capabilities, CAP_SYS_ADMIN
		// included, reach only what that namespace owns (its mount
		// namespace), nothing of the host's.
		if *hostUser == "" || user == *hostUser {
			return fmt.Errorf("in the host's user namespace %s", user)
		}
		if f := strings.Fields(string(uidMap)); len(f) != 3 || f[2] == "4294967295" {
			return fmt.Errorf("uid_map %q maps every uid: this is the initial user namespace", uidMap)
		}
	default:
		return fmt.Errorf("-confine %q: want caps or userns", *confine)
	}
	fmt.Printf("confined (%s): uid %d, CapEff %016x CapPrm %016x CapBnd %016x CapAmb %016x, NoNewPrivs 1, %s (host %s), %s (host %s), uid_map %s\n",
		*confine, os.Getuid(), sets["CapEff"], sets["CapPrm"], sets["CapBnd"], sets["CapAmb"], mnt, *hostMnt, user, *hostUser, strings.Join(strings.Fields(string(uidMap)), " "))
	return nil
}

func (a *attacker) path(rel string) string { return filepath.Join(a.target, rel) }

// do is a step the attack needs: it must succeed.
func (a *attacker) do(what string, err error) bool {
	if err != nil {
		fmt.Printf("FAIL %s: %v (the attack could not be set up)\n", what, err)
		a.failed = true
		return false
	}
	fmt.Printf("ok   %s\n", what)
	return true
}

// refused is a step the tenant must not be able to take: it must fail,
// with one of want if any are given.
func (a *attacker) refused(what string, err error, want ...unix.Errno) bool {
	if err == nil {
		fmt.Printf("FAIL %s: succeeded, must be refused\n", what)
		a.failed = true
		return false
	}
	if len(want) > 0 {
		var got unix.Errno
		ok := errors.As(err, &got)
		if ok {
			ok = false
			for _, w := range want {
				ok = ok || got == w
			}
		}
		if !ok {
			fmt.Printf("FAIL %s: refused with %v, want %v\n", what, err, want)
			a.failed = true
			return false
		}
	}
	fmt.Printf("ok   %s: refused: %v\n", what, err)
	return true
}

// renameBase: mv base base.old; mkdir base; ln -s <host file> base/rootfs.ext4.
// base/ is a read-only mount point of a directory the plugin owns, so
// the pod can neither move it nor put anything in it.
func (a *attacker) renameBase() {
	base := a.path("base")
	a.refused("mv base base.old", os.Rename(base, base+".old"), unix.EBUSY)
	a.refused("rm -r base", os.RemoveAll(base), unix.EBUSY, unix.EROFS)
	a.refused("ln -s "+*secret+" base/evil", os.Symlink(*secret, filepath.Join(base, "evil")), unix.EROFS)
	a.refused("mv base/rootfs.ext4 base/x", os.Rename(filepath.Join(base, "rootfs.ext4"), filepath.Join(base, "x")), unix.EROFS)
}

// fifoManifest: rm box.json; mkfifo box.json. box.json is a read-only
// mount point of the plugin's own copy.
func (a *attacker) fifoManifest() {
	p := a.path("box.json")
	a.refused("rm box.json", os.Remove(p), unix.EBUSY)
	a.refused("mv disks/guest-rootfs.qcow2 box.json", os.Rename(a.path("disks/guest-rootfs.qcow2"), p), unix.EBUSY)
	a.refused("write box.json", os.WriteFile(p, []byte("{}"), 0o644), unix.EROFS)
}

func (a *attacker) fifoOverlay() {
	p := a.path("disks/guest-rootfs.qcow2")
	a.do("rm disks/guest-rootfs.qcow2", os.Remove(p))
	a.do("mkfifo disks/guest-rootfs.qcow2", unix.Mkfifo(p, 0o644))
}

func (a *attacker) disksSymlink() {
	p := a.path("disks")
	a.do("mv disks disks.old", os.Rename(p, p+".old"))
	a.do("ln -s "+*hostDir+" disks", os.Symlink(*hostDir, p))
}

// editManifest rewrites box.json to claim the other tenant's image, a
// host directory as its OCI layout, the other's base inode, and an
// ephemeral lifetime; then deletes the overlay so the next stage has to
// decide which base to build it over.
func (a *attacker) editManifest() {
	p := a.path("box.json")
	b, err := os.ReadFile(p)
	if !a.do("read box.json", err) {
		return
	}
	var m map[string]any
	if !a.do("parse box.json", json.Unmarshal(b, &m)) {
		return
	}
	m["digest"] = *digest
	m["pinned"] = *pinned
	m["image"] = "oci:/etc"
	m["parameters"] = map[string]string{"image": "oci:/etc"}
	m["ephemeral"] = true
	if *otherIno != 0 {
		m["baseInode"] = *otherIno
	}
	b, err = json.MarshalIndent(m, "", "  ")
	if !a.do("encode box.json", err) {
		return
	}
	a.refused("write box.json (other tenant's digest "+*digest+", oci:/etc, ephemeral)", os.WriteFile(p, b, 0o644), unix.EROFS)
	a.do("write forged.json with the same", os.WriteFile(a.path("forged.json"), b, 0o644))
	a.refused("mv forged.json box.json", os.Rename(a.path("forged.json"), p), unix.EBUSY)
	a.do("rm disks/guest-rootfs.qcow2", os.Remove(a.path("disks/guest-rootfs.qcow2")))
}

// plant fills every directory of the box with what a plugin that follows
// names could be tricked by: symlinks out of the box (to /, a host file,
// a host FIFO, a host directory, climbing with ..), FIFOs, a unix socket,
// hard links to the box's own files, and names shaped like the plugin's
// temp files. Device nodes need CAP_MKNOD, which a tenant does not hold:
// the attempt must be refused, and none are planted.
func (a *attacker) plant() {
	var dirs []string
	err := filepath.WalkDir(a.target, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if !a.do(fmt.Sprintf("list the box's directories (%d)", len(dirs)), err) {
		return
	}
	targets := map[string]string{"evil-root": "/", "evil-secret": *secret, "evil-fifo": *fifo, "evil-hostdir": *hostDir,
		"evil-up": strings.Repeat("../", 32) + strings.TrimPrefix(*secret, "/")}
	for i, l := range strings.Split(*links, ",") {
		if l != "" {
			targets[fmt.Sprintf("evil-link-%d", i)] = l
		}
	}
	overlay := a.path("disks/guest-rootfs.qcow2")
	for _, d := range dirs {
		rel, _ := filepath.Rel(a.target, d)
		if rel == "base" {
			// The plugin's read-only base directory.
			a.refused("plant a symlink in base/", os.Symlink(*secret, filepath.Join(d, "evil-secret")), unix.EROFS)
			a.refused("plant a FIFO in base/", unix.Mkfifo(filepath.Join(d, "evil.fifo"), 0o666), unix.EROFS)
			continue
		}
		var errs []error
		for name, to := range targets {
			errs = append(errs, os.Symlink(to, filepath.Join(d, name)))
		}
		errs = append(errs, unix.Mkfifo(filepath.Join(d, "evil.fifo"), 0o666))
		errs = append(errs, plantSocket(d, "evil.sock"))
		errs = append(errs, os.Link(overlay, filepath.Join(d, "evil-hard-overlay")))
		a.do(fmt.Sprintf("plant %d symlinks, a FIFO, a socket and a hard link in %s/", len(targets), rel), errors.Join(errs...))
	}
	// Names like the plugin's own temp files and set-aside boxes.
	for _, p := range []string{".box.json.tmp-evil", "disks/.guest-rootfs.qcow2.tmp-evil", "tmp/evil.ext4.tmp"} {
		a.do("ln -s "+*secret+" "+p, os.Symlink(*secret, a.path(p)))
	}
	a.refused("ln -s "+*secret+" base/.rootfs.ext4.tmp-evil", os.Symlink(*secret, a.path("base/.rootfs.ext4.tmp-evil")), unix.EROFS)
	a.refused("ln base/rootfs.ext4 evil-hard-base (a writable name for the shared base)", os.Link(a.path("base/rootfs.ext4"), a.path("evil-hard-base")), unix.EXDEV)
	a.refused("ln box.json evil-hard-box.json (a writable name for the plugin's manifest)", os.Link(a.path("box.json"), a.path("evil-hard-box.json")), unix.EXDEV)
	err = unix.Mknod(a.path("evil-null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
	if a.refused("mknod evil-null c 1 3", err, unix.EPERM) {
		fmt.Println("note device nodes are not planted: a tenant holds no CAP_MKNOD (by design)")
	}
}

// plantSocket binds a unix socket in dir by a relative name (a full path
// could pass the 108 bytes of sun_path) and leaves the socket file.
func plantSocket(dir, name string) error {
	wd, err := os.Getwd()
	if err != nil {
		return err
	}
	if err := os.Chdir(dir); err != nil {
		return err
	}
	defer os.Chdir(wd)
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Bind(fd, &unix.SockaddrUnix{Name: name})
}

// dirsSymlink replaces every directory of the box the plugin creates but
// does not judge (sockets/, tmp/, logs/, shared/ or mounts/, ...) with a
// symlink to a host directory.
func (a *attacker) dirsSymlink() {
	ents, err := os.ReadDir(a.target)
	if !a.do("list the box", err) {
		return
	}
	n := 0
	for _, e := range ents {
		if !e.IsDir() || e.Name() == "base" || e.Name() == "disks" {
			continue
		}
		p := a.path(e.Name())
		a.do("mv "+e.Name()+" "+e.Name()+".old", os.Rename(p, p+".old"))
		a.do("ln -s "+*hostDir+" "+e.Name(), os.Symlink(*hostDir, p))
		n++
	}
	if n == 0 {
		a.do("find a directory to replace", errors.New("the box has none besides base/ and disks/"))
	}
}

// mount tries to make the shared base writable, or to mount anything at
// all: remounts, binds (with the old and the new mount API), unmounting
// the read-only base to reach the writable inode under it, a hard link,
// a file handle, and plain writes, which must fail with EROFS.
func (a *attacker) mount() {
	base := a.path("base/rootfs.ext4")
	userns := *confine == "userns"
	// Without CAP_SYS_ADMIN every mount operation is EPERM. Root of a user
	// namespace may mount in its own mount namespace, but the mounts it
	// inherited are locked: their read-only flag cannot be cleared, they
	// cannot be unmounted to uncover what is under them, and a tree
	// holding them cannot be bound without them.
	var perm []unix.Errno
	if !userns {
		perm = []unix.Errno{unix.EPERM}
	}
	// The plugin's two read-only mounts in the box.
	for _, rel := range []string{"base", "box.json"} {
		p := a.path(rel)
		a.refused("mount -o remount,rw "+rel, a.run(*mountPath, "-o", "remount,rw", p))
		a.refused("mount(MS_REMOUNT|MS_BIND) "+rel+" without MS_RDONLY", unix.Mount("", p, "", unix.MS_REMOUNT|unix.MS_BIND, ""), unix.EPERM)
		a.refused("mount(MS_REMOUNT) the superblock under "+rel+" read-write", unix.Mount("", p, "", unix.MS_REMOUNT, ""), unix.EPERM)
		a.refused("umount "+rel+" (uncovering the box's own copy)", unix.Unmount(p, 0), append(perm, unix.EINVAL)...)
		a.refused("umount -l "+rel, unix.Unmount(p, unix.MNT_DETACH), append(perm, unix.EINVAL)...)
		if fd, err := unix.Open(p, unix.O_PATH|unix.O_CLOEXEC, 0); a.do("open "+rel+" O_PATH", err) {
			attr := unix.MountAttr{Attr_clr: unix.MOUNT_ATTR_RDONLY}
			a.refused("mount_setattr("+rel+", clear MOUNT_ATTR_RDONLY)", unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr), unix.EPERM)
			unix.Close(fd)
		}
	}
	// The box mount without its nested read-only mounts would show the
	// box's own base link, the shared base's inode, writable.
	err := unix.Mount(a.target, a.path("tmp"), "", unix.MS_BIND, "")
	if a.refused("mount --bind (not recursive) . tmp", err, append(perm, unix.EINVAL)...) == false && err == nil {
		a.writeRefused(filepath.Join(a.path("tmp"), "base", "rootfs.ext4"), "base through the bind")
		unix.Unmount(a.path("tmp"), unix.MNT_DETACH)
	}
	tree, err := unix.OpenTree(unix.AT_FDCWD, a.target, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if a.refused("open_tree(OPEN_TREE_CLONE, not recursive) .", err, append(perm, unix.EINVAL)...) == false && err == nil {
		unix.Close(tree)
	}
	// base/ is a mount of its own: a copy of it (in a user namespace) is a
	// copy of a locked read-only mount, read-only still.
	err = unix.Mount(a.path("base"), a.path("tmp"), "", unix.MS_BIND, "")
	switch {
	case !userns:
		a.refused("mount --bind base tmp", err, unix.EPERM)
	case err != nil:
		fmt.Printf("ok   mount --bind base tmp: refused: %v\n", err)
	default:
		fmt.Println("ok   mount --bind base tmp: allowed in the tenant's namespace, a copy of the locked read-only mount")
		a.writeRefused(filepath.Join(a.path("tmp"), "rootfs.ext4"), "base through a copy of base/")
		a.refused("mount(MS_REMOUNT|MS_BIND) the copy of base/ without MS_RDONLY", unix.Mount("", a.path("tmp"), "", unix.MS_REMOUNT|unix.MS_BIND, ""), unix.EPERM)
		unix.Unmount(a.path("tmp"), unix.MNT_DETACH)
	}
	// Binding anything: refused outright without CAP_SYS_ADMIN; in a user
	// namespace it is allowed in the tenant's own mount namespace only
	// (the test checks the host's mount table is unchanged).
	bindErr := a.run(*mountPath, "--bind", a.path("tmp"), a.path("logs"))
	if userns {
		fmt.Printf("ok   mount --bind tmp logs inside the tenant's own mount namespace: %v (allowed there; the host must not see it)\n", bindErr)
		if bindErr == nil {
			a.writeRefused(a.path("base/rootfs.ext4"), "base after a bind in the tenant's namespace")
			unix.Unmount(a.path("logs"), unix.MNT_DETACH)
		}
	} else {
		a.refused("mount --bind tmp logs", bindErr)
		a.refused("mount(MS_BIND) tmp logs", unix.Mount(a.path("tmp"), a.path("logs"), "", unix.MS_BIND, ""), unix.EPERM)
		_, err := unix.Fsopen("tmpfs", unix.FSOPEN_CLOEXEC)
		a.refused("fsopen(tmpfs)", err, unix.EPERM)
	}
	a.refused("ln base/rootfs.ext4 hard-base (a writable name for the shared base)", os.Link(base, a.path("hard-base")), unix.EXDEV)
	// open_by_handle_at reopens an inode through any mount of its file
	// system, here the writable box mount: it needs CAP_DAC_READ_SEARCH
	// over the host, which a tenant does not hold.
	if h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, base, 0); err != nil {
		fmt.Printf("ok   name_to_handle_at base/rootfs.ext4: %v (no handle, nothing to reopen)\n", err)
	} else if mfd, err := unix.Open(a.target, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); a.do("open the box mount", err) {
		fd, err := unix.OpenByHandleAt(mfd, h, unix.O_RDWR|unix.O_CLOEXEC)
		if !a.refused("open_by_handle_at(box mount, base handle, O_RDWR)", err, unix.EPERM) && err == nil {
			unix.Close(fd)
		}
		unix.Close(mfd)
	}
	a.writeRefused(base, "base/rootfs.ext4")
	a.writeRefused(a.path("box.json"), "box.json")
	var sfs unix.Statfs_t
	if a.do("statfs base/rootfs.ext4", unix.Statfs(base, &sfs)) && sfs.Flags&unix.ST_RDONLY == 0 {
		a.do("base/rootfs.ext4 still read-only", fmt.Errorf("statfs flags %#x lack ST_RDONLY", sfs.Flags))
	}
}

// writeRefused: every way of changing the file must fail with EROFS (the
// read-only mount, not the file's mode: the tenant holds
// CAP_DAC_OVERRIDE, as a pod's root does).
func (a *attacker) writeRefused(p, name string) {
	for _, flags := range []struct {
		s string
		f int
	}{{"O_WRONLY", unix.O_WRONLY}, {"O_RDWR", unix.O_RDWR}, {"O_WRONLY|O_APPEND", unix.O_WRONLY | unix.O_APPEND}} {
		fd, err := unix.Open(p, flags.f|unix.O_CLOEXEC, 0)
		if a.refused("open "+name+" "+flags.s, err, unix.EROFS) == false && err == nil {
			unix.Close(fd)
		}
	}
	a.refused("truncate "+name, unix.Truncate(p, 0), unix.EROFS)
	a.refused("chmod 0644 "+name, unix.Chmod(p, 0o644), unix.EROFS)
	a.refused("chown 0:0 "+name, unix.Chown(p, 0, 0), unix.EROFS)
	a.refused("setxattr user.evil "+name, unix.Setxattr(p, "user.evil", []byte("1"), 0), unix.EROFS)
	a.refused("utimes "+name, unix.UtimesNano(p, []unix.Timespec{{Sec: 1}, {Sec: 1}}), unix.EROFS)
}

func (a *attacker) run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
