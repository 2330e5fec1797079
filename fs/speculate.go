// Speculation: fetching what no reader waits for yet, in the order it is
// most likely to be read.
//
// A layer keeps four queues of chunk runs, served in this order:
//
//  1. hints (Layer.Hint: a learned start-up profile), first in first out;
//  2. the prioritized region (StartFetching with Prefetch);
//  3. the neighbourhoods of recent misses (readahead.go: the chunks that
//     follow a missed chunk in the blob — the rest of a file being read —
//     then the following files of its directory), newest first, at most
//     maxNearRuns of them;
//  4. the rest of the blob (StartFetching with Background), in blob order.
//
// Hints and the prioritized region are expected reads: a worker fetches
// them up to FetchOptions.PrefetchParallel requests at a time and counts
// as foreground for the Scheduler while it has work. The neighbourhoods
// and the rest are speculative: a second worker fetches them one
// Scheduler turn at a time (see Scheduler), so that they fill the link
// beside readers without delaying them by more than the busy lane. Each
// request is a run of chunks adjacent in the blob that nobody has cached
// or claimed, within the request size; the queues are consulted when a
// turn is granted, so a new miss's neighbourhood goes before older ones.

package fs

import (
	"context"
	"sync"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// maxNearRuns bounds how many miss neighbourhoods wait: older ones are
// dropped (the workload has moved on; the rest of the blob still covers
// them when fetching in the background).
const maxNearRuns = 16

// specRun is a list of chunks to fetch in order; pos is the next one.
// ctx ends the run early (a hint's or StartFetching's context).
type specRun struct {
	ctx context.Context
	cs  []estargz.Chunk
	pos int
	// maxGap is how many compressed bytes nobody asked for a request of
	// this run may span between two of its chunks (0: none).
	maxGap int64
}

func (r *specRun) done() bool { return r.pos >= len(r.cs) || r.ctx.Err() != nil }

// speculation is a layer's speculation queues and workers.
type speculation struct {
	mu       sync.Mutex
	hints    []*specRun // expected, first in first out
	prefetch *specRun   // expected, after the hints
	near     []*specRun // speculative, newest last (served first)
	rest     *specRun   // speculative, after the neighbourhoods

	rangeSize int64 // request size of expected and idle speculative fetches
	parallel  int   // expected requests at once

	// Hint ordering (hint.go); zero values mean the defaults.
	hintWindow int64 // compressed bytes of a hint reordered into blob order
	hintGap    int64 // gap a hinted request may span (<0: none)

	expectedOn, speculativeOn bool          // workers running
	changed                   chan struct{} // closed (and replaced) when a worker stops

	ctx context.Context // the workers' context, canceled by Close; guarded by Layer.bgMu
}

// hasExpected reports whether hints or prefetch work is queued, dropping
// finished runs. s.mu is held.
func (s *speculation) hasExpected() bool {
	for len(s.hints) > 0 && s.hints[0].done() {
		s.hints = s.hints[1:]
	}
	if s.prefetch != nil && s.prefetch.done() {
		s.prefetch = nil
	}
	return len(s.hints) > 0 || s.prefetch != nil
}

// hasSpeculative reports whether neighbourhood or background work is
// queued, dropping finished runs. s.mu is held.
func (s *speculation) hasSpeculative() bool {
	for len(s.near) > 0 && s.near[len(s.near)-1].done() {
		s.near = s.near[:len(s.near)-1]
	}
	if s.rest != nil && s.rest.done() {
		s.rest = nil
	}
	return len(s.near) > 0 || s.rest != nil
}

// signal wakes waitSpeculation. s.mu is held.
func (s *speculation) signal() {
	if s.changed != nil {
		close(s.changed)
	}
	s.changed = make(chan struct{})
}

func (s *speculation) requestSize() int64 {
	if s.rangeSize > 0 {
		return s.rangeSize
	}
	return DefaultRangeSize
}

func (s *speculation) parallelism() int {
	if s.parallel > 0 {
		return s.parallel
	}
	return DefaultPrefetchParallel
}

// speculateNear queues the neighbourhood of chunk c, which a reader just
// missed and is fetching.
func (l *Layer) speculateNear(c estargz.Chunk) {
	g := l.readAheadGroup(c)
	if len(g) <= 1 {
		return
	}
	s := &l.spec
	s.mu.Lock()
	s.near = append(s.near, &specRun{ctx: context.Background(), cs: g[1:]})
	if n := len(s.near); n > maxNearRuns {
		s.near = append(s.near[:0], s.near[n-maxNearRuns:]...)
	}
	s.mu.Unlock()
	l.wakeSpeculation()
}

// wakeSpeculation starts the workers that have work and are not running.
func (l *Layer) wakeSpeculation() {
	s := &l.spec
	s.mu.Lock()
	exp := !s.expectedOn && s.hasExpected()
	spec := !s.speculativeOn && s.hasSpeculative()
	s.expectedOn = s.expectedOn || exp
	s.speculativeOn = s.speculativeOn || spec
	s.mu.Unlock()
	if !exp && !spec {
		return
	}
	l.bgMu.Lock()
	defer l.bgMu.Unlock()
	if l.closed {
		s.mu.Lock()
		s.expectedOn = s.expectedOn && !exp
		s.speculativeOn = s.speculativeOn && !spec
		s.signal()
		s.mu.Unlock()
		return
	}
	if s.ctx == nil {
		ctx, cancel := context.WithCancel(context.Background())
		s.ctx = ctx
		l.hintCancels = append(l.hintCancels, cancel)
	}
	if exp {
		l.hintWG.Add(1)
		go l.runExpected(s.ctx)
	}
	if spec {
		l.hintWG.Add(1)
		go l.runSpeculative(s.ctx)
	}
}

// waitSpeculation waits until done (called with the queues locked) holds
// or ctx ends.
func (l *Layer) waitSpeculation(ctx context.Context, done func(*speculation) bool) {
	s := &l.spec
	for {
		s.mu.Lock()
		if done(s) {
			s.mu.Unlock()
			return
		}
		if s.changed == nil {
			s.changed = make(chan struct{})
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
}

// takeRun claims the next request of run r: from its next chunk that is
// neither cached nor being fetched, the following chunks of r that are
// adjacent in the blob (or within r.maxGap of the previous one), claimable,
// and end within size bytes of
// the first one's start. It advances r past them (and past the chunks it
// skipped) and returns the claimed chunks, or nil when r is done.
func (l *Layer) takeRun(r *specRun, size int64) []estargz.Chunk {
	l.pmu.Lock()
	defer l.pmu.Unlock()
	claimable := func(c estargz.Chunk) bool {
		_, busy := l.pending[c.Digest]
		return !busy && !l.store.Has(c.Digest)
	}
	for r.pos < len(r.cs) && !claimable(r.cs[r.pos]) {
		r.pos++
	}
	if r.pos == len(r.cs) {
		return nil
	}
	first := r.cs[r.pos]
	start, end := first.Offset, first.End
	group := []estargz.Chunk{first}
	seen := map[digest.Digest]bool{first.Digest: true}
	r.pos++
	for r.pos < len(r.cs) {
		c := r.cs[r.pos]
		if seen[c.Digest] {
			r.pos++
			continue
		}
		if c.Offset < start || c.Offset > end+r.maxGap || max(end, c.End)-start > size || !claimable(c) {
			break
		}
		group = append(group, c)
		seen[c.Digest] = true
		end = max(end, c.End)
		r.pos++
	}
	for _, c := range group {
		l.pending[c.Digest] = &inflight{done: make(chan struct{})}
	}
	return group
}

// nextExpected claims the next expected request: hints, then the
// prioritized region. s.mu is held.
func (l *Layer) nextExpected(size int64) ([]estargz.Chunk, *specRun) {
	s := &l.spec
	for s.hasExpected() {
		r := s.prefetch
		if len(s.hints) > 0 {
			r = s.hints[0]
		}
		if g := l.takeRun(r, size); len(g) > 0 {
			return g, r
		}
	}
	return nil, nil
}

// nextSpeculative claims the next speculative request: the newest miss
// neighbourhood, then the rest of the blob. s.mu is held.
func (l *Layer) nextSpeculative(size int64) ([]estargz.Chunk, *specRun) {
	s := &l.spec
	for s.hasSpeculative() {
		r := s.rest
		if len(s.near) > 0 {
			r = s.near[len(s.near)-1]
		}
		if g := l.takeRun(r, size); len(g) > 0 {
			return g, r
		}
	}
	return nil, nil
}

// dropRun ends run r after one of its requests failed (the registry may
// be unreachable: the rest of it would fail too).
func (l *Layer) dropRun(ctx context.Context, r *specRun, err error) {
	if ctx.Err() != nil {
		return
	}
	l.spec.mu.Lock()
	r.pos = len(r.cs)
	l.spec.mu.Unlock()
	log.G(ctx).WithError(err).WithField("layer", l.digest).Warn("speculative fetch failed; dropping the rest of its run")
}

// runExpected fetches hints and the prioritized region, up to
// parallelism requests at once, counting as foreground while it runs.
func (l *Layer) runExpected(ctx context.Context) {
	defer l.hintWG.Done()
	s := &l.spec
	done := l.sched.foreground()
	defer done()
	var wg sync.WaitGroup
	defer wg.Wait()
	s.mu.Lock()
	sem := make(chan struct{}, s.parallelism())
	s.mu.Unlock()
	for {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			l.stopWorker(&s.expectedOn)
			return
		}
		s.mu.Lock()
		g, r := l.nextExpected(s.requestSize())
		s.mu.Unlock()
		if g == nil {
			<-sem
			wg.Wait() // what is in flight may fail and end its run
			s.mu.Lock()
			if !s.hasExpected() || ctx.Err() != nil {
				s.expectedOn = false
				s.signal()
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := l.fetchGroup(ctx, "", g, false); err != nil {
				l.dropRun(ctx, r, err)
			}
		}()
	}
}

// runSpeculative fetches miss neighbourhoods and the rest of the blob,
// one Scheduler turn per request.
func (l *Layer) runSpeculative(ctx context.Context) {
	defer l.hintWG.Done()
	s := &l.spec
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		s.mu.Lock()
		has := s.hasSpeculative()
		s.mu.Unlock()
		if !has {
			wg.Wait()
			s.mu.Lock()
			if !s.hasSpeculative() {
				s.speculativeOn = false
				s.signal()
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
		}
		release, limit, err := l.sched.backgroundSlot(ctx)
		if err != nil {
			l.stopWorker(&s.speculativeOn)
			return
		}
		s.mu.Lock()
		size := l.sched.backgroundRange(s.requestSize())
		if limit > 0 {
			size = min(size, limit)
		}
		g, r := l.nextSpeculative(size)
		s.mu.Unlock()
		if g == nil {
			release()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := l.fetchGroup(ctx, "", g, true)
			release()
			if err != nil {
				l.dropRun(ctx, r, err)
			}
		}()
	}
}

// stopWorker marks a worker stopped after its context ended.
func (l *Layer) stopWorker(on *bool) {
	s := &l.spec
	s.mu.Lock()
	*on = false
	s.signal()
	s.mu.Unlock()
}
