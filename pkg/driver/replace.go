package driver

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// durability is how long replaceFile makes a new version last.
type durability int

const (
	// atomicOnly: after a crash the file is the old or the new version,
	// or, for a name that did not exist, possibly empty.
	atomicOnly durability = iota
	// ordered: the data is written out (sync_file_range) before the
	// rename, so no journal commit can publish the name over unwritten
	// data; the next commit of the filesystem, which the caller's own
	// fsync soon makes, carries the rename.
	ordered
	// durable: fsynced, then the directory too: once replaceFile returns,
	// the new version survives a power cut.
	durable
)

// replaceFile replaces dir/name with b, with mode perm, through a temp
// file .<name>.tmp* in dir (start-up removes leftovers) and a rename.
func replaceFile(dir, name string, b []byte, perm os.FileMode, how durability) error {
	f, err := os.CreateTemp(dir, "."+name+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s in %s: %w", name, dir, err)
	}
	defer os.Remove(f.Name())
	_, err = f.Write(b)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		switch how {
		case ordered:
			err = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		case durable:
			err = f.Sync()
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	final := filepath.Join(dir, name)
	if err := os.Rename(f.Name(), final); err != nil {
		return fmt.Errorf("install %s: %w", final, err)
	}
	if how == durable {
		return syncDir(dir)
	}
	return nil
}
