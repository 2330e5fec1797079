// Prefetch, background fetch and the Scheduler.
//
// After a mount a layer may prefetch its prioritized region (the files
// before .prefetch.landmark) and then fetch every other chunk in the
// background. Foreground reads always win: prefetch counts as foreground,
// and a background request starts only when no foreground fetch has been
// in flight for a quiet period. Background requests start small right after
// foreground activity and grow while it stays quiet, so that a read that
// arrives behind one on a slow link does not wait long. The Scheduler reads
// time from a Clock, so tests can drive these decisions without sleeping.

package fs

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/lazypull/lazypull/estargz"
)

// FetchOptions control StartFetching.
type FetchOptions struct {
	// Prefetch fetches the prioritized region first.
	Prefetch bool
	// Background fetches every other chunk afterwards.
	Background bool
	// RangeSize is the compressed size of one prefetch or background
	// request (default 1 MiB: small enough that a read arriving behind a
	// background request on a slow link does not wait long).
	RangeSize int64
	// PrefetchParallel is how many prefetch requests run at once
	// (default 3, to keep a high-latency link busy).
	PrefetchParallel int
}

// StartFetching starts prefetching and background fetching in a
// goroutine. Close (or the context) stops it.
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
	go func() {
		defer close(done)
		if o.Prefetch && l.index.PrefetchEnd > 0 {
			// Prefetch is what the workload is about to read: it counts
			// as foreground, so background fetches wait for it.
			done := l.sched.foreground()
			err := l.fetchChunks(ctx, l.chunksBefore(l.index.PrefetchEnd), o.RangeSize, o.PrefetchParallel, false)
			done()
			if err != nil && ctx.Err() == nil {
				log.G(ctx).WithError(err).WithField("layer", l.digest).Warn("prefetch failed")
			}
		}
		if o.Background {
			if err := l.fetchChunks(ctx, l.chunks, o.RangeSize, 1, true); err != nil && ctx.Err() == nil {
				log.G(ctx).WithError(err).WithField("layer", l.digest).Warn("background fetch stopped")
			}
		}
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

// fetchChunks fetches the uncached chunks among cs (in blob order) in
// ranges of about rangeSize compressed bytes, up to parallel requests at a
// time. Background fetches ask the Scheduler before each request, so they
// wait while readers are fetching. Chunks already being fetched by someone
// else are skipped.
func (l *Layer) fetchChunks(ctx context.Context, cs []estargz.Chunk, rangeSize int64, parallel int, background bool) error {
	sem := make(chan struct{}, max(1, parallel))
	var wg sync.WaitGroup
	var firstErr error
	var errMu sync.Mutex
	defer wg.Wait()
	for i := 0; i < len(cs); {
		if err := ctx.Err(); err != nil {
			return err
		}
		errMu.Lock()
		err := firstErr
		errMu.Unlock()
		if err != nil {
			return err
		}
		if background {
			// The slot first: its kind bounds the request's size.
			release, limit, err := l.sched.backgroundSlot(ctx)
			if err != nil {
				return err
			}
			size := l.sched.backgroundRange(rangeSize)
			if limit > 0 {
				size = min(size, limit)
			}
			j := windowEnd(cs, i, size)
			window := cs[i:j]
			i = j
			group := l.claim(window)
			if len(group) == 0 {
				release()
				continue
			}
			err = l.fetchGroup(ctx, "", group, true)
			release()
			if err != nil {
				return err
			}
			continue
		}
		j := windowEnd(cs, i, rangeSize)
		window := cs[i:j]
		i = j
		group := l.claim(window)
		if len(group) == 0 {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			for _, g := range group {
				l.resolve(g, nil, ctx.Err())
			}
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := l.fetchGroup(ctx, "", group, false); err != nil {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// windowEnd returns the end of the request window that starts at cs[i]:
// the chunks from i on that end within size compressed bytes of cs[i]'s
// start, and always at least cs[i] itself (a chunk larger than size is
// fetched alone).
func windowEnd(cs []estargz.Chunk, i int, size int64) int {
	j := i + 1
	for j < len(cs) && cs[j].End-cs[i].Offset <= size {
		j++
	}
	return j
}

// Scheduler lets foreground reads win over background fetches across
// layers: a background request starts only when no foreground fetch has
// been in flight for a quiet period, and at most a fixed number run at
// once. One Scheduler is shared by all the layers of a Manager.
type Scheduler struct {
	clock Clock
	quiet time.Duration

	// spare, when not nil, is the busy lane: a token per background
	// request let through while reads are fetching (see
	// WithBusyBackground), each of at most spareBytes.
	spare      chan struct{}
	spareBytes int64

	mu     sync.Mutex
	fg     int           // foreground fetches in flight
	lastFg time.Time     // when the last foreground fetch ended
	idle   chan struct{} // closed while fg == 0
	bg     chan struct{} // a token per background request in flight
}

// DefaultQuietPeriod is how long background fetching waits after the last
// foreground fetch: a workload that is reading tends to read again soon.
const DefaultQuietPeriod = 100 * time.Millisecond

// DefaultMaxBackground is how many background requests a Scheduler lets
// run at once unless told otherwise: one keeps the link free for reads.
const DefaultMaxBackground = 1

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

// WithBusyBackground lets one background request of at most maxBytes
// compressed bytes run while foreground fetches are in flight or the quiet
// period after them has not passed, so that spare bandwidth is used while
// readers wait instead of only after they stop. A foreground request then
// shares the link with at most maxBytes of speculation, which bounds how
// much it is delayed (maxBytes / link rate). 0 (the default) keeps
// background requests out until the quiet period has passed.
func WithBusyBackground(maxBytes int64) SchedulerOption {
	return func(s *Scheduler) {
		if maxBytes > 0 {
			s.spare, s.spareBytes = make(chan struct{}, 1), maxBytes
		} else {
			s.spare, s.spareBytes = nil, 0
		}
	}
}

// NewScheduler returns a Scheduler allowing maxBackground concurrent
// background requests (at least one).
func NewScheduler(maxBackground int, opts ...SchedulerOption) *Scheduler {
	idle := make(chan struct{})
	close(idle)
	s := &Scheduler{clock: systemClock{}, quiet: DefaultQuietPeriod, idle: idle, bg: make(chan struct{}, max(1, maxBackground))}
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

// backgroundSlot waits for a background slot while foreground fetches
// are in flight or ended less than the quiet period ago, and returns the
// function that gives the slot back. Meanwhile, with WithBusyBackground,
// a request may take the busy lane at once if it is free: limit is then
// the most bytes it may ask for (0: no limit but the usual sizing).
func (s *Scheduler) backgroundSlot(ctx context.Context) (release func(), limit int64, err error) {
	for {
		s.mu.Lock()
		idle, wait := s.idle, quietLeft(s.clock.Now(), s.lastFg, s.quiet)
		busy := s.fg > 0 || wait > 0
		s.mu.Unlock()
		if busy && s.spare != nil {
			select {
			case s.spare <- struct{}{}:
				return func() { <-s.spare }, s.spareBytes, nil
			default:
			}
		}
		select {
		case <-idle:
		default:
			// A foreground fetch is in flight: wait for it to end, then
			// look again, since its end starts a new quiet period.
			select {
			case <-idle:
			case <-ctx.Done():
				return nil, 0, ctx.Err()
			}
			continue
		}
		if wait > 0 {
			select {
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
