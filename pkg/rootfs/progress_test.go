package rootfs

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxlite-csi/boxlite-csi/pkg/layout"
)

func TestSnapshotString(t *testing.T) {
	for _, tc := range []struct {
		s    Snapshot
		want string
	}{
		{Snapshot{}, "resolving the image, 0s so far"},
		{Snapshot{Layer: 3, Layers: 7, Done: 412 << 20, Total: 1024 << 20, Elapsed: 9 * time.Second},
			"412 of 1,024 MiB of layers read, layer 3 of 7, 9s so far"},
		{Snapshot{Layer: 1, Layers: 1, Done: 0, Total: 300 << 10, Elapsed: time.Minute}, "0 of 300 KiB of layers read, layer 1 of 1, 1m0s so far"},
		{Snapshot{Layer: 1, Layers: 1, Done: 10, Total: 174}, "10 of 174 bytes of layers read, layer 1 of 1, 0s so far"},
		{Snapshot{Layer: 2, Layers: 2, Done: 5 << 20}, "5 MiB of layers read, layer 2 of 2, 0s so far"},
	} {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.s, got, tc.want)
		}
	}
}

// TestEnsureAnswersBeforeDeadline: a caller waiting on a build gets its
// progress just before its deadline, while its context is still alive,
// and the build goes on for the next caller to join.
func TestEnsureAnswersBeforeDeadline(t *testing.T) {
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{}), AnswerMargin: 1500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var builds atomic.Int32
	build := plainBuild(func(ctx context.Context, out *os.File) error {
		builds.Add(1)
		p := ProgressFrom(ctx)
		p.SetLayers(7, 1024<<20)
		p.StartLayer(3)
		p.Add(412 << 20)
		<-release
		return out.Truncate(1 << 20)
	})
	k := testKey(1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = c.Ensure(ctx, k, build)
	var be *BuildingError
	if !errors.As(err, &be) || !errors.Is(err, ErrBuilding) {
		t.Fatalf("Ensure: %v, want a *BuildingError", err)
	}
	if ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Ensure answered only once the deadline passed: %v", err)
	}
	if !strings.Contains(err.Error(), "412 of 1,024 MiB of layers read, layer 3 of 7") {
		t.Errorf("the answer does not say how far the build got: %v", err)
	}

	// The build went on; the next caller joins it and gets the base.
	close(release)
	b, err := c.Ensure(context.Background(), k, build)
	if err != nil || b.Size != 1<<20 {
		t.Fatalf("second Ensure: %+v, %v", b, err)
	}
	if n := builds.Load(); n != 1 {
		t.Errorf("%d builds, want 1", n)
	}
}

// TestEnsureCancelledCallerGetsProgress: a caller whose context ends
// gets the progress too, wrapping the context's error.
func TestEnsureCancelledCallerGetsProgress(t *testing.T) {
	c, err := NewCache(context.Background(), CacheConfig{Home: layout.NewHome(t.TempDir(), layout.Config{})})
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	started := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-started; cancel() }()
	build := plainBuild(func(ctx context.Context, out *os.File) error {
		ProgressFrom(ctx).SetLayers(1, 100)
		close(started)
		<-release
		return nil
	})
	_, err = c.Ensure(ctx, testKey(2), build)
	if !errors.Is(err, ErrBuilding) || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "of 100 bytes") {
		t.Fatalf("Ensure with a cancelled context: %v, want ErrBuilding and Canceled with the progress", err)
	}
	// The build outlives the cancelled caller. Join it before the test
	// ends, or it is still writing its temp file when TempDir is removed.
	close(release)
	if _, err := c.Ensure(context.Background(), testKey(2), build); err != nil {
		t.Fatalf("joining the build: %v", err)
	}
}
