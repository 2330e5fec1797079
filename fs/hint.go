// Hints: chunks someone expects to be read soon (a learned start-up
// profile), fetched ahead of the rest at prefetch priority.

package fs

import (
	"cmp"
	"context"
	"slices"
	"sort"

	"github.com/lazypull/lazypull/estargz"
)

// MaxHintChunks bounds how many chunks one Hint call takes: a hint comes
// from untrusted input (a profile found in a registry), so it may not make
// the daemon queue more work than a layer has chunks, nor without bound.
const MaxHintChunks = 1 << 16

// A start-up profile lists chunks in first-read order, which is scattered
// over the blob: fetched in that order, most requests would carry one
// small chunk and cost a round trip each. So a hint is cut into windows of
// about defaultHintWindow compressed bytes, in the order given, and each
// window is fetched in blob order, a request spanning gaps of up to
// defaultHintGap bytes between hinted chunks (fetching a few unasked bytes
// costs less than a round trip on any link worth being lazy on: 128 KiB
// is 10 ms at 100 Mbit/s). The order between windows is kept, so the
// chunks read first still arrive first.
const (
	defaultHintWindow = 4 << 20
	defaultHintGap    = 128 << 10
)

// Hint asks the layer to fetch the chunks that start at the given
// compressed offsets in the blob soon, in the given order, ahead of the
// prioritized region, miss neighbourhoods and the background fetch: they
// are expected reads (speculate.go), fetched up to PrefetchParallel
// requests at a time and foreground for the Scheduler. The list is fetched
// window by window, each window in blob order with nearby chunks sharing a
// request (see defaultHintWindow). Offsets that name no chunk of
// the layer, repeats, and chunks already cached or being fetched are
// skipped; at most MaxHintChunks are taken, and queued (older hints are
// dropped first). A hint only orders fetches: what a read returns is
// unchanged. It returns at once; ctx ending drops what is not fetched
// yet, and Close stops the work.
func (l *Layer) Hint(ctx context.Context, offsets []int64) {
	cs := l.hintChunks(offsets)
	if len(cs) == 0 {
		return
	}
	s := &l.spec
	s.mu.Lock()
	window, gap := s.hintWindow, s.hintGap
	if window == 0 {
		window = defaultHintWindow
	}
	if gap == 0 {
		gap = defaultHintGap
	}
	hintWindows(cs, window)
	s.hints = append(s.hints, &specRun{ctx: ctx, cs: cs, maxGap: max(gap, 0)})
	// Queued hints are bounded too: the oldest runs go first.
	queued := 0
	for _, r := range s.hints {
		queued += len(r.cs) - r.pos
	}
	for queued > MaxHintChunks && len(s.hints) > 1 {
		queued -= len(s.hints[0].cs) - s.hints[0].pos
		s.hints = s.hints[1:]
	}
	s.mu.Unlock()
	l.wakeSpeculation()
}

// hintWindows sorts each window of cs into blob order: windows are
// consecutive runs of cs, in its order, of about window compressed bytes.
func hintWindows(cs []estargz.Chunk, window int64) {
	for i := 0; i < len(cs); {
		j, size := i, int64(0)
		for j < len(cs) && (j == i || size+cs[j].End-cs[j].Offset <= window) {
			size += cs[j].End - cs[j].Offset
			j++
		}
		slices.SortStableFunc(cs[i:j], func(a, b estargz.Chunk) int { return cmp.Compare(a.Offset, b.Offset) })
		i = j
	}
}

// hintChunks maps offsets to the layer's chunks, in the given order,
// without repeats and at most MaxHintChunks.
func (l *Layer) hintChunks(offsets []int64) []estargz.Chunk {
	seen := make(map[int]struct{}, min(len(offsets), MaxHintChunks))
	var cs []estargz.Chunk
	for _, off := range offsets {
		if len(cs) >= MaxHintChunks {
			break
		}
		i := sort.Search(len(l.chunks), func(i int) bool { return l.chunks[i].Offset >= off })
		if i == len(l.chunks) || l.chunks[i].Offset != off {
			continue
		}
		if _, ok := seen[i]; ok {
			continue
		}
		seen[i] = struct{}{}
		cs = append(cs, l.chunks[i])
	}
	return cs
}
