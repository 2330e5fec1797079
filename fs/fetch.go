// Fetching ranges: one range request for a group of chunks, each chunk
// decoded and verified against its digest, stored, and resolved for the
// readers waiting on it. Bytes that fail verification are never served or
// cached: they are counted, logged and resolved with an error wrapping
// ErrVerify.

package fs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// fetchForeground fetches a claimed group for a reader, under FetchTimeout,
// remembering a primary chunk whose fetch timed out.
func (l *Layer) fetchForeground(ctx context.Context, name string, group []estargz.Chunk) {
	ctx, cancel := context.WithTimeout(ctx, l.opts.FetchTimeout)
	defer cancel()
	// Bound the fetches (and their buffers) in flight: the kernel's
	// read-ahead of a big file can send dozens of READs at once, and a
	// few requests fill any link.
	var err error
	select {
	case l.fgSlots <- struct{}{}:
		err = l.fetchGroup(ctx, name, group, false)
		<-l.fgSlots
	case <-ctx.Done():
		err = fmt.Errorf("layer %s: file %q: waiting to fetch: %w", l.digest, name, ctx.Err())
		for _, g := range group {
			l.resolve(g, nil, err)
		}
	}
	primary := group[0].Digest
	l.timedOutMu.Lock()
	if errors.Is(err, context.DeadlineExceeded) {
		if l.timedOut == nil {
			l.timedOut = make(map[digest.Digest]timedOutFetch)
		}
		l.timedOut[primary] = timedOutFetch{at: l.sched.clock.Now(), err: err}
	} else {
		delete(l.timedOut, primary)
	}
	l.timedOutMu.Unlock()
}

// fetchGroup fetches the claimed chunks of group (in blob order) with one
// range request, verifies and stores each and resolves them. It returns the
// request's error; a chunk that fails verification is counted, logged and
// resolved with its error while the others go on.
func (l *Layer) fetchGroup(ctx context.Context, name string, group []estargz.Chunk, background bool) error {
	// The group is in claim order (a directory's chunks, then those that
	// follow in the blob), not necessarily in blob order.
	start := slices.MinFunc(group, func(a, b estargz.Chunk) int { return cmp.Compare(a.Offset, b.Offset) }).Offset
	end := slices.MaxFunc(group, func(a, b estargz.Chunk) int { return cmp.Compare(a.End, b.End) }).End
	charged, err := l.opts.Budget.acquire(ctx, groupMemory(group, start, end), true, fmt.Sprintf("layer %s: file %q", l.digest, name))
	defer l.opts.Budget.release(charged)
	var buf []byte
	if err == nil {
		buf, err = l.fetchRange(ctx, start, end, background)
	}
	if err != nil {
		err = fmt.Errorf("layer %s: file %q: %w", l.digest, name, err)
		for _, g := range group {
			l.resolve(g, nil, err)
		}
		return err
	}
	// Readers first: every chunk is decoded, verified and handed to its
	// waiting readers before any is written to the cache (see deliver),
	// and chunks someone waits for are decoded before the others (see
	// decodeOrder). Close waits for this part: a chunk a reader got is
	// cached before the layer goes away (and is served again after a
	// remount offline).
	l.storing.RLock()
	defer l.storing.RUnlock()
	l.pmu.Lock()
	entries := make([]*inflight, len(group))
	for i, g := range group {
		entries[i] = l.pending[g.Digest]
	}
	l.pmu.Unlock()
	decoded := make([][]byte, len(group))
	next := decodeOrder(entries)
	for i := next(); i >= 0; i = next() {
		g := group[i]
		data, err := l.dec.DecodeChunk(l.comp, buf[g.Offset-start:g.End-start], g, nil)
		if err != nil {
			fname := ""
			if i == 0 {
				fname = name
			}
			l.resolve(g, nil, l.verifyError(ctx, fname, g, err))
			continue
		}
		l.deliver(g, data)
		decoded[i] = data
	}
	for i, g := range group {
		data := decoded[i]
		if data == nil {
			continue
		}
		if err := l.store.Add(g.Digest, data); err != nil {
			log.G(ctx).WithError(err).WithFields(log.Fields{"layer": l.digest, "chunk": g.Digest}).Warn("caching chunk failed; serving it uncached")
		}
		l.resolve(g, data, nil)
	}
	return nil
}

// decodeOrder returns an iterator over the indexes of a group's chunks
// (given their in-flight entries, nil for none): each call returns the
// first chunk not returned yet that a reader waits for at that moment,
// else the first not returned yet in group order, and -1 at the end. So a
// reader that joins a speculative request waits for its own chunk's
// decoding only, not for the chunks before it.
func decodeOrder(entries []*inflight) func() int {
	taken := make([]bool, len(entries))
	left, first := len(entries), 0
	return func() int {
		if left == 0 {
			return -1
		}
		pick := -1
		for i := first; i < len(entries); i++ {
			if taken[i] {
				continue
			}
			if pick < 0 {
				pick = i
			}
			if p := entries[i]; p != nil && p.waiters.Load() > 0 {
				pick = i
				break
			}
		}
		taken[pick] = true
		left--
		for first < len(entries) && taken[first] {
			first++
		}
		return pick
	}
}

// verifyError counts, reports and logs chunk c of file name failing
// verification with err, and returns the error for its readers.
func (l *Layer) verifyError(ctx context.Context, name string, c estargz.Chunk, err error) error {
	l.verifyFailures.Add(1)
	if o := l.opts.Observer; o != nil {
		o.VerifyFailed(l.digest)
	}
	log.G(ctx).WithError(err).WithFields(log.Fields{
		"layer": l.digest, "file": name, "offset": c.FileOffset, "blobOffset": c.Offset,
	}).Error("chunk failed verification; refusing to serve it")
	return fmt.Errorf("layer %s: file %q offset %d: chunk %w: %w", l.digest, name, c.FileOffset, ErrVerify, err)
}

// rangeBytesReader is a Blob that can return a range's bytes without
// copying them into a caller's buffer (*remote.Blob). The bytes are
// shared: fetchGroup only decodes them.
type rangeBytesReader interface {
	ReadRange(ctx context.Context, off, n int64) ([]byte, error)
}

// fetchRange reads blob bytes [start, end). The result must not be
// modified (it may be shared with other readers of the range).
func (l *Layer) fetchRange(ctx context.Context, start, end int64, background bool) ([]byte, error) {
	b, err := l.getBlob(ctx)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	var buf []byte
	if rr, ok := b.(rangeBytesReader); ok {
		buf, err = rr.ReadRange(ctx, start, end-start) // no copy
	} else {
		buf = make([]byte, end-start)
		_, err = b.ReadAt(ctx, buf, start)
	}
	d := time.Since(t0)
	l.requests.Add(1)
	l.fetchNanos.Add(int64(d))
	if o := l.opts.Observer; o != nil {
		o.Fetched(l.digest, end-start, d, background, err)
	}
	if err != nil {
		return nil, fmt.Errorf("fetching blob range [%d,%d): %w", start, end, err)
	}
	l.fetchedBytes.Add(end - start)
	if background {
		l.bgBytes.Add(end - start)
	}
	return buf, nil
}
