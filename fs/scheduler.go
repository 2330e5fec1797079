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
		o.RangeSize = 1 << 20
	}
	if o.PrefetchParallel <= 0 {
		o.PrefetchParallel = 3
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
		size := rangeSize
		if background {
			size = l.sched.backgroundRange(rangeSize)
		}
		j := i + 1
		for j < len(cs) && cs[j].End-cs[i].Offset <= size {
			j++
		}
		window := cs[i:j]
		i = j
		if background {
			release, err := l.sched.background(ctx)
			if err != nil {
				return err
			}
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

// Scheduler lets foreground reads win over background fetches across
// layers: a background request starts only when no foreground fetch has
// been in flight for a quiet period, and at most a fixed number run at
// once.
type Scheduler struct {
	mu      sync.Mutex
	fg      int
	lastFg  time.Time     // when the last foreground fetch ended
	idle    chan struct{} // closed while fg == 0
	bg      chan struct{}
	quiet   time.Duration
	nowFunc func() time.Time
}

// DefaultQuietPeriod is how long background fetching waits after the last
// foreground fetch: a workload that is reading tends to read again soon.
const DefaultQuietPeriod = 100 * time.Millisecond

// NewScheduler returns a Scheduler allowing maxBackground concurrent
// background requests.
func NewScheduler(maxBackground int) *Scheduler {
	idle := make(chan struct{})
	close(idle)
	return &Scheduler{idle: idle, bg: make(chan struct{}, max(1, maxBackground)), quiet: DefaultQuietPeriod, nowFunc: time.Now}
}

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
		s.lastFg = s.nowFunc()
		if s.fg == 0 {
			close(s.idle)
		}
		s.mu.Unlock()
	}
}

// backgroundRange sizes the next background request: small (256 KiB)
// right after foreground activity, so that a read arriving behind it on a
// slow link waits little, doubling for every 250 ms of quiet up to max.
func (s *Scheduler) backgroundRange(max int64) int64 {
	s.mu.Lock()
	quiet := s.nowFunc().Sub(s.lastFg)
	s.mu.Unlock()
	size := int64(256 << 10)
	for steps := quiet / (250 * time.Millisecond); steps > 0 && size < max; steps-- {
		size *= 2
	}
	return min(size, max)
}

// background waits for a background slot while foreground fetches are in
// flight or ended less than the quiet period ago.
func (s *Scheduler) background(ctx context.Context) (func(), error) {
	for {
		s.mu.Lock()
		idle, wait := s.idle, s.quiet-s.nowFunc().Sub(s.lastFg)
		s.mu.Unlock()
		select {
		case <-idle:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			continue
		}
		select {
		case s.bg <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		s.mu.Lock()
		busy := s.fg > 0
		s.mu.Unlock()
		if !busy {
			return func() { <-s.bg }, nil
		}
		<-s.bg
	}
}
