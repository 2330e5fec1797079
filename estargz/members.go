// Members: the tar stream that Build writes is cut into segments, each of
// which becomes one gzip member or zstd frame. A regular file's payload
// (or each chunk of a large file) starts a segment of its own, so that it
// can be fetched and decompressed alone; headers ride along in the current
// one. Segments are compressed by a pool of workers and written in input
// order, so the output does not depend on the number of workers.

package estargz

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"
)

// segment is the plain bytes of one future member (gzip) or frame (zstd).
type segment struct {
	plain      []byte
	compressed []byte
	// entries begin their payload at this segment's first byte.
	entries []*TOCEntry
	done    chan struct{}
	err     error
	weight  int64 // bytes of the in-flight budget it holds
}

type builder struct {
	opts          BuildOptions
	sizer         chunkSizer // nil: every file in maxChunk pieces
	minChunk      int64      // files up to this size are one chunk
	maxChunk      int64      // the largest chunk
	newCompressor func() (memberCompressor, error)
	out           io.Writer       // the blob: dst, outDigest and outSize
	outDigest     digest.Digester // of the blob
	outSize       byteCount       // bytes of the blob written so far
	diff          digest.Digester // of the decompressed blob (the DiffID)
	plainSize     int64
	bufs          sync.Pool

	// producer state
	cur    *segment
	pinned bool // cur holds a payload that must not be split
	order  chan *segment
	jobs   chan *segment
	ctx    context.Context

	// inflight bounds the plain bytes of segments cut but not yet
	// written. Bounding bytes rather than segments lets the producer run
	// ahead past many small members while a large one compresses, so
	// every worker stays busy on a realistic mix of file sizes.
	inflight *semaphore.Weighted
	budget   int64
}

// getBuf returns an empty buffer for a segment expected to hold about
// hint bytes: a pooled chunk-sized buffer for payload chunks, a small one
// (grown by append if needed) otherwise.
func (b *builder) getBuf(hint int64) []byte {
	if hint < b.opts.ChunkSize/2 {
		return make([]byte, 0, hint+16<<10)
	}
	if p, ok := b.bufs.Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return make([]byte, 0, b.opts.ChunkSize+64<<10)
}

func (b *builder) putBuf(p []byte) {
	if cap(p) >= int(b.opts.ChunkSize) && cap(p) <= 4*int(b.opts.ChunkSize)+1<<20 {
		b.bufs.Put(&p)
	}
}

// Write appends tar bytes to the current segment. Header-only runs are cut
// into chunk-sized members; a payload in progress never is.
func (b *builder) Write(p []byte) (int, error) {
	if b.cur == nil {
		b.cur = &segment{plain: b.getBuf(int64(len(p)))}
	}
	b.cur.plain = append(b.cur.plain, p...)
	if !b.pinned && int64(len(b.cur.plain)) >= b.opts.ChunkSize {
		if err := b.cut(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// cut sends the current segment to be compressed and starts a new one.
func (b *builder) cut() error {
	s := b.cur
	b.cur = nil
	b.pinned = false
	if s == nil || (len(s.plain) == 0 && len(s.entries) == 0) {
		return nil
	}
	s.done = make(chan struct{})
	s.weight = min(int64(cap(s.plain)), b.budget)
	if err := b.inflight.Acquire(b.ctx, s.weight); err != nil {
		return err
	}
	select {
	case b.order <- s:
	case <-b.ctx.Done():
		return b.ctx.Err()
	}
	select {
	case b.jobs <- s:
	case <-b.ctx.Done():
		return b.ctx.Err()
	}
	return nil
}

// startPayload cuts and pins a new segment whose first byte is the payload
// of ent, size bytes long.
func (b *builder) startPayload(ent *TOCEntry, size int64) error {
	if err := b.cut(); err != nil {
		return err
	}
	b.cur = &segment{plain: b.getBuf(size), entries: []*TOCEntry{ent}}
	b.pinned = true
	return nil
}

func (b *builder) run(ctx context.Context, src entrySource) (*TOC, error) {
	g, ctx := errgroup.WithContext(ctx)
	b.ctx = ctx
	b.order = make(chan *segment, 64*b.opts.Workers)
	b.jobs = make(chan *segment, b.opts.Workers)
	// About what 3*Workers chunk-sized segments hold.
	b.budget = 3 * int64(b.opts.Workers) * (b.opts.ChunkSize + 64<<10)
	b.inflight = semaphore.NewWeighted(b.budget)

	for range b.opts.Workers {
		g.Go(func() error {
			c, err := b.newCompressor()
			if err != nil {
				return err
			}
			for s := range b.jobs {
				s.compressed, s.err = c.compress(s.compressed[:0], s.plain)
				close(s.done)
			}
			return nil
		})
	}
	g.Go(b.writeSegments)

	toc := &TOC{Version: 1}
	g.Go(func() error {
		defer close(b.jobs)
		defer close(b.order)
		err := b.produce(src, toc)
		if err == nil {
			err = b.cut()
		}
		return err
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return toc, nil
}

// writeSegments writes compressed segments in order and assigns offsets.
func (b *builder) writeSegments() error {
	for s := range b.order {
		select {
		case <-s.done:
		case <-b.ctx.Done():
			return b.ctx.Err()
		}
		if s.err != nil {
			return fmt.Errorf("estargz: compressing: %w", s.err)
		}
		for _, e := range s.entries {
			e.Offset = int64(b.outSize)
		}
		b.diff.Hash().Write(s.plain)
		b.plainSize += int64(len(s.plain))
		if _, err := b.out.Write(s.compressed); err != nil {
			return fmt.Errorf("estargz: writing blob: %w", err)
		}
		b.putBuf(s.plain)
		s.plain, s.compressed = nil, nil
		b.inflight.Release(s.weight)
	}
	return nil
}

func (b *builder) produce(src entrySource, toc *TOC) error {
	tw := tar.NewWriter(b)
	for {
		if err := b.ctx.Err(); err != nil {
			return err
		}
		h, payload, err := src.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if err := b.writeEntry(tw, h, payload, toc); err != nil {
			return err
		}
	}
	if b.opts.Compression == Zstd {
		// zstd:chunked has no TOC tar entry: end the archive here so the
		// decompressed stream is a complete tar.
		return tw.Close()
	}
	// gzip: the TOC entry and the end-of-archive blocks follow in their
	// own member, written by finish.
	return tw.Flush()
}

// byteCount counts the bytes written to it.
type byteCount int64

func (c *byteCount) Write(p []byte) (int, error) {
	*c += byteCount(len(p))
	return len(p), nil
}
