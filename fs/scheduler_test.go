package fs

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
)

func TestBackgroundRangeSize(t *testing.T) {
	for _, c := range []struct {
		quiet time.Duration
		limit int64
		want  int64
	}{
		{0, 1 << 20, 256 << 10},
		{249 * time.Millisecond, 1 << 20, 256 << 10},
		{250 * time.Millisecond, 1 << 20, 512 << 10},
		{499 * time.Millisecond, 1 << 20, 512 << 10},
		{500 * time.Millisecond, 1 << 20, 1 << 20},
		{time.Hour, 1 << 20, 1 << 20},
		{time.Hour, 3 << 20, 3 << 20}, // capped at the limit, not at a power of two
		{750 * time.Millisecond, 4 << 20, 2 << 20},
		{0, 100 << 10, 100 << 10},          // a limit below the minimum wins
		{-time.Second, 1 << 20, 256 << 10}, // a clock stepping back counts as no quiet
	} {
		if got := backgroundRangeSize(c.quiet, c.limit); got != c.want {
			t.Errorf("backgroundRangeSize(%v, %d) = %d, want %d", c.quiet, c.limit, got, c.want)
		}
	}
}

func TestQuietLeft(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if got := quietLeft(t0.Add(30*time.Millisecond), t0, 100*time.Millisecond); got != 70*time.Millisecond {
		t.Errorf("30ms after a read: %v left, want 70ms", got)
	}
	if got := quietLeft(t0.Add(100*time.Millisecond), t0, 100*time.Millisecond); got > 0 {
		t.Errorf("a full quiet period after a read: %v left, want none", got)
	}
	if got := quietLeft(t0, time.Time{}, DefaultQuietPeriod); got > 0 {
		t.Errorf("no read ever: %v left, want none", got)
	}
}

func TestSchedulerBackgroundRunsWhenIdle(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk))
	release, err := s.background(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	release()
	select {
	case d := <-clk.added:
		t.Fatalf("a scheduler that never saw a read waited %v", d)
	default:
	}
}

func TestSchedulerBackgroundWaitsQuietPeriodAfterRead(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithQuietPeriod(100*time.Millisecond), WithBusyBackground(0))
	s.foreground()()
	ch := startBackground(context.Background(), s)
	if d := clk.waitTimer(t); d != 100*time.Millisecond {
		t.Fatalf("background waits %v after a read, want the quiet period", d)
	}
	clk.Advance(60 * time.Millisecond)
	notYet(t, ch, "60ms after a read")
	clk.Advance(40 * time.Millisecond)
	r := mustGet(t, ch)
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.release()
}

func TestSchedulerBackgroundWaitsForForegroundToEnd(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithQuietPeriod(100*time.Millisecond), WithBusyBackground(0))
	clk.Advance(time.Hour) // long after any read
	done := s.foreground()
	ch := startBackground(context.Background(), s)
	clk.Advance(time.Hour)
	notYet(t, ch, "while a foreground fetch is in flight")
	done()
	// The end of the foreground fetch starts a quiet period.
	if d := clk.waitTimer(t); d != 100*time.Millisecond {
		t.Fatalf("after the foreground fetch ended, background waits %v, want the quiet period", d)
	}
	notYet(t, ch, "right after a foreground fetch ended")
	clk.Advance(100 * time.Millisecond)
	if r := mustGet(t, ch); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestSchedulerBackgroundYieldsToForegroundWaitingForSlot(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithQuietPeriod(100*time.Millisecond), WithBusyBackground(0))
	first, err := s.background(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ch := startBackground(context.Background(), s) // waits for the slot
	notYet(t, ch, "while the only slot is taken")
	done := s.foreground()
	first() // the slot is free, but a reader is fetching
	notYet(t, ch, "while a foreground fetch is in flight")
	done()
	if d := clk.waitTimer(t); d != 100*time.Millisecond {
		t.Fatalf("background waits %v, want the quiet period", d)
	}
	clk.Advance(100 * time.Millisecond)
	if r := mustGet(t, ch); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestSchedulerBoundsBackgroundRequests(t *testing.T) {
	s := NewScheduler(2, WithClock(newFakeClock()))
	ctx := context.Background()
	a, err := s.background(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.background(ctx); err != nil {
		t.Fatal(err)
	}
	ch := startBackground(ctx, s)
	notYet(t, ch, "beyond the limit of 2")
	a()
	if r := mustGet(t, ch); r.err != nil {
		t.Fatal(r.err)
	}
}

func TestSchedulerBackgroundCanceled(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithBusyBackground(0))
	s.foreground()()
	ctx, cancel := context.WithCancel(context.Background())
	ch := startBackground(ctx, s)
	clk.waitTimer(t)
	cancel()
	if r := mustGet(t, ch); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("canceled wait returned %v", r.err)
	}
}

func TestSchedulerBackgroundRangeGrowsWithQuiet(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk))
	s.foreground()()
	if got := s.backgroundRange(1 << 20); got != 256<<10 {
		t.Errorf("right after a read: %d, want 256 KiB", got)
	}
	clk.Advance(500 * time.Millisecond)
	if got := s.backgroundRange(1 << 20); got != 1<<20 {
		t.Errorf("500ms after a read: %d, want 1 MiB", got)
	}
	s.foreground()()
	if got := s.backgroundRange(1 << 20); got != 256<<10 {
		t.Errorf("after another read: %d, want 256 KiB again", got)
	}
}

// randomFiles returns n files of size random (incompressible) bytes in
// dir.
func randomFiles(t testing.TB, dir string, n, size int) []tarFile {
	t.Helper()
	files := make([]tarFile, n)
	for i := range files {
		files[i] = tarFile{name: fmt.Sprintf("%s/f%03d", dir, i), data: make([]byte, size)}
		if _, err := rand.Read(files[i].data); err != nil {
			t.Fatal(err)
		}
	}
	return files
}

// TestBackgroundFetchRequestSizes runs a layer's background fetch (no
// FUSE) under a fake clock: it waits for the quiet period after a read,
// its requests are small right after the read and larger after a longer
// quiet, and it fetches every chunk.
func TestBackgroundFetchRequestSizes(t *testing.T) {
	blob, r := buildLayer(t, randomFiles(t, "d", 48, 48<<10), 0)
	for _, c := range []struct {
		name    string
		quiet   time.Duration // after the read, before background fetch
		maxSize int64
	}{
		{"right after a read", 0, 256 << 10},
		{"after a long quiet", time.Second, 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			clk := newFakeClock()
			sched := NewScheduler(1, WithClock(clk), WithQuietPeriod(100*time.Millisecond), WithBusyBackground(0))
			rb := &recordingBlob{r: bytes.NewReader(blob)}
			store, err := cache.Open(cache.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
				func(context.Context) (Blob, error) { return rb, nil }, store, LayerOptions{Scheduler: sched})
			defer l.Close()
			sched.foreground()() // a read just ended
			clk.Advance(c.quiet)
			l.StartFetching(context.Background(), FetchOptions{Background: true, RangeSize: 1 << 20})
			if c.quiet == 0 {
				if d := clk.waitTimer(t); d != 100*time.Millisecond {
					t.Fatalf("background waits %v after a read, want the quiet period", d)
				}
				if n := len(rb.requests()); n != 0 {
					t.Fatalf("%d requests before the quiet period passed", n)
				}
				clk.Advance(100 * time.Millisecond)
			}
			l.WaitFetching()
			reqs := rb.requests()
			if len(reqs) == 0 {
				t.Fatal("background fetch made no request")
			}
			biggest := slices.MaxFunc(reqs, func(a, b [2]int64) int { return cmp.Compare(a[1], b[1]) })[1]
			if biggest > c.maxSize {
				t.Errorf("a request of %d bytes, want at most %d", biggest, c.maxSize)
			}
			if biggest <= c.maxSize/2 {
				t.Errorf("largest request %d bytes: the window (%d) was not used", biggest, c.maxSize)
			}
			if cached, total := l.Cached(); cached != total {
				t.Errorf("%d of %d chunks cached after background fetch", cached, total)
			}
			if st := l.Stats(); st.BackgroundBytes == 0 || st.BackgroundBytes != st.FetchedBytes || st.Requests != int64(len(reqs)) {
				t.Errorf("stats %+v after %d requests", st, len(reqs))
			}
		})
	}
}
