package driver

import (
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

// volumeLocks serialises operations per volume without a global mutex:
// different volumes proceed in parallel, and a second operation on a busy
// volume is refused at once (the caller answers Aborted and the CO retries)
// instead of queueing behind a build that may take minutes.
type volumeLocks struct {
	mu   sync.Mutex
	busy map[string]string // volume ID -> operation holding it
}

func newVolumeLocks() *volumeLocks {
	return &volumeLocks{busy: map[string]string{}}
}

// tryAcquire takes the lock for id on behalf of op. When the volume is
// busy it returns false and the operation in flight.
func (l *volumeLocks) tryAcquire(id, op string) (ok bool, holder string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h, busy := l.busy[id]; busy {
		return false, h
	}
	l.busy[id] = op
	return true, ""
}

func (l *volumeLocks) release(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.busy, id)
}

// lock takes the per-volume lock or answers Aborted, as the CSI spec asks
// for an operation already in flight on the same volume.
func (d *Driver) lock(id, op string) (func(), error) {
	if ok, holder := d.locks.tryAcquire(id, op); !ok {
		return nil, status.Errorf(codes.Aborted, "%s on volume %s: %s is in progress", op, id, holder)
	}
	return func() { d.locks.release(id) }, nil
}

// lockedBox is nodeBox plus the volume's lock, taken last so that bad
// input is refused without touching it. The caller must call unlock.
func (d *Driver) lockedBox(op, id string) (box layout.Box, unlock func(), err error) {
	if box, err = d.nodeBox(op, id); err != nil {
		return box, nil, err
	}
	unlock, err = d.lock(box.ID(), op)
	return box, unlock, err
}
