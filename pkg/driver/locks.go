package driver

import "sync"

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
