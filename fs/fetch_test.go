package fs_test

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lazypull/lazypull/estargz"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

const fetchChunk = 16 << 10

// fetchLayer has start-up files (fetchPrioritized) among others.
func fetchLayer() []fixture.Entry {
	e := []fixture.Entry{
		fixture.Dir("app/", 0o755), fixture.Dir("app/lib/", 0o755), fixture.Dir("etc/", 0o755), fixture.Dir("rest/", 0o755),
		fixture.Reg("app/start", 0o755, fixture.Random(50, 60000)),
		fixture.Reg("app/lib/big", 0o644, fixture.Random(51, 5*fetchChunk+3)),
		fixture.Reg("app/other", 0o644, fixture.Random(52, 300000)),
		fixture.Reg("etc/conf", 0o644, fixture.Text(53, 500)),
		fixture.Hardlink("app/lib/big.1", "app/lib/big"),
	}
	for i := range 40 {
		e = append(e, fixture.Reg(fmt.Sprintf("rest/%02d", i), 0o644, fixture.Random(int64(60+i), 20000)))
	}
	return e
}

var fetchPrioritized = []string{"app/start", "app/lib/big.1", "etc/conf"}

// With Prefetch, the prioritized files' chunks are cached by the time
// WaitFetching returns, before anything is read, and reading them makes no
// request; the rest is left alone.
func TestPrefetch(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	for _, conv := range []converter{oursGzip, upstreamZstd} {
		t.Run(conv.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOptions{reg: reg, manager: lfs.ManagerOptions{
				Fetch: lfs.FetchOptions{Prefetch: true},
				Layer: lfs.LayerOptions{ReadAhead: -1},
			}})
			fx := newFixture(t, fetchLayer())
			src := e.push(t, "prefetch-"+conv.name, conv.build(t, fx.tar, fetchChunk, fetchPrioritized))
			dir, m := e.mount(t, src)
			l := m.Layer()
			l.WaitFetching()
			if l.Index().PrefetchEnd <= 0 {
				t.Fatalf("PrefetchEnd %d", l.Index().PrefetchEnd)
			}
			for _, p := range append(fetchPrioritized, "app/lib/big") {
				for _, d := range chunkDigests(t, l, p) {
					if !e.store.Has(d) {
						t.Errorf("%s: chunk %s not prefetched", p, d)
					}
				}
			}
			for _, p := range []string{"app/other", "rest/39"} {
				for _, d := range chunkDigests(t, l, p) {
					if e.store.Has(d) {
						t.Errorf("%s: chunk %s fetched, but it is not prioritized", p, d)
					}
				}
			}
			st := l.Stats()
			if st.Requests == 0 || st.Requests > 2 || st.BackgroundBytes != 0 || st.CacheMisses != 0 {
				t.Errorf("after prefetch: %+v, want 1 or 2 requests, no background bytes, no misses", st)
			}
			before := rangeGETs(e.reg, src.Digest)
			for _, p := range append(fetchPrioritized, "app/lib/big") {
				mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
			}
			if n := rangeGETs(e.reg, src.Digest) - before; n != 0 {
				t.Errorf("reading prefetched files made %d requests", n)
			}
			if st2 := l.Stats(); st2.CacheMisses != 0 || st2.CacheHits == 0 {
				t.Errorf("reading prefetched files: %+v", st2)
			}
			mustRead(t, filepath.Join(dir, "app/other"), fx.want["app/other"].Data)
		})
	}
}

// With Background, everything is cached eventually, in background
// requests; foreground reads go first meanwhile and return the right
// bytes while the background fetch is still going.
func TestBackgroundFetch(t *testing.T) {
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{
		Fetch: lfs.FetchOptions{Prefetch: true, Background: true, RangeSize: 32 << 10},
		Layer: lfs.LayerOptions{ReadAhead: -1},
	}})
	fx := newFixture(t, fetchLayer())
	src := e.push(t, "background", oursGzip.build(t, fx.tar, fetchChunk, fetchPrioritized))
	// About 40 background requests of 50ms each.
	e.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Delay: 50 * time.Millisecond})
	dir, m := e.mount(t, src)
	l := m.Layer()
	for _, p := range []string{"rest/39", "app/other", "rest/20"} {
		mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
		if cached, total := l.Cached(); cached == total {
			t.Fatalf("background fetch finished before the foreground reads (%d chunks)", total)
		}
	}
	l.WaitFetching()
	if cached, total := l.Cached(); cached != total {
		t.Fatalf("after the background fetch: %d of %d chunks cached", cached, total)
	}
	st := l.Stats()
	if st.BackgroundBytes == 0 || st.BackgroundBytes >= st.FetchedBytes || st.VerifyFailures != 0 {
		t.Errorf("stats %+v", st)
	}
	before := rangeGETs(e.reg, src.Digest)
	compareTree(t, dir, fx.want, &fixture.DiffOptions{AllowExtra: fixture.Landmarks})
	if n := rangeGETs(e.reg, src.Digest) - before; n != 0 {
		t.Errorf("reading everything after the background fetch made %d requests", n)
	}
	if st2 := l.Stats(); st2.CacheMisses != st.CacheMisses {
		t.Errorf("reads after the background fetch missed: %+v", st2)
	}
}

// A chunk failing verification during the background fetch is counted and
// left for readers to fetch again; the background fetch goes on with the
// rest.
func TestBackgroundFetchSkipsBadChunk(t *testing.T) {
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{
		Fetch: lfs.FetchOptions{Background: true, RangeSize: 64 << 10},
	}})
	fx := newFixture(t, fetchLayer())
	b := oursGzip.build(t, fx.tar, fetchChunk, nil)
	r, err := estargz.Open(bytes.NewReader(b.data), int64(len(b.data)), estargz.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Corrupt the first background request (it starts at the first chunk).
	first := fmt.Sprintf("bytes=%d-", r.Chunks()[0].Offset)
	e.reg.Inject(remotetest.Fault{Times: 1, Corrupt: true, Match: func(q remotetest.Request) bool {
		return remotetest.RangeGETs(q) && strings.HasPrefix(q.Range, first)
	}})
	dir, m := e.mount(t, e.push(t, "bad-background", b))
	l := m.Layer()
	l.WaitFetching()
	if cached, total := l.Cached(); cached != total-1 {
		t.Errorf("after the background fetch: %d of %d chunks cached, want all but the corrupted one", cached, total)
	}
	if st := l.Stats(); st.VerifyFailures != 1 {
		t.Errorf("stats %+v, want 1 verify failure", st)
	}
	compareTree(t, dir, fx.want, &fixture.DiffOptions{AllowExtra: fixture.Landmarks})
	if cached, total := l.Cached(); cached != total {
		t.Errorf("after reading everything: %d of %d chunks cached", cached, total)
	}
}

// Close stops background work and makes a later (or concurrent)
// StartFetching do nothing.
func TestCloseStopsFetching(t *testing.T) {
	e := newEnv(t, envOptions{})
	fx := newFixture(t, fetchLayer())
	src := e.push(t, "close", oursGzip.build(t, fx.tar, fetchChunk, nil))
	ctx := context.Background()
	bg := lfs.FetchOptions{Prefetch: true, Background: true}

	l, err := e.mgr.OpenLayer(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	before := rangeGETs(e.reg, src.Digest)
	l.StartFetching(ctx, bg)
	l.WaitFetching()
	if n := rangeGETs(e.reg, src.Digest) - before; n != 0 {
		t.Errorf("StartFetching after Close made %d requests", n)
	}

	for range 20 {
		l, err := e.mgr.OpenLayer(ctx, src)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Go(func() { l.StartFetching(ctx, bg) })
		wg.Go(func() { l.Close() })
		wg.Wait()
		l.Close()
		done := make(chan struct{})
		go func() { l.WaitFetching(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("background fetching goes on after Close")
		}
	}
}
