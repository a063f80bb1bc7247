package rootfs

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// ErrBuilding marks a wait for a base that ended before the build did:
// the build goes on in the background, and the next call joins it. It
// comes wrapped in a *BuildingError, which says how far the build got.
var ErrBuilding = errors.New("base still building")

// BuildProgress is how far a base build in flight has got. The cache
// makes one per build and shares it with every caller waiting on that
// build; the builder finds it in its context (ProgressFrom) and updates
// it as layers arrive. All of it is safe for concurrent use.
type BuildProgress struct {
	started time.Time
	// layer is the layer being read (1-based), of layers.
	layer, layers atomic.Int32
	// done and total are the compressed layer bytes read so far and in
	// all (total from the manifest; 0 until the builder knows it).
	done, total atomic.Int64
}

func newBuildProgress() *BuildProgress { return &BuildProgress{started: time.Now()} }

// SetLayers records how many layers the image has and their compressed
// size in all.
func (p *BuildProgress) SetLayers(n int, totalBytes int64) {
	if p == nil {
		return
	}
	p.layers.Store(int32(n))
	p.total.Store(totalBytes)
}

// StartLayer records that layer i (1-based) is being read.
func (p *BuildProgress) StartLayer(i int) {
	if p != nil {
		p.layer.Store(int32(i))
	}
}

// Add counts n more compressed bytes read.
func (p *BuildProgress) Add(n int64) {
	if p != nil {
		p.done.Add(n)
	}
}

// Snapshot is BuildProgress at one moment.
type Snapshot struct {
	Layer, Layers int
	Done, Total   int64
	Elapsed       time.Duration
}

// Snapshot reads the progress now.
func (p *BuildProgress) Snapshot() Snapshot {
	if p == nil {
		return Snapshot{}
	}
	return Snapshot{
		Layer: int(p.layer.Load()), Layers: int(p.layers.Load()),
		Done: p.done.Load(), Total: p.total.Load(),
		Elapsed: time.Since(p.started).Truncate(time.Second),
	}
}

// String is what a person waiting for the pod reads, e.g. "412 of 1,024
// MiB of layers read, layer 3 of 7, 9s so far". Sizes are in MiB, or in
// KiB for an image under a MiB.
func (s Snapshot) String() string {
	shift, unit := 20, "MiB"
	switch n := max(s.Total, s.Done); {
	case n < 1<<10:
		shift, unit = 0, "bytes"
	case n < 1<<20:
		shift, unit = 10, "KiB"
	}
	var out string
	switch {
	case s.Layers == 0:
		out = "resolving the image"
	case s.Total > 0:
		out = fmt.Sprintf("%s of %s %s of layers read, layer %d of %d", scaled(s.Done, shift), scaled(s.Total, shift), unit, s.Layer, s.Layers)
	default:
		out = fmt.Sprintf("%s %s of layers read, layer %d of %d", scaled(s.Done, shift), unit, s.Layer, s.Layers)
	}
	return fmt.Sprintf("%s, %s so far", out, s.Elapsed)
}

// scaled formats n >> shift, rounded, with thousands separators.
func scaled(n int64, shift int) string {
	m := n
	if shift > 0 {
		m = (n + 1<<(shift-1)) >> shift
	}
	s := fmt.Sprint(m)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// BuildingError is a wait that ended while the base for Key was still
// building: just before the caller's deadline, so that it can answer
// with Progress rather than run out of time, or because its context
// ended. It wraps ErrBuilding, and the context's error if there is one.
type BuildingError struct {
	Key      Key
	Progress Snapshot
	Err      error
}

func (e *BuildingError) Error() string {
	return fmt.Sprintf("rootfs: base %s is still building (%s); the build continues in the background, and the next call joins it", e.Key, e.Progress)
}

func (e *BuildingError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrBuilding}
	}
	return []error{ErrBuilding, e.Err}
}

type progressKey struct{}

// withProgress hands p to the build run with the returned context.
func withProgress(ctx context.Context, p *BuildProgress) context.Context {
	return context.WithValue(ctx, progressKey{}, p)
}

// ProgressFrom is the progress a build run by the cache should update;
// nil (on which every method is a no-op) outside such a build.
func ProgressFrom(ctx context.Context) *BuildProgress {
	p, _ := ctx.Value(progressKey{}).(*BuildProgress)
	return p
}

// answerBy is when a caller waiting with ctx should stop waiting and
// answer: before its deadline by margin, or by half of what is left
// when that is less, so a short deadline still gets an answer of its own.
func answerBy(ctx context.Context, margin time.Duration) (time.Time, bool) {
	dl, ok := ctx.Deadline()
	if !ok {
		return time.Time{}, false
	}
	return dl.Add(-min(margin, time.Until(dl)/2)), true
}
