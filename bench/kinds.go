package bench

import (
	"context"
	"fmt"
	"sort"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
)

// layerChunks is what classifying a layer's requests needs from its TOC.
type layerChunks struct {
	// starts are the chunks' compressed offsets, sorted.
	starts []int64
	// prefetchEnd is where the prioritized region ends (-1: none).
	prefetchEnd int64
}

// chunksIn returns how many chunks start in [off, end).
func (lc *layerChunks) chunksIn(off, end int64) int {
	i := sort.Search(len(lc.starts), func(i int) bool { return lc.starts[i] >= off })
	j := sort.Search(len(lc.starts), func(i int) bool { return lc.starts[i] >= end })
	return j - i
}

// classify refines the snapshotter's foreground requests with the layer's
// TOC: a request for more than one chunk is a read-ahead (the chunk a read
// missed and those after it), or a prefetch when it lies in the
// prioritized region; a request for one chunk is a foreground miss.
// The daemon reports prefetches as foreground requests, so this is an
// approximation: a read-ahead inside the prioritized region counts as
// prefetch.
func classify(reqs []Request, layers map[string]*layerChunks) {
	for i := range reqs {
		q := &reqs[i]
		if q.By != "snapshotter" || q.Kind != KindForeground || q.Length <= 0 {
			continue
		}
		lc := layers[q.Layer]
		if lc == nil {
			continue
		}
		end := q.Offset + q.Length
		if lc.chunksIn(q.Offset, end) <= 1 {
			continue
		}
		if lc.prefetchEnd > 0 && end <= lc.prefetchEnd {
			q.Kind = KindPrefetch
		} else {
			q.Kind = KindReadAhead
		}
	}
}

// layerIndexes reads, once per layer, the TOCs of the layers the
// snapshotter read content from, from ref's repository (the loopback
// registry directly, so no emulated link is involved). A layer whose TOC
// cannot be read is left out: its requests keep the daemon's kinds.
func (r *Runner) layerIndexes(ctx context.Context, ref string, reqs []Request) map[string]*layerChunks {
	out := map[string]*layerChunks{}
	for _, q := range reqs {
		if q.By != "snapshotter" || q.Kind != KindForeground || q.Layer == "" {
			continue
		}
		if _, done := out[q.Layer]; done {
			continue
		}
		lc, ok := r.chunkCache[q.Layer]
		if !ok {
			var err error
			lc, err = r.readChunks(ctx, ref, q.Layer)
			if err != nil {
				r.logf("classifying requests: %v", err)
			}
			r.chunkCache[q.Layer] = lc
		}
		out[q.Layer] = lc
	}
	return out
}

func (r *Runner) readChunks(ctx context.Context, ref, layer string) (*layerChunks, error) {
	d, err := digest.Parse(layer)
	if err != nil {
		return nil, fmt.Errorf("layer %q: %w", layer, err)
	}
	b, err := r.remote.OpenBlob(ctx, ref, ocispec.Descriptor{Digest: d})
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", d, err)
	}
	er, err := estargz.Open(b.ReaderAt(ctx), b.Size(), estargz.OpenOptions{})
	if err != nil {
		return nil, fmt.Errorf("layer %s TOC: %w", d, err)
	}
	lc := &layerChunks{prefetchEnd: er.PrefetchEnd}
	for _, c := range er.Chunks() {
		if n := len(lc.starts); n == 0 || lc.starts[n-1] != c.Offset {
			lc.starts = append(lc.starts, c.Offset)
		}
	}
	return lc, nil
}
