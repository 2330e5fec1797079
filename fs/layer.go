// The Layer type and its lifecycle: creation from a verified index, the
// counters it keeps, and Close. What a Layer does is spread by concern:
//
//   - inflight.go: the read path (ReadAt) and in-flight sharing of chunk
//     fetches between readers, prefetch and background fetch;
//   - readahead.go: which neighbouring chunks a cache miss suggests;
//   - speculate.go: fetching what no reader waits for yet, most likely
//     read first;
//   - fetch.go: fetching a group of chunks with one range request,
//     verifying and caching them;
//   - scheduler.go: prefetch, background fetch and the Scheduler that lets
//     foreground reads win over them;
//   - passthrough.go: backing files for FUSE passthrough;
//   - record.go: telling a Recorder what a workload reads.

package fs

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// Tuning defaults of the fetch engine, shared by the library, the CLI's
// flags and the daemon's configuration.
const (
	// DefaultFetchTimeout bounds one foreground fetch (LayerOptions.FetchTimeout).
	DefaultFetchTimeout = 60 * time.Second
	// DefaultReadAhead is LayerOptions.ReadAhead's default.
	DefaultReadAhead = 512 << 10
	// DefaultDirReadAhead is LayerOptions.DirReadAhead's default.
	DefaultDirReadAhead = 4 << 20
	// DefaultRangeSize is FetchOptions.RangeSize's default.
	DefaultRangeSize = 1 << 20
	// DefaultPrefetchParallel is FetchOptions.PrefetchParallel's default.
	DefaultPrefetchParallel = 3
)

// LayerOptions tune a Layer.
type LayerOptions struct {
	// FetchTimeout bounds one foreground fetch, retries included: a read
	// whose chunk cannot be fetched in time fails with EIO instead of
	// hanging (default 60s).
	FetchTimeout time.Duration
	// DirReadAhead is how many compressed bytes of the files of a missed
	// file's directory (those after it in the blob) are fetched alongside
	// it (default 4 MiB).
	DirReadAhead int64
	// ReadAhead is how many compressed bytes that follow a missed chunk in
	// the blob are fetched alongside it (default 512 KiB; negative
	// disables all read-ahead).
	ReadAhead int64
	// Scheduler arbitrates with other layers' background fetches, and
	// its Clock is the layer's. Nil means a private one with
	// DefaultMaxBackground and the system clock.
	Scheduler *Scheduler
	// Observer receives fetch and cache events. May be nil.
	Observer Observer
	// Budget, when set, is charged with the buffers of the groups being
	// fetched and decoded; fetches wait for it (see MemoryBudget).
	Budget *MemoryBudget
	// Recorder, when set, learns which files and chunks are read, in
	// order (to build prioritized images).
	Recorder Recorder
}

// Observer receives events for metrics.
type Observer interface {
	// Fetched reports one range request: compressed bytes, duration,
	// whether it was a background fetch, and its error.
	Fetched(layer digest.Digest, bytes int64, d time.Duration, background bool, err error)
	// CacheHit and CacheMiss report chunk lookups by reads.
	CacheHit(layer digest.Digest)
	CacheMiss(layer digest.Digest)
	// VerifyFailed reports a chunk that failed its digest.
	VerifyFailed(layer digest.Digest)
}

// Stats are a layer's counters.
type Stats struct {
	FetchedBytes    int64 // compressed bytes fetched from the blob
	Requests        int64 // range requests made
	CacheHits       int64 // chunk reads served from the store
	CacheMisses     int64 // chunk reads that had to fetch
	VerifyFailures  int64 // chunks that failed their digest
	FetchNanos      int64 // total time spent in range requests
	BackgroundBytes int64 // part of FetchedBytes fetched in the background
}

// Layer is one lazily fetched eStargz layer.
type Layer struct {
	digest digest.Digest
	index  *estargz.Index
	comp   estargz.Compression
	store  Store
	opts   LayerOptions
	dec    *estargz.Decoder
	sched  *Scheduler

	// The blob, opened at the first fetch (getBlob).
	openBlob OpenFunc
	blobMu   sync.Mutex
	blob     Blob

	chunks []estargz.Chunk // every distinct chunk, in blob order

	// Read-ahead (readahead.go).
	dirIndex   atomic.Pointer[dirIndex] // nil until built
	plainBytes int64                    // total size of the distinct chunks

	// In-flight sharing and foreground fetches (inflight.go, fetch.go).
	pmu     sync.Mutex
	pending map[digest.Digest]*inflight // chunks being fetched
	raBusy  atomic.Bool                 // a read-ahead fetch is in flight
	fgSlots chan struct{}               // bounds foreground fetches in flight

	timedOutMu sync.Mutex
	timedOut   map[digest.Digest]timedOutFetch // see timedOutMemo

	fetchedBytes, requests, hits, misses, verifyFailures, fetchNanos, bgBytes atomic.Int64

	// Recording (record.go) and passthrough assembly (passthrough.go).
	readSeen  sync.Map // *estargz.Node -> *atomic.Int64 bytes read (-1: recorded), when recording
	chunkSeen sync.Map // chunk digest -> struct{}, when recording
	pt        passthroughState

	failure atomic.Pointer[error] // set by Fail (fail.go): every read fails with it
	storing sync.RWMutex          // read-held while a fetched group is decoded and stored (fetch.go); Close waits

	// Prefetch and background fetch (scheduler.go), stopped by Close.
	bgMu     sync.Mutex // guards closed, bgCancel and bgDone
	closed   bool
	bgCancel context.CancelFunc
	bgDone   chan struct{}

	// Speculation (speculate.go); its workers are stopped by Close
	// through hintCancels and hintWG.
	spec        speculation
	hintCancels []context.CancelFunc // guarded by bgMu
	hintWG      sync.WaitGroup
}

// NewLayer returns a Layer for the blob with the given digest, whose index
// was read (and verified) already.
func NewLayer(dgst digest.Digest, index *estargz.Index, comp estargz.Compression, open OpenFunc, store Store, opts LayerOptions) *Layer {
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = DefaultFetchTimeout
	}
	if opts.ReadAhead == 0 {
		opts.ReadAhead = DefaultReadAhead
	}
	if opts.DirReadAhead == 0 {
		opts.DirReadAhead = DefaultDirReadAhead
	}
	sched := opts.Scheduler
	if sched == nil {
		sched = NewScheduler(DefaultMaxBackground)
	}
	l := &Layer{
		digest:   dgst,
		index:    index,
		comp:     comp,
		store:    store,
		opts:     opts,
		dec:      estargz.NewDecoder(),
		sched:    sched,
		openBlob: open,
		chunks:   index.Chunks(),
		pending:  map[digest.Digest]*inflight{},
		fgSlots:  make(chan struct{}, maxForegroundFetches),
	}
	for _, c := range l.chunks {
		l.plainBytes += c.Size
	}
	// The read-ahead index is built in the background: a large layer's
	// takes tens of milliseconds the mount need not wait for.
	go l.buildDirIndex()
	return l
}

// Digest returns the layer blob's digest.
func (l *Layer) Digest() digest.Digest { return l.digest }

// Index returns the layer's TOC index.
func (l *Layer) Index() *estargz.Index { return l.index }

// Compression returns how the layer's blob is compressed.
func (l *Layer) Compression() estargz.Compression { return l.comp }

// Stats returns a snapshot of the layer's counters.
func (l *Layer) Stats() Stats {
	return Stats{
		FetchedBytes:    l.fetchedBytes.Load(),
		Requests:        l.requests.Load(),
		CacheHits:       l.hits.Load(),
		CacheMisses:     l.misses.Load(),
		VerifyFailures:  l.verifyFailures.Load(),
		FetchNanos:      l.fetchNanos.Load(),
		BackgroundBytes: l.bgBytes.Load(),
	}
}

func (l *Layer) getBlob(ctx context.Context) (Blob, error) {
	l.blobMu.Lock()
	defer l.blobMu.Unlock()
	if l.blob != nil {
		return l.blob, nil
	}
	b, err := l.openBlob(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening blob %s: %w", l.digest, err)
	}
	l.blob = b
	return b, nil
}

// Close stops background work; StartFetching does nothing afterwards.
func (l *Layer) Close() error {
	l.bgMu.Lock()
	l.closed = true
	cancel, done := l.bgCancel, l.bgDone
	hints := l.hintCancels
	l.hintCancels = nil
	l.bgMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	for _, c := range hints {
		c()
	}
	l.hintWG.Wait()
	l.storing.Lock() // wait for groups being stored
	l.storing.Unlock()
	return nil
}

// Cached reports how many of the layer's chunks are in the store.
func (l *Layer) Cached() (cached, total int) {
	for _, c := range l.chunks {
		if l.store.Has(c.Digest) {
			cached++
		}
	}
	return cached, len(l.chunks)
}
