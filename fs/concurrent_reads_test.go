package fs_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
)

// peakLiveHeapBound is how much the live heap (measured after a
// collection, sampled every 50 ms) of the test process may grow while 2000
// goroutines read 2000 uncached files of one mount at once. The process is
// the FUSE server and also the registry, whose blob reads take a 4 MiB
// buffer each and dominate the figure (about 200 MiB measured, of which
// the layer's own fetch buffers, cache copies and FUSE request buffers
// are about 20 MiB in a heap profile): what the bound catches is growth
// with the number of readers (a buffer per waiting reader would be
// gigabytes); it leaves room for the registry's share, which swings with
// load (one CI run under load exceeded 320 MiB). The kernel sends buffered reads as readahead, at most
// max_background (12) at a time, so FUSE request buffers stay few; the
// layer runs at most 8 foreground fetches. RSS is logged, not asserted:
// it follows the registry's garbage.
const peakLiveHeapBound = 640 << 20

// 2000 goroutines each read a different uncached file of a mounted layer
// through FUSE at once: every read returns its file's bytes, nothing
// crashes, and memory stays bounded — the layer's foreground fetches are
// bounded (and so their buffers), whatever the number of readers.
func TestManyConcurrentUncachedReads(t *testing.T) {
	const files, size = 2000, 8 << 10
	entries := []fixture.Entry{fixture.Dir("d/", 0o755)}
	for i := range files {
		entries = append(entries, fixture.Reg(fmt.Sprintf("d/%04d", i), 0o644, fixture.Random(int64(1000+i), size)))
	}
	fx := newFixture(t, entries)
	// The reads queue for the layer's 8 foreground fetch slots; under the
	// race detector on a small machine the last waits longer than the
	// default fetch timeout: this test is about memory, not speed.
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{ReadAhead: -1, FetchTimeout: 10 * time.Minute}}})
	dir, m := e.mount(t, e.push(t, "many", oursGzip.build(t, fx.tar, 64<<10, nil)))

	runtime.GC()
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	rss0 := vmHWM(t)
	var peakHeap atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var ms runtime.MemStats
		for {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > peakHeap.Load() {
				peakHeap.Store(ms.HeapAlloc)
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()

	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make([]error, files)
	for i := range files {
		wg.Go(func() {
			<-start
			p := fmt.Sprintf("d/%04d", i)
			got, err := os.ReadFile(filepath.Join(dir, p))
			if err == nil && !bytes.Equal(got, fx.want[p].Data) {
				err = fmt.Errorf("%s: wrong bytes", p)
			}
			errs[i] = err
		})
	}
	close(start)
	wg.Wait()
	close(stop)
	<-sampled
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	rss := vmHWM(t)
	st := m.Layer().Stats()
	growth := int64(peakHeap.Load()) - int64(ms0.HeapAlloc)
	t.Logf("%d concurrent reads: peak live heap %d MiB, %d MiB over the %d MiB before; peak RSS %d MiB (before %d MiB); %d range requests, %d chunk misses",
		files, peakHeap.Load()>>20, growth>>20, ms0.HeapAlloc>>20, rss>>20, rss0>>20, st.Requests, st.CacheMisses)
	if growth > peakLiveHeapBound {
		t.Errorf("live heap grew by %d MiB, more than the %d MiB bound", growth>>20, peakLiveHeapBound>>20)
	}
}

// vmHWM is the process's peak resident set size, in bytes.
func vmHWM(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc/self/status")
	return 0
}
