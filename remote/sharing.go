// Request sharing: reads of the same range while a fetch of it is in
// flight share that fetch (flightGroup), and the ranges of one ReadRanges
// call that overlap or lie close together are fetched with one request
// (coalesce).

package remote

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// flightGroup shares one fetch among concurrent callers asking for the
// same range. Unlike x/sync/singleflight, a caller whose context ends
// leaves without failing the others, and the fetch is cancelled only when
// every caller has left. The fetch's context carries no deadline; its retry
// loop asks the flight for the latest deadline of its callers instead.
type flightGroup struct {
	mu sync.Mutex
	m  map[Range]*flight
}

type flight struct {
	done   chan struct{}
	data   []byte
	err    error
	refs   int // under flightGroup.mu
	cancel context.CancelFunc

	mu        sync.Mutex
	last      *Error    // last failed attempt, for the callers that give up
	latest    time.Time // latest deadline among callers
	unbounded bool      // a caller has no deadline
}

type flightKey struct{}

// flightOf returns the flight a fetch runs for, if any.
func flightOf(ctx context.Context) *flight {
	f, _ := ctx.Value(flightKey{}).(*flight)
	return f
}

// join records a caller's deadline.
func (f *flight) join(ctx context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if dl, ok := ctx.Deadline(); !ok {
		f.unbounded = true
	} else if dl.After(f.latest) {
		f.latest = dl
	}
}

// deadline is the latest deadline of the callers, if they all have one.
func (f *flight) deadline() (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.latest, !f.unbounded
}

// failed records a failed attempt (a copy: the retry loop goes on
// annotating the original).
func (f *flight) failed(e *Error) {
	c := *e
	f.mu.Lock()
	f.last = &c
	f.mu.Unlock()
}

func (g *flightGroup) do(ctx context.Context, key Range, fn func(context.Context, Range) ([]byte, error)) ([]byte, error) {
	g.mu.Lock()
	f, ok := g.m[key]
	if !ok {
		f = &flight{done: make(chan struct{})}
		// Record this caller's deadline before the fetch can look at it.
		f.join(ctx)
		// The fetch keeps the first caller's values (logger...) but not
		// its cancellation.
		fctx, cancel := context.WithCancel(context.WithValue(context.WithoutCancel(ctx), flightKey{}, f))
		f.cancel = cancel
		g.m[key] = f
		go func() {
			defer cancel()
			f.data, f.err = fn(fctx, key)
			g.mu.Lock()
			if g.m[key] == f {
				delete(g.m, key)
			}
			g.mu.Unlock()
			close(f.done)
		}()
	}
	if ok {
		f.join(ctx)
	}
	f.refs++
	g.mu.Unlock()

	select {
	case <-f.done:
		return f.data, f.err
	case <-ctx.Done():
		g.mu.Lock()
		f.refs--
		last := f.refs == 0
		if last && g.m[key] == f {
			delete(g.m, key)
		}
		g.mu.Unlock()
		if last {
			f.cancel()
		}
		e := &Error{Op: "read", Range: key.String(), Err: context.Cause(ctx)}
		f.mu.Lock()
		if f.last != nil {
			e.Host, e.Status, e.Code, e.Message = f.last.Host, f.last.Status, f.last.Code, f.last.Message
			if f.last.Err != nil {
				e.Err = fmt.Errorf("%w (last attempt: %v)", e.Err, f.last.Err)
			}
		}
		f.mu.Unlock()
		return nil, e
	}
}

// rangeGroup is one request serving several of the ranges asked for.
type rangeGroup struct {
	Range
	members []int // indexes of the ranges it serves
}

// coalesce groups the ranges at indexes idx (non-empty ranges) into
// requests: ranges that overlap or lie at most gap bytes apart share one.
// The groups come in offset order; idx is sorted by offset in place.
func coalesce(ranges []Range, idx []int, gap int64) []*rangeGroup {
	slices.SortFunc(idx, func(a, c int) int { return cmp.Compare(ranges[a].Offset, ranges[c].Offset) })
	var groups []*rangeGroup
	for _, i := range idx {
		rg := ranges[i]
		if n := len(groups); n > 0 {
			g := groups[n-1]
			if end := g.Offset + g.Length; rg.Offset <= end+gap {
				g.Length = max(end, rg.Offset+rg.Length) - g.Offset
				g.members = append(g.members, i)
				continue
			}
		}
		groups = append(groups, &rangeGroup{Range: rg, members: []int{i}})
	}
	return groups
}
