package fs

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
)

// specLayer is a layer of n one-chunk files d/f0..d/fn-1 (adjacent in the
// blob) with a recording blob, a memory store and the given scheduler.
type specLayer struct {
	*Layer
	rb    *recordingBlob
	files []estargz.Chunk // chunk of d/fi
}

func newSpecLayer(t *testing.T, n int, sched *Scheduler, opts LayerOptions) *specLayer {
	t.Helper()
	blob, r := buildLayer(t, randomFiles(t, "d", n, 5000), 64<<10)
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	rb := &recordingBlob{r: bytes.NewReader(blob)}
	opts.Scheduler = sched
	l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return rb, nil }, store, opts)
	t.Cleanup(func() { l.Close() })
	sl := &specLayer{Layer: l, rb: rb}
	for i := range n {
		nd, ok := r.Index.Lookup(fmt.Sprintf("d/f%03d", i))
		if !ok || len(nd.Chunks) != 1 {
			t.Fatalf("d/f%03d: %v, %d chunks", i, ok, len(nd.Chunks))
		}
		sl.files = append(sl.files, nd.Chunks[0])
	}
	return sl
}

// order maps the layer's requests to file numbers (one chunk each).
func (sl *specLayer) order(t *testing.T) []int {
	t.Helper()
	var out []int
	for _, q := range sl.rb.requests() {
		i := slices.IndexFunc(sl.files, func(c estargz.Chunk) bool { return c.Offset == q[0] })
		if i < 0 || q[1] != sl.files[i].End-sl.files[i].Offset {
			t.Fatalf("request %v is not one file's chunk", q)
		}
		out = append(out, i)
	}
	return out
}

func (sl *specLayer) run(cs ...int) *specRun {
	r := &specRun{ctx: context.Background()}
	for _, i := range cs {
		r.cs = append(r.cs, sl.files[i])
	}
	return r
}

// Speculative work goes newest miss neighbourhood first, then older ones,
// then the rest of the blob in blob order, skipping what was fetched.
// One-byte requests make each chunk a request of its own; the idle
// scheduler's single slot makes them one at a time.
func TestSpeculationOrderSpeculative(t *testing.T) {
	sl := newSpecLayer(t, 8, NewScheduler(1, WithClock(newFakeClock())), LayerOptions{})
	s := &sl.spec
	s.mu.Lock()
	s.rangeSize = 1
	s.near = []*specRun{sl.run(5, 6), sl.run(1)} // run(1) is the newest
	s.rest = sl.run(0, 1, 2, 3, 4, 5, 6, 7)
	s.mu.Unlock()
	sl.wakeSpeculation()
	sl.waitSpeculation(context.Background(), func(s *speculation) bool { return !s.speculativeOn })
	if got, want := sl.order(t), []int{1, 5, 6, 0, 2, 3, 4, 7}; !slices.Equal(got, want) {
		t.Fatalf("requests for files %v, want %v", got, want)
	}
	if st := sl.Stats(); st.BackgroundBytes != st.FetchedBytes {
		t.Errorf("speculative fetches counted as foreground: %+v", st)
	}
}

// Expected work goes hints first (in the order given), then the
// prioritized region; it counts as foreground.
func TestSpeculationOrderExpected(t *testing.T) {
	clk := newFakeClock()
	sched := NewScheduler(1, WithClock(clk))
	sl := newSpecLayer(t, 8, sched, LayerOptions{})
	s := &sl.spec
	s.mu.Lock()
	s.rangeSize, s.parallel = 1, 1
	s.hintWindow = 1 // every hinted chunk its own window: the order given
	s.prefetch = sl.run(0, 1, 2, 3)
	s.mu.Unlock()
	sl.Hint(context.Background(), []int64{sl.files[6].Offset, sl.files[2].Offset})
	sl.waitSpeculation(context.Background(), func(s *speculation) bool { return !s.expectedOn })
	if got, want := sl.order(t), []int{6, 2, 0, 1, 3}; !slices.Equal(got, want) {
		t.Fatalf("requests for files %v, want %v", got, want)
	}
	if st := sl.Stats(); st.BackgroundBytes != 0 {
		t.Errorf("expected fetches counted as background: %+v", st)
	}
}

// A request covers adjacent chunks of a run up to the size, and skips
// what is cached or in flight without fetching across it.
func TestTakeRun(t *testing.T) {
	sl := newSpecLayer(t, 8, NewScheduler(1, WithClock(newFakeClock())), LayerOptions{})
	f := sl.files
	// f3 in flight (claimed by someone else).
	if g := sl.claim([]estargz.Chunk{f[3]}); len(g) != 1 {
		t.Fatal("claiming f3 failed")
	}
	r := sl.run(0, 1, 2, 3, 4, 6, 7)
	two := f[1].End - f[0].Offset
	var got [][]estargz.Chunk
	for g := sl.takeRun(r, two); g != nil; g = sl.takeRun(r, two) {
		got = append(got, g)
	}
	want := [][]estargz.Chunk{{f[0], f[1]}, {f[2]}, {f[4]}, {f[6], f[7]}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("requests\n%v\nwant (f0+f1, f2 alone before the claimed f3, f4 alone before the gap, f6+f7)\n%v", got, want)
	}
	for _, g := range got {
		for _, c := range g {
			sl.resolve(c, nil, nil)
		}
	}
	sl.resolve(f[3], nil, nil)
}

// A miss's request is its chunk alone; the chunks after it (ReadAhead)
// and its directory's next files (DirReadAhead) are fetched
// speculatively, beside the read, in busy-lane requests.
func TestMissQueuesNeighbourhood(t *testing.T) {
	clk := newFakeClock()
	sched := NewScheduler(2, WithClock(clk), WithBusyBackground(12000))
	sl := newSpecLayer(t, 10, sched, LayerOptions{ReadAhead: 3 * 5200, DirReadAhead: 4 * 5200})
	sl.buildDirIndex()
	n, _ := sl.index.Lookup("d/f002")
	buf := make([]byte, 100)
	if _, err := sl.ReadAt(context.Background(), n, buf, 0); err != nil {
		t.Fatal(err)
	}
	sl.hintWG.Wait() // the speculative worker ends when its queue is empty
	f2 := [2]int64{sl.files[2].Offset, sl.files[2].End - sl.files[2].Offset}
	reqs := sl.rb.requests()
	if !slices.Contains(reqs, f2) {
		t.Fatalf("requests %v, none for f2's chunk alone %v", reqs, f2)
	}
	for _, q := range reqs {
		if q == f2 {
			continue
		}
		if q[0] < f2[0]+f2[1] && q[0]+q[1] > f2[0] {
			t.Errorf("request %v overlaps the read's chunk %v", q, f2)
		}
		if q[1] > 12000 {
			t.Errorf("speculative request of %d bytes beside a read, lane 12000", q[1])
		}
	}
	var cached []int
	for i, c := range sl.files {
		if sl.store.Has(c.Digest) {
			cached = append(cached, i)
		}
	}
	// Up to ReadAhead after f2 (f3, f4, f5), then the directory's next
	// files within DirReadAhead (f6..f9: 4 chunks).
	if want := []int{2, 3, 4, 5, 6, 7, 8, 9}; !slices.Equal(cached, want) {
		t.Errorf("cached files %v, want %v", cached, want)
	}
	if st := sl.Stats(); st.BackgroundBytes == 0 || st.FetchedBytes-st.BackgroundBytes != sl.files[2].End-sl.files[2].Offset {
		t.Errorf("foreground bytes %d (want f2's %d), background %d",
			st.FetchedBytes-st.BackgroundBytes, sl.files[2].End-sl.files[2].Offset, st.BackgroundBytes)
	}
}

// gateBlob holds every request until the test releases it, and counts
// the requests in flight.
type gateBlob struct {
	recordingBlob
	release  chan struct{}
	mu       sync.Mutex
	inflight int
	arrived  chan *gateBlob
}

func (b *gateBlob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	b.mu.Lock()
	b.inflight++
	b.mu.Unlock()
	b.arrived <- b
	<-b.release
	b.mu.Lock()
	b.inflight--
	b.mu.Unlock()
	return b.recordingBlob.ReadAt(ctx, p, off)
}

// While a read is fetching, speculation has the busy lane's depth of
// requests in flight (2 by default), never more, even with more
// background slots and several layers wanting them; the next goes as soon
// as one ends, without waiting for the read.
func TestSpeculationBusyLaneBesideReads(t *testing.T) {
	clk := newFakeClock()
	sched := NewScheduler(3, WithClock(clk))
	var layers []*specLayer
	arrived := make(chan *gateBlob, 64)
	var gates []*gateBlob
	for range 2 {
		sl := newSpecLayer(t, 6, sched, LayerOptions{})
		g := &gateBlob{recordingBlob: recordingBlob{r: sl.rb.r}, release: make(chan struct{}), arrived: arrived}
		sl.openBlob = func(context.Context) (Blob, error) { return g, nil }
		layers, gates = append(layers, sl), append(gates, g)
	}
	inflight := func() int {
		n := 0
		for _, g := range gates {
			g.mu.Lock()
			n += g.inflight
			g.mu.Unlock()
		}
		return n
	}
	done := sched.foreground() // a reader is fetching the whole time
	for _, sl := range layers {
		sl.spec.mu.Lock()
		sl.spec.rangeSize = 1 // a request per chunk
		sl.spec.rest = sl.run(0, 1, 2, 3, 4, 5)
		sl.spec.mu.Unlock()
		sl.wakeSpeculation()
	}
	var held []*gateBlob
	for total := 0; total < 12; {
		// Requests arrive until the lane's depth is in flight...
		for len(held) < DefaultBusyDepth && total+len(held) < 12 {
			select {
			case g := <-arrived:
				held = append(held, g)
			case <-time.After(watchdog):
				t.Fatalf("%d speculative requests in flight beside a read, want %d (after %d)", len(held), DefaultBusyDepth, total)
			}
			if n := inflight(); n > DefaultBusyDepth {
				t.Fatalf("%d speculative requests in flight beside a read, lane depth %d", n, DefaultBusyDepth)
			}
		}
		// ...and the next only after one ends.
		held[0].release <- struct{}{}
		held = held[1:]
		total++
	}
	for _, sl := range layers {
		sl.hintWG.Wait()
		for i, c := range sl.files {
			if !sl.store.Has(c.Digest) {
				t.Errorf("d/f%03d not cached", i)
			}
		}
	}
	done()
}

// Chunks someone waits for are decoded first; the others in group order.
func TestDecodeOrder(t *testing.T) {
	e := []*inflight{{}, {}, nil, {}, {}}
	e[3].waiters.Add(1)
	next := decodeOrder(e)
	var got []int
	for i := next(); i >= 0; i = next() {
		got = append(got, i)
		if i == 0 {
			e[4].waiters.Add(1) // a reader arrives while the group is decoded
		}
	}
	if want := []int{3, 0, 4, 1, 2}; !slices.Equal(got, want) {
		t.Fatalf("decode order %v, want %v", got, want)
	}
}

// The busy lane is on by default, at DefaultBusyBytes.
func TestSchedulerBusyLaneOnByDefault(t *testing.T) {
	s := NewScheduler(1, WithClock(newFakeClock()))
	done := s.foreground()
	defer done()
	release, limit, err := s.backgroundSlot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if limit != DefaultBusyBytes {
		t.Fatalf("slot beside a read limited to %d bytes, want DefaultBusyBytes", limit)
	}
}

// A request waiting for the taken lane gets it as soon as it is released,
// while the read is still fetching.
func TestSchedulerBusyLaneHandedOn(t *testing.T) {
	s := NewScheduler(1, WithClock(newFakeClock()), WithBusyBackground(64<<10))
	done := s.foreground()
	defer done()
	first, _, err := s.backgroundSlot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan int64, 1)
	go func() {
		release, limit, err := s.backgroundSlot(context.Background())
		if err != nil {
			ch <- -1
			return
		}
		release()
		ch <- limit
	}()
	select {
	case <-ch:
		t.Fatal("second lane request granted while the lane was taken")
	default:
	}
	first()
	select {
	case limit := <-ch:
		if limit != 64<<10 {
			t.Fatalf("handed-on slot limit %d", limit)
		}
	case <-time.After(watchdog):
		t.Fatal("the lane was not handed on while the read was fetching")
	}
}
