// StartFetching and the Scheduler.
//
// After a mount a layer may prefetch its prioritized region (the files
// before .prefetch.landmark) and fetch every other chunk in the
// background; both are queued for speculation (speculate.go), the
// prioritized region as expected reads (foreground, parallel), the rest
// below the neighbourhoods of recent misses. The Scheduler decides when a
// speculative request may run: readers first, a bounded busy lane beside
// them, full-size requests once reads have been quiet (see Scheduler). It
// reads time from a Clock, so tests drive these decisions without
// sleeping.

package fs

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/lazypull/lazypull/estargz"
)

// FetchOptions control StartFetching.
type FetchOptions struct {
	// Prefetch fetches the prioritized region (after any hints), as
	// expected reads.
	Prefetch bool
	// Background fetches every other chunk, as speculation below the
	// neighbourhoods of misses.
	Background bool
	// RangeSize is the largest compressed size of one prefetch, hinted or
	// background request (default 1 MiB: small enough that a read
	// arriving behind a background request on a slow link does not wait
	// long); the busy lane bounds background requests beside reads further.
	RangeSize int64
	// PrefetchParallel is how many prefetch and hinted requests run at
	// once (default 3, to keep a high-latency link busy).
	PrefetchParallel int
}

// StartFetching queues the prioritized region (Prefetch) and the rest of
// the blob (Background) for speculation (see speculate.go) and returns;
// Close (or the context) stops the work. Hints and the neighbourhoods of
// misses are speculated on whether or not StartFetching was called.
func (l *Layer) StartFetching(ctx context.Context, o FetchOptions) {
	if !o.Prefetch && !o.Background {
		return
	}
	if o.RangeSize <= 0 {
		o.RangeSize = DefaultRangeSize
	}
	if o.PrefetchParallel <= 0 {
		o.PrefetchParallel = DefaultPrefetchParallel
	}
	l.bgMu.Lock()
	defer l.bgMu.Unlock()
	if l.closed || l.bgDone != nil {
		// Closed (the mount went away before fetching started), or
		// started already.
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	l.bgCancel, l.bgDone = cancel, done
	s := &l.spec
	s.mu.Lock()
	s.rangeSize, s.parallel = o.RangeSize, o.PrefetchParallel
	if o.Prefetch && l.index.PrefetchEnd > 0 {
		s.prefetch = &specRun{ctx: ctx, cs: l.chunksBefore(l.index.PrefetchEnd)}
	}
	if o.Background {
		s.rest = &specRun{ctx: ctx, cs: l.chunks}
	}
	s.mu.Unlock()
	go func() {
		defer close(done)
		l.wakeSpeculation()
		// Done when the prefetch and the rest of the blob are.
		l.waitSpeculation(ctx, func(s *speculation) bool {
			return s.prefetch == nil && s.rest == nil && !s.expectedOn && !s.speculativeOn
		})
	}()
}

// WaitFetching waits for StartFetching's work to end.
func (l *Layer) WaitFetching() {
	l.bgMu.Lock()
	done := l.bgDone
	l.bgMu.Unlock()
	if done != nil {
		<-done
	}
}

func (l *Layer) chunksBefore(end int64) []estargz.Chunk {
	i := sort.Search(len(l.chunks), func(i int) bool { return l.chunks[i].Offset >= end })
	return l.chunks[:i]
}

// Scheduler lets foreground reads win over speculative fetches across
// layers while keeping the link busy. Its rules:
//
//   - A foreground fetch (a reader waiting for a chunk, or a layer's
//     expected fetches: hints and the prioritized region) never waits for
//     the Scheduler.
//   - While a foreground fetch is in flight, and for a quiet period after
//     the last one, exactly one speculative request of at most the busy
//     lane's size (WithBusyBackground, default DefaultBusyBytes) runs at a
//     time across all layers: it is handed out again as soon as the
//     previous one ends. A foreground request so shares the link with at
//     most that many speculative bytes, which bounds its delay (busy bytes
//     / link rate).
//   - Otherwise up to maxBackground speculative requests run at once,
//     starting at minBackgroundRange after foreground activity and
//     doubling every backgroundGrowthStep of quiet up to the range size.
//
// One Scheduler is shared by all the layers of a Manager. It reads time
// from a Clock, so tests drive these decisions without sleeping.
type Scheduler struct {
	clock Clock
	quiet time.Duration

	// spare, when not nil, is the busy lane: a token per speculative
	// request let through while reads are fetching (see
	// WithBusyBackground), each of at most spareBytes.
	spare      chan struct{}
	spareBytes int64
	spareDepth int

	// legacyReadAhead makes a miss fetch its read-ahead in a second
	// foreground request instead of queueing it for speculation: the
	// engine before speculation, kept as BenchmarkColdStartSlowLink's
	// baseline (withForegroundReadAhead).
	legacyReadAhead bool

	mu     sync.Mutex
	fg     int           // foreground fetches in flight
	lastFg time.Time     // when the last foreground fetch ended
	idle   chan struct{} // closed while fg == 0
	bg     chan struct{} // a token per background request in flight
}

// DefaultQuietPeriod is how long background fetching waits after the last
// foreground fetch: a workload that is reading tends to read again soon.
const DefaultQuietPeriod = 100 * time.Millisecond

// DefaultMaxBackground is how many speculative requests a Scheduler lets
// run at once, when no reader is fetching, unless told otherwise.
const DefaultMaxBackground = 1

// DefaultBusyBytes is the busy lane's default request size and
// DefaultBusyDepth how many lane requests run at once by default: 512 KiB
// of speculation at most beside readers (about 42 ms at 100 Mbit/s if all
// of it were ahead of a read). Of the shapes of that bound measured by
// BenchmarkColdStartSlowLink (docs/benchmarks.md), 128 KiB x 4 kept a
// 40 ms, 100 Mbit/s link busiest between requests and let the newest
// miss's neighbourhood start soonest; one request at a time leaves the
// link idle for a round trip between requests.
const (
	DefaultBusyBytes = 128 << 10
	DefaultBusyDepth = 4
)

// Background requests start at minBackgroundRange after foreground
// activity and double for every backgroundGrowthStep of quiet, up to the
// configured range size.
const (
	minBackgroundRange   = 256 << 10
	backgroundGrowthStep = 250 * time.Millisecond
)

// SchedulerOption configures a Scheduler.
type SchedulerOption func(*Scheduler)

// WithClock makes the Scheduler (and the layers using it) read time from
// c instead of the system clock; tests use it to drive time.
func WithClock(c Clock) SchedulerOption { return func(s *Scheduler) { s.clock = c } }

// WithQuietPeriod sets how long background requests wait after the last
// foreground fetch (default DefaultQuietPeriod).
func WithQuietPeriod(d time.Duration) SchedulerOption {
	return func(s *Scheduler) {
		if d >= 0 {
			s.quiet = d
		}
	}
}

// WithBusyBackground sets the busy lane: one speculative request of at
// most maxBytes compressed bytes runs while foreground fetches are in
// flight or the quiet period after them has not passed, so that spare
// bandwidth is used while readers wait instead of only after they stop.
// A foreground request then shares the link with at most maxBytes of
// speculation, which bounds how much it is delayed (maxBytes / link
// rate). The default is DefaultBusyBytes; 0 (or less) turns the lane off:
// speculation waits for the quiet period.
func WithBusyBackground(maxBytes int64) SchedulerOption {
	return func(s *Scheduler) {
		s.spareBytes = max(0, maxBytes)
		s.setLane()
	}
}

// WithBusyDepth sets how many busy-lane requests may be in flight at once
// (default DefaultBusyDepth): on a link whose round trip is long next to
// a lane request's transfer time, one request at a time leaves most of
// the link idle between them. Speculation beside readers is then at most
// depth × the lane's bytes.
func WithBusyDepth(n int) SchedulerOption {
	return func(s *Scheduler) {
		s.spareDepth = max(1, n)
		s.setLane()
	}
}

func (s *Scheduler) setLane() {
	if s.spareBytes > 0 {
		s.spare = make(chan struct{}, max(1, s.spareDepth))
	} else {
		s.spare = nil
	}
}

// withForegroundReadAhead restores the engine before speculation for
// comparisons: a miss fetches its read-ahead in a second foreground
// request (one at a time per layer) instead of queueing it.
func withForegroundReadAhead() SchedulerOption {
	return func(s *Scheduler) { s.legacyReadAhead = true }
}

// NewScheduler returns a Scheduler allowing maxBackground concurrent
// speculative requests when no reader is fetching (at least one).
func NewScheduler(maxBackground int, opts ...SchedulerOption) *Scheduler {
	idle := make(chan struct{})
	close(idle)
	s := &Scheduler{clock: systemClock{}, quiet: DefaultQuietPeriod, idle: idle, bg: make(chan struct{}, max(1, maxBackground))}
	s.spareBytes, s.spareDepth = DefaultBusyBytes, DefaultBusyDepth
	s.setLane()
	for _, o := range opts {
		o(s)
	}
	return s
}

// foreground marks a foreground fetch in flight until the returned
// function is called.
func (s *Scheduler) foreground() func() {
	s.mu.Lock()
	if s.fg == 0 {
		s.idle = make(chan struct{})
	}
	s.fg++
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		s.fg--
		s.lastFg = s.clock.Now()
		if s.fg == 0 {
			close(s.idle)
		}
		s.mu.Unlock()
	}
}

// backgroundRange sizes the next background request (see
// backgroundRangeSize).
func (s *Scheduler) backgroundRange(limit int64) int64 {
	s.mu.Lock()
	quiet := s.clock.Now().Sub(s.lastFg)
	s.mu.Unlock()
	return backgroundRangeSize(quiet, limit)
}

// backgroundRangeSize is the size of a background request after quiet
// time without foreground fetches: small (minBackgroundRange) right after
// foreground activity, so that a read arriving behind it on a slow link
// waits little, doubling for every backgroundGrowthStep of quiet up to
// limit.
func backgroundRangeSize(quiet time.Duration, limit int64) int64 {
	size := int64(minBackgroundRange)
	for steps := quiet / backgroundGrowthStep; steps > 0 && size < limit; steps-- {
		size *= 2
	}
	return min(size, limit)
}

// quietLeft is how much longer background requests must wait, given when
// the last foreground fetch ended: zero or less means they may go (if no
// foreground fetch is in flight).
func quietLeft(now, lastFg time.Time, quiet time.Duration) time.Duration {
	return quiet - now.Sub(lastFg)
}

// background is backgroundSlot without the size limit.
func (s *Scheduler) background(ctx context.Context) (func(), error) {
	release, _, err := s.backgroundSlot(ctx)
	return release, err
}

// backgroundSlot waits for a speculative request's turn and returns the
// function that gives it back. While foreground fetches are in flight or
// ended less than the quiet period ago, the turn is the busy lane's (if
// any), taken as soon as it is free: limit is then the most bytes the
// request may ask for. Otherwise it is one of the maxBackground slots,
// with limit 0 (no limit but the usual sizing).
func (s *Scheduler) backgroundSlot(ctx context.Context) (release func(), limit int64, err error) {
	lane := func() (func(), int64, error) { return func() { <-s.spare }, s.spareBytes, nil }
	for {
		s.mu.Lock()
		idle, wait := s.idle, quietLeft(s.clock.Now(), s.lastFg, s.quiet)
		busy := s.fg > 0 || wait > 0
		s.mu.Unlock()
		// spare is nil without a lane or when not busy: its cases
		// below never fire then.
		var spare chan struct{}
		if busy {
			spare = s.spare
		}
		if spare != nil {
			select {
			case spare <- struct{}{}:
				return lane()
			default:
			}
		}
		select {
		case <-idle:
		default:
			// A foreground fetch is in flight: take the lane when it is
			// free, or wait for the fetch to end and look again (its end
			// starts a new quiet period).
			select {
			case spare <- struct{}{}:
				return lane()
			case <-idle:
			case <-ctx.Done():
				return nil, 0, ctx.Err()
			}
			continue
		}
		if wait > 0 {
			select {
			case spare <- struct{}{}:
				return lane()
			case <-s.clock.After(wait):
			case <-ctx.Done():
				return nil, 0, ctx.Err()
			}
			continue
		}
		select {
		case s.bg <- struct{}{}:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
		s.mu.Lock()
		reading := s.fg > 0
		s.mu.Unlock()
		if !reading {
			return func() { <-s.bg }, 0, nil
		}
		// A reader started while we waited for the slot: yield to it.
		<-s.bg
	}
}
