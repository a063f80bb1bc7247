package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// fileLock is an exclusive flock on a file under locks/. flock is tied to
// the open file description, so it also excludes other goroutines of this
// process that open the file separately, and it vanishes with the process:
// a killed builder never leaves a lock behind.
type fileLock struct {
	f *os.File
}

// lockPollInterval bounds how long a waiter sleeps between attempts; flock
// itself cannot be interrupted by a context.
const lockPollInterval = 25 * time.Millisecond

// acquireLock blocks until the lock at path is held or ctx ends.
func acquireLock(ctx context.Context, path string) (*fileLock, error) {
	for {
		l, ok, err := tryLock(path)
		if err != nil || ok {
			return l, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for lock %s: %w", path, ctx.Err())
		case <-time.After(lockPollInterval):
		}
	}
}

// tryLock takes the lock without waiting; ok is false if someone holds it.
func tryLock(path string) (l *fileLock, ok bool, err error) {
	for {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, false, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, false, nil
			}
			return nil, false, fmt.Errorf("flock %s: %w", path, err)
		}
		// If the file was unlinked (and maybe recreated) between our open
		// and our flock, we hold a lock nobody else will ever see: retry
		// on whatever is at the path now.
		var held, cur unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &held); err != nil {
			f.Close()
			return nil, false, fmt.Errorf("stat lock %s: %w", path, err)
		}
		if err := unix.Stat(path, &cur); err == nil && cur.Dev == held.Dev && cur.Ino == held.Ino {
			return &fileLock{f: f}, true, nil
		}
		f.Close()
	}
}

// release drops the lock. Closing the descriptor releases the flock.
func (l *fileLock) release() {
	if l != nil {
		l.f.Close()
	}
}
