// Hints: chunks someone expects to be read soon (a learned start-up
// profile), fetched ahead of the rest at prefetch priority.

package fs

import (
	"context"
	"sort"

	"github.com/containerd/log"

	"github.com/lazypull/lazypull/estargz"
)

// MaxHintChunks bounds how many chunks one Hint call takes: a hint comes
// from untrusted input (a profile found in a registry), so it may not make
// the daemon queue more work than a layer has chunks, nor without bound.
const MaxHintChunks = 1 << 16

// Hint asks the layer to fetch the chunks that start at the given
// compressed offsets in the blob soon, in the given order, ahead of the
// background fetch (they count as prefetch: foreground for the Scheduler).
// Offsets that name no chunk of the layer, repeats, and chunks already
// cached or being fetched are skipped; at most MaxHintChunks are taken.
// A hint only orders fetches: what a read returns is unchanged. It returns
// at once; Close stops the work.
func (l *Layer) Hint(ctx context.Context, offsets []int64) {
	cs := l.hintChunks(offsets)
	if len(cs) == 0 {
		return
	}
	l.bgMu.Lock()
	defer l.bgMu.Unlock()
	if l.closed {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	l.hintCancels = append(l.hintCancels, cancel)
	l.hintWG.Add(1)
	go func() {
		defer l.hintWG.Done()
		defer cancel()
		done := l.sched.foreground()
		defer done()
		// Runs of chunks adjacent in the blob share a request.
		for _, run := range blobRuns(cs) {
			if err := l.fetchChunks(ctx, run, DefaultRangeSize, DefaultPrefetchParallel, false); err != nil {
				if ctx.Err() == nil {
					log.G(ctx).WithError(err).WithField("layer", l.digest).Warn("hinted fetch failed")
				}
				return
			}
		}
	}()
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

// blobRuns splits cs (in any order) into maximal runs whose chunks follow
// one another in the blob, keeping cs's order between runs.
func blobRuns(cs []estargz.Chunk) [][]estargz.Chunk {
	var runs [][]estargz.Chunk
	start := 0
	for i := 1; i <= len(cs); i++ {
		if i == len(cs) || cs[i].Offset != cs[i-1].End {
			runs = append(runs, cs[start:i])
			start = i
		}
	}
	return runs
}
