package fs

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
)

// With a busy lane, one bounded background request runs while a read is
// fetching; a second, while the lane stays taken, waits for the read to
// end and the quiet period, as without the lane.
func TestSchedulerBusyLaneWhileReading(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithQuietPeriod(100*time.Millisecond), WithBusyBackground(64<<10), WithBusyDepth(1))
	clk.Advance(time.Hour)
	done := s.foreground()
	release, limit, err := s.backgroundSlot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if limit != 64<<10 {
		t.Fatalf("busy-lane slot allows %d bytes, want %d", limit, 64<<10)
	}
	ch := startBackground(context.Background(), s)
	notYet(t, ch, "while the busy lane is taken and a read is in flight")
	done()
	if d := clk.waitTimer(t); d != 100*time.Millisecond {
		t.Fatalf("second request waits %v, want the quiet period", d)
	}
	notYet(t, ch, "within the quiet period, the busy lane taken")
	clk.Advance(100 * time.Millisecond)
	r := mustGet(t, ch)
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.release()
	release()
}

// The busy lane also covers the quiet period after a read, and an idle
// scheduler hands out ordinary, unbounded slots.
func TestSchedulerBusyLaneInQuietPeriod(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithQuietPeriod(100*time.Millisecond), WithBusyBackground(128<<10))
	release, limit, err := s.backgroundSlot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if limit != 0 {
		t.Fatalf("an idle scheduler's slot is limited to %d bytes", limit)
	}
	release()
	s.foreground()()
	clk.Advance(30 * time.Millisecond)
	release, limit, err = s.backgroundSlot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if limit != 128<<10 {
		t.Fatalf("30ms after a read: slot limit %d, want the busy lane's %d", limit, 128<<10)
	}
	release()
	select {
	case d := <-clk.added:
		t.Fatalf("the busy lane waited %v", d)
	default:
	}
}

// Without WithBusyBackground (the default) nothing runs beside a read.
func TestSchedulerNoBusyLaneByDefault(t *testing.T) {
	clk := newFakeClock()
	s := NewScheduler(1, WithClock(clk), WithBusyBackground(0))
	done := s.foreground()
	ch := startBackground(context.Background(), s)
	notYet(t, ch, "while a read is in flight")
	done()
	clk.waitTimer(t)
	clk.Advance(DefaultQuietPeriod)
	if r := mustGet(t, ch); r.err != nil {
		t.Fatal(r.err)
	}
}

// A layer's background fetch takes the busy lane while a read is in
// flight: it fetches everything without waiting for the read to end, in
// requests no larger than the lane allows.
func TestBackgroundFetchUsesBusyLane(t *testing.T) {
	blob, r := buildLayer(t, randomFiles(t, "d", 16, 48<<10), 0)
	clk := newFakeClock()
	sched := NewScheduler(1, WithClock(clk), WithBusyBackground(64<<10))
	rb := &recordingBlob{r: bytes.NewReader(blob)}
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return rb, nil }, store, LayerOptions{Scheduler: sched})
	defer l.Close()
	done := sched.foreground() // a read is in flight the whole time
	defer done()
	l.StartFetching(context.Background(), FetchOptions{Background: true, RangeSize: 1 << 20})
	l.WaitFetching()
	reqs := rb.requests()
	if len(reqs) == 0 {
		t.Fatal("no background request while a read was in flight")
	}
	for _, q := range reqs {
		if q[1] > 64<<10 {
			t.Fatalf("busy-lane request of %d bytes, limit %d", q[1], 64<<10)
		}
	}
	if cached, total := l.Cached(); cached != total {
		t.Errorf("%d of %d chunks cached after background fetch", cached, total)
	}
}
