package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// Blob reads the compressed bytes of a layer blob.
type Blob interface {
	// ReadAt reads len(p) bytes at off, or fails.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// BlobOpener opens a layer's blob when it is first needed, so that a layer
// whose TOC and chunks are cached can be mounted without the registry.
type BlobOpener func(ctx context.Context) (Blob, error)

// Store is the verified chunk cache, content-addressed by chunk digest.
type Store interface {
	// Add stores verified plain bytes under their digest.
	Add(d digest.Digest, data []byte) error
	// ReadAt reads from a stored chunk; a miss is an error.
	ReadAt(d digest.Digest, p []byte, off int64) (int, error)
	// Has reports whether a chunk is stored.
	Has(d digest.Digest) bool
}

// PassthroughStore is a Store that keeps entries as files it can hand
// out, read-only, for FUSE passthrough.
type PassthroughStore interface {
	Store
	// OpenFile opens an entry's file, or fails on a miss.
	OpenFile(d digest.Digest) (*os.File, error)
	// AddFrom stores size bytes streamed from r under d, verifying them.
	AddFrom(d digest.Digest, size int64, r io.Reader) error
}

// maxSyncAssemble bounds the files that are assembled from their chunks
// while the open that wants them waits; larger ones are assembled in the
// background for the opens that follow.
const maxSyncAssemble = 64 << 20

// backingFile returns a file holding exactly n's content, for passthrough,
// or nil. A single-chunk file is its chunk's cache entry. A larger file is
// a cache entry of its own, keyed by the file's digest and assembled from
// its chunks once they are all cached (verified again as it is written).
func (l *Layer) backingFile(ctx context.Context, n *estargz.Node) *os.File {
	ps, ok := l.store.(PassthroughStore)
	if !ok || len(n.Chunks) == 0 {
		return nil
	}
	if len(n.Chunks) == 1 {
		if n.Chunks[0].Size != n.Size {
			return nil
		}
		f, err := ps.OpenFile(n.Chunks[0].Digest)
		if err != nil {
			return nil
		}
		return f
	}
	if n.Digest == "" {
		return nil
	}
	if f, err := ps.OpenFile(n.Digest); err == nil {
		return f
	}
	for _, c := range n.Chunks {
		if !l.store.Has(c.Digest) {
			return nil
		}
	}
	if _, busy := l.assembling.LoadOrStore(n.Digest, struct{}{}); busy {
		return nil
	}
	assemble := func() {
		defer l.assembling.Delete(n.Digest)
		if err := ps.AddFrom(n.Digest, n.Size, &chunkReader{l: l, n: n}); err != nil {
			log.G(ctx).WithError(err).WithField("file", n.Name).Debug("assembling a file for passthrough failed")
		}
	}
	if n.Size > maxSyncAssemble {
		go assemble()
		return nil
	}
	assemble()
	f, err := ps.OpenFile(n.Digest)
	if err != nil {
		return nil
	}
	return f
}

// chunkReader streams a file's content from the store.
type chunkReader struct {
	l   *Layer
	n   *estargz.Node
	i   int   // current chunk
	off int64 // offset in it
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for r.i < len(r.n.Chunks) {
		c := r.n.Chunks[r.i]
		if r.off >= c.Size {
			r.i, r.off = r.i+1, 0
			continue
		}
		want := min(int64(len(p)), c.Size-r.off)
		k, err := r.l.store.ReadAt(c.Digest, p[:want], r.off)
		r.off += int64(k)
		if k > 0 {
			return k, nil
		}
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	return 0, io.EOF
}

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
	// Scheduler arbitrates with other layers' background fetches. Nil
	// means a private one.
	Scheduler *Scheduler
	// Observer receives fetch and cache events. May be nil.
	Observer Observer
	// Recorder, when set, learns which files and chunks are read, in
	// order (to build prioritized images).
	Recorder Recorder
}

// Recorder learns what a workload reads from a layer.
type Recorder interface {
	// FirstRead is called once per file, when the file counts as read:
	// at its first read if it is small (RecordSmallFile), else once a
	// quarter of it has been read — a program that maps a large library
	// but touches a few pages of it should not make the whole library
	// part of the start-up set.
	FirstRead(layer digest.Digest, name string)
	// ChunkRead is called once per chunk, at its first read.
	ChunkRead(layer digest.Digest, c estargz.Chunk)
}

// maxForegroundFetches bounds a layer's foreground requests in flight.
const maxForegroundFetches = 8

// RecordSmallFile is the size up to which a file counts as read at its
// first read.
const RecordSmallFile = 1 << 20

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

	openBlob BlobOpener
	blobMu   sync.Mutex
	blob     Blob

	chunks []estargz.Chunk // every distinct chunk, in blob order

	dirIndex   atomic.Pointer[dirIndex] // nil until built
	plainBytes int64                    // total size of the distinct chunks

	pmu     sync.Mutex
	pending map[digest.Digest]*inflight // chunks being fetched
	raBusy  atomic.Bool                 // a read-ahead fetch is in flight
	fgSlots chan struct{}               // bounds foreground fetches in flight

	timedOutMu sync.Mutex
	timedOut   map[digest.Digest]timedOutFetch // see timedOutMemo

	fetchedBytes, requests, hits, misses, verifyFailures, fetchNanos, bgBytes atomic.Int64

	readSeen   sync.Map // *estargz.Node -> *atomic.Int64 bytes read (-1: recorded), when recording
	chunkSeen  sync.Map // chunk digest -> struct{}, when recording
	assembling sync.Map // file digest -> struct{}, while assembled for passthrough

	failure atomic.Pointer[error] // set by Fail: every read fails with it

	bgMu     sync.Mutex // guards closed, bgCancel and bgDone
	closed   bool
	bgCancel context.CancelFunc
	bgDone   chan struct{}
}

// NewLayer returns a Layer for the blob with the given digest, whose index
// was read (and verified) already.
func NewLayer(dgst digest.Digest, index *estargz.Index, comp estargz.Compression, open BlobOpener, store Store, opts LayerOptions) *Layer {
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = 60 * time.Second
	}
	if opts.ReadAhead == 0 {
		opts.ReadAhead = 512 << 10
	}
	if opts.DirReadAhead == 0 {
		opts.DirReadAhead = 4 << 20
	}
	sched := opts.Scheduler
	if sched == nil {
		sched = NewScheduler(2)
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

// ErrVerify is returned (wrapped) when fetched bytes fail verification.
var ErrVerify = errors.New("chunk failed verification")

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

// noteRead tells the Recorder that k more bytes of n were read.
func (l *Layer) noteRead(n *estargz.Node, k int64) {
	r := l.opts.Recorder
	if r == nil {
		return
	}
	v, _ := l.readSeen.LoadOrStore(n, new(atomic.Int64))
	got := v.(*atomic.Int64)
	if got.Load() < 0 {
		return // recorded already
	}
	sum := got.Add(k)
	if (n.Size <= RecordSmallFile || 4*sum >= n.Size) && got.CompareAndSwap(sum, -1) {
		r.FirstRead(l.digest, n.Name)
	}
}

// noteChunk tells the Recorder about the first read of chunk c.
func (l *Layer) noteChunk(c estargz.Chunk) {
	if r := l.opts.Recorder; r != nil {
		if _, seen := l.chunkSeen.LoadOrStore(c.Digest, struct{}{}); !seen {
			r.ChunkRead(l.digest, c)
		}
	}
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

// resolve ends the fetch of a claimed chunk.
func (l *Layer) resolve(c estargz.Chunk, data []byte, err error) {
	l.pmu.Lock()
	p := l.pending[c.Digest]
	delete(l.pending, c.Digest)
	l.pmu.Unlock()
	if p != nil {
		p.data, p.err = data, err
		close(p.done)
	}
}

// fetchChunk returns chunk c of file n, verified, fetching it (and the
// uncached chunks after it within the read-ahead window, in the same
// request) unless a fetch of it is in flight already — a read, a prefetch
// or a background fetch — in which case it waits for that one. The fetch
// runs under its own timeout, so one reader giving up does not fail the
// others waiting for the same chunk.
func (l *Layer) fetchChunk(ctx context.Context, n *estargz.Node, c estargz.Chunk) ([]byte, error) {
	l.timedOutMu.Lock()
	f, ok := l.timedOut[c.Digest]
	l.timedOutMu.Unlock()
	if ok && time.Since(f.at) < timedOutMemo {
		return nil, f.err
	}
	done := l.sched.foreground()
	defer done()
	for {
		l.pmu.Lock()
		p := l.pending[c.Digest]
		l.pmu.Unlock()
		if p == nil {
			// One read-ahead at a time per layer: a burst of misses (the
			// kernel's own read-ahead of a big file, parallel readers)
			// must not flood the link and memory with speculation.
			want := []estargz.Chunk{c}
			ra := l.raBusy.CompareAndSwap(false, true)
			if ra {
				want = l.readAheadGroup(c)
			}
			group := l.claim(want)
			fctx := context.WithoutCancel(ctx)
			if len(group) > 0 && group[0].Digest == c.Digest {
				// The reader waits for its own chunk only: the
				// read-ahead travels in a second request alongside.
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
			l.pmu.Lock()
			p = l.pending[c.Digest]
			l.pmu.Unlock()
			if p == nil {
				// Fetched by someone else between our looks: read it.
				data, err := l.storeGet(c)
				if err == nil {
					return data, nil
				}
				continue
			}
		}
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

// dirIndex maps chunks to the directories of their files.
type dirIndex struct {
	chunkDir  []string         // directory of each chunk's file
	dirChunks map[string][]int // indexes into chunks, per directory
}

func (l *Layer) buildDirIndex() {
	type key struct{ off, inner int64 }
	dirs := make(map[key]string, len(l.chunks))
	seen := make(map[*estargz.Node]bool)
	l.index.Walk(func(name string, n *estargz.Node) bool {
		if n.Type == estargz.TypeReg && !seen[n] {
			seen[n] = true
			for _, c := range n.Chunks {
				dirs[key{c.Offset, c.InnerOffset}] = path.Dir(name)
			}
		}
		return true
	})
	di := &dirIndex{chunkDir: make([]string, len(l.chunks)), dirChunks: make(map[string][]int)}
	for i, c := range l.chunks {
		d := dirs[key{c.Offset, c.InnerOffset}]
		di.chunkDir[i] = d
		di.dirChunks[d] = append(di.dirChunks[d], i)
	}
	l.dirIndex.Store(di)
}

// readAheadGroup returns c and the chunks to fetch alongside it: the
// uncached chunks of the files of c's directory that follow it (a program
// that reads one file of a directory — a module of a package, a library —
// tends to read its neighbours next), up to DirReadAhead compressed bytes,
// then the chunks that follow in the blob within ReadAhead.
func (l *Layer) readAheadGroup(c estargz.Chunk) []estargz.Chunk {
	group := []estargz.Chunk{c}
	if l.opts.ReadAhead <= 0 {
		return group
	}
	i := sort.Search(len(l.chunks), func(i int) bool { return l.chunks[i].Offset >= c.Offset })
	for i < len(l.chunks) && l.chunks[i].Digest != c.Digest {
		i++
	}
	if i == len(l.chunks) {
		return group
	}
	if di := l.dirIndex.Load(); di != nil { // nil: not built yet
		budget := l.opts.DirReadAhead
		for _, j := range di.dirChunks[di.chunkDir[i]] {
			next := l.chunks[j]
			if j <= i || l.store.Has(next.Digest) {
				continue
			}
			// The group is fetched as one range: a directory whose files
			// are far apart (subdirectories sort between them) must not
			// drag in everything between.
			if next.End-c.Offset > 2*l.opts.DirReadAhead {
				break
			}
			if budget -= next.End - next.Offset; budget < 0 {
				break
			}
			group = append(group, next)
		}
	}
	for j := i + 1; j < len(l.chunks); j++ {
		next := l.chunks[j]
		if next.End-c.End > l.opts.ReadAhead {
			break
		}
		group = append(group, next)
	}
	return group
}

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
		l.timedOut[primary] = timedOutFetch{at: time.Now(), err: err}
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
	start, end := group[0].Offset, group[0].End
	for _, g := range group {
		start, end = min(start, g.Offset), max(end, g.End)
	}
	buf, err := l.fetchRange(ctx, start, end, background)
	if err != nil {
		err = fmt.Errorf("layer %s: file %q: %w", l.digest, name, err)
		for _, g := range group {
			l.resolve(g, nil, err)
		}
		return err
	}
	for i, g := range group {
		data, err := l.dec.DecodeChunk(l.comp, buf[g.Offset-start:g.End-start], g, nil)
		if err != nil {
			fname := ""
			if i == 0 {
				fname = name
			}
			l.resolve(g, nil, l.verifyError(fname, g, err))
			continue
		}
		if err := l.store.Add(g.Digest, data); err != nil {
			log.G(ctx).WithError(err).WithField("layer", l.digest).Warn("caching chunk failed; serving it uncached")
		}
		l.resolve(g, data, nil)
	}
	return nil
}

func (l *Layer) verifyError(name string, c estargz.Chunk, err error) error {
	l.verifyFailures.Add(1)
	if o := l.opts.Observer; o != nil {
		o.VerifyFailed(l.digest)
	}
	log.L.WithError(err).WithFields(log.Fields{
		"layer": l.digest, "file": name, "offset": c.FileOffset, "blobOffset": c.Offset,
	}).Error("chunk failed verification; refusing to serve it")
	return fmt.Errorf("layer %s: file %q offset %d: %w: %w", l.digest, name, c.FileOffset, ErrVerify, err)
}

// fetchRange reads blob bytes [start, end).
func (l *Layer) fetchRange(ctx context.Context, start, end int64, background bool) ([]byte, error) {
	b, err := l.getBlob(ctx)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, end-start)
	t0 := time.Now()
	_, err = b.ReadAt(ctx, buf, start)
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

// Close stops background work; StartFetching does nothing afterwards.
func (l *Layer) Close() error {
	l.bgMu.Lock()
	l.closed = true
	cancel, done := l.bgCancel, l.bgDone
	l.bgMu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
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
