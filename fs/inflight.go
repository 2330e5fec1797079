// The read path and in-flight sharing.
//
// Layer.ReadAt maps a byte range of a file to chunks and serves each from
// the Store, or fetches it. Every chunk has at most one fetch in flight: the
// first reader to miss it claims it (claim), later readers — and prefetch or
// background fetches that reach it — wait for that fetch to resolve
// (resolve) instead of fetching it again. A fetch runs detached from the
// reader that started it, under its own timeout, so one reader giving up
// does not fail the others waiting for the same chunk.

package fs

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/lazypull/lazypull/estargz"
)

// maxForegroundFetches bounds a layer's foreground requests in flight.
const maxForegroundFetches = 8

// ReadAt reads file content of node n at off into p. It returns the number
// of bytes read; short reads happen only at the end of the file.
func (l *Layer) ReadAt(ctx context.Context, n *estargz.Node, p []byte, off int64) (int, error) {
	if err := l.Err(); err != nil {
		return 0, err
	}
	if off >= n.Size || len(p) == 0 {
		return 0, nil
	}
	end := min(off+int64(len(p)), n.Size)
	total := 0
	for off < end {
		i := n.ChunkAt(off)
		if i < 0 {
			return total, fmt.Errorf("file %q has no chunk at offset %d", n.Name, off)
		}
		c := n.Chunks[i]
		inner := off - c.FileOffset
		want := min(end-off, c.Size-inner)
		dst := p[total : total+int(want)]
		l.noteChunk(c)
		if k, err := l.store.ReadAt(c.Digest, dst, inner); err == nil && k == len(dst) {
			l.hits.Add(1)
			if o := l.opts.Observer; o != nil {
				o.CacheHit(l.digest)
			}
		} else {
			l.misses.Add(1)
			if o := l.opts.Observer; o != nil {
				o.CacheMiss(l.digest)
			}
			data, err := l.fetchChunk(ctx, n, c)
			if err != nil {
				return total, err
			}
			copy(dst, data[inner:inner+want])
		}
		total += int(want)
		off += want
	}
	l.noteRead(n, int64(total))
	return total, nil
}

// timedOutMemo is how long a chunk whose fetch ran out of FetchTimeout
// keeps failing at once. When a readahead READ fails, the kernel at once
// retries the page the reader wants with a READ of its own; without the
// memo that retry waits a second FetchTimeout, so a read(2) of a buffered
// file hung for twice the configured time before failing.
const timedOutMemo = time.Second

type timedOutFetch struct {
	at  time.Time
	err error
}

// inflight is a chunk being fetched: readers of it wait on done instead of
// fetching it again.
type inflight struct {
	done chan struct{}
	data []byte
	err  error
	// delivered is set (under Layer.pmu) when done is closed: by
	// deliver, before the chunk is stored, or by resolve.
	delivered bool
	// waiters counts the readers that waited for the chunk: a fetched
	// group decodes chunks with waiters first.
	waiters atomic.Int32
}

// claim marks the chunks of cs that are neither cached nor being fetched
// as being fetched by the caller, and returns them. The caller must
// resolve every claimed chunk.
func (l *Layer) claim(cs []estargz.Chunk) []estargz.Chunk {
	l.pmu.Lock()
	defer l.pmu.Unlock()
	var mine []estargz.Chunk
	for _, c := range cs {
		if _, busy := l.pending[c.Digest]; busy || l.store.Has(c.Digest) {
			continue
		}
		l.pending[c.Digest] = &inflight{done: make(chan struct{})}
		mine = append(mine, c)
	}
	return mine
}

// deliver hands a claimed chunk's verified bytes to the readers waiting
// for it, before it is stored: a reader never waits for the disk write.
// The chunk stays pending — readers arriving meanwhile take data from it,
// and nobody claims it again — until resolve, after it is stored.
func (l *Layer) deliver(c estargz.Chunk, data []byte) {
	l.pmu.Lock()
	defer l.pmu.Unlock()
	if p := l.pending[c.Digest]; p != nil && !p.delivered {
		p.delivered, p.data = true, data
		close(p.done)
	}
}

// resolve ends the fetch of a claimed chunk (waking its readers unless
// deliver did).
func (l *Layer) resolve(c estargz.Chunk, data []byte, err error) {
	l.pmu.Lock()
	defer l.pmu.Unlock()
	p := l.pending[c.Digest]
	delete(l.pending, c.Digest)
	if p != nil && !p.delivered {
		p.delivered, p.data, p.err = true, data, err
		close(p.done)
	}
}

// fetchChunk returns chunk c of file n, verified, fetching it in a request
// of its own (and queueing its neighbourhood for speculation) unless a
// fetch of it is in flight already — a read, a hint, a prefetch or a
// speculative fetch — in which case it waits for that one. The fetch runs
// under its own timeout, so one reader giving up does not fail the others
// waiting for the same chunk.
func (l *Layer) fetchChunk(ctx context.Context, n *estargz.Node, c estargz.Chunk) ([]byte, error) {
	l.timedOutMu.Lock()
	f, ok := l.timedOut[c.Digest]
	l.timedOutMu.Unlock()
	if ok && l.sched.clock.Now().Sub(f.at) < timedOutMemo {
		return nil, f.err
	}
	done := l.sched.foreground()
	defer done()
	for {
		l.pmu.Lock()
		p := l.pending[c.Digest]
		l.pmu.Unlock()
		if p == nil {
			if l.sched.legacyReadAhead {
				p = l.fetchLegacy(ctx, n, c)
			} else {
				// The reader's request is its chunk alone; what it may
				// read next is speculation's (speculate.go), which
				// fills the link beside it without delaying it much.
				group := l.claim([]estargz.Chunk{c})
				// Take the entry to wait on before the fetch starts: a
				// fetch that fails fast would otherwise be resolved (and
				// gone) before the look below, and the chunk fetched
				// again.
				l.pmu.Lock()
				p = l.pending[c.Digest]
				l.pmu.Unlock()
				if len(group) > 0 {
					go l.fetchForeground(context.WithoutCancel(ctx), n.Name, group)
					l.speculateNear(c)
				}
			}
			if p == nil {
				// Cached by someone else between our looks: read it.
				data, err := l.storeGet(c)
				if err == nil {
					return data, nil
				}
				continue
			}
		}
		p.waiters.Add(1) // decoded first in its group (fetchGroup)
		select {
		case <-p.done:
			if p.err != nil {
				return nil, p.err
			}
			return p.data, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// storeGet reads a whole chunk from the store.
func (l *Layer) storeGet(c estargz.Chunk) ([]byte, error) {
	buf := make([]byte, c.Size)
	n, err := l.store.ReadAt(c.Digest, buf, 0)
	if err != nil {
		return nil, err
	}
	if int64(n) != c.Size {
		return nil, fmt.Errorf("short cache read of %s", c.Digest)
	}
	return buf, nil
}

// fetchLegacy is the read path before speculation, kept as
// BenchmarkColdStartSlowLink's baseline (withForegroundReadAhead): the
// miss's read-ahead travels in a second foreground request, one at a
// time per layer. It returns c's pending entry (nil if cached meanwhile).
func (l *Layer) fetchLegacy(ctx context.Context, n *estargz.Node, c estargz.Chunk) *inflight {
	want := []estargz.Chunk{c}
	ra := l.raBusy.CompareAndSwap(false, true)
	if ra {
		want = l.readAheadGroup(c)
	}
	group := l.claim(want)
	l.pmu.Lock()
	p := l.pending[c.Digest]
	l.pmu.Unlock()
	fctx := context.WithoutCancel(ctx)
	if len(group) > 0 && group[0].Digest == c.Digest {
		go l.fetchForeground(fctx, n.Name, group[:1])
		group = group[1:]
	}
	if len(group) > 0 {
		go func() {
			l.fetchForeground(fctx, "", group)
			l.raBusy.Store(false)
		}()
	} else if ra {
		l.raBusy.Store(false)
	}
	return p
}
