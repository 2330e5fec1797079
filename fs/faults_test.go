package fs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

const faultFetchTimeout = 3 * time.Second

// faultLayer has files each fetched by a request of its own (read-ahead is
// off in faultEnv).
func faultLayer() []fixture.Entry {
	e := []fixture.Entry{fixture.Dir("f/", 0o755)}
	for i := range 8 {
		e = append(e, fixture.Reg(fmt.Sprintf("f/%d", i), 0o644, fixture.Random(int64(30+i), 40000)))
	}
	return e
}

type faultEnv struct {
	*env
	dir string
	m   *lfs.Mount
	fx  layerFixture
}

// newFaultEnv mounts faultLayer from a registry of its own, with fast
// retries, a short FetchTimeout and no read-ahead.
func newFaultEnv(t *testing.T, beforeMount func(*remotetest.Registry)) *faultEnv {
	t.Helper()
	e := newEnv(t, envOptions{
		client: func(o *remote.Options) { o.RequestTimeout = 2 * time.Second },
		manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{
			FetchTimeout: faultFetchTimeout, ReadAhead: -1,
		}},
	})
	if beforeMount != nil {
		beforeMount(e.reg)
	}
	fx := newFixture(t, faultLayer())
	dir, m := e.mount(t, e.push(t, "faults", oursGzip.build(t, fx.tar, 16<<10, nil)))
	return &faultEnv{env: e, dir: dir, m: m, fx: fx}
}

func (f *faultEnv) read(t *testing.T, i int) {
	t.Helper()
	p := fmt.Sprintf("f/%d", i)
	mustRead(t, filepath.Join(f.dir, p), f.fx.want[p].Data)
}

func (f *faultEnv) faulted() int {
	return f.reg.Count(func(q remotetest.Request) bool { return q.Faulted })
}

// Transient registry trouble is retried away: reads return the right
// bytes.
func TestRegistryFaults(t *testing.T) {
	cases := []struct {
		name    string
		fault   remotetest.Fault
		faulted int           // requests faulted by the first read (3 chunks)
		minTime time.Duration // the read takes at least this long
	}{
		{"5xx burst", remotetest.Fault{Status: 503, Times: 3}, 3, 0},
		{"500 then 502", remotetest.Fault{Status: 500, Times: 1}, 1, 0},
		{"429 with Retry-After", remotetest.Fault{Status: 429, RetryAfter: "1", Times: 1}, 1, 900 * time.Millisecond},
		{"slow", remotetest.Fault{Delay: 200 * time.Millisecond, BytesPerSecond: 400 << 10}, 3, 600 * time.Millisecond},
		{"truncated", remotetest.Fault{CutAfter: 1000, Times: 2}, 2, 0},
		{"dropped", remotetest.Fault{Drop: true, Times: 2}, 2, 0},
		{"multipart", remotetest.Fault{Multipart: true}, 3, 0},
		// The whole (small) blob comes back once and serves every range.
		{"range ignored", remotetest.Fault{IgnoreRange: true}, 1, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newFaultEnv(t, nil)
			c.fault.Match = remotetest.RangeGETs
			f.reg.Inject(c.fault)
			t0 := time.Now()
			f.read(t, 0)
			if d := time.Since(t0); d < c.minTime {
				t.Errorf("read took %v, want >= %v", d, c.minTime)
			}
			if n := f.faulted(); n != c.faulted {
				t.Errorf("%d requests faulted, want %d", n, c.faulted)
			}
			f.read(t, 5)
			if st := f.m.Layer().Stats(); st.VerifyFailures != 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// A registry that hangs, or disappears in the middle of a read, fails
// uncached reads with EIO within the FetchTimeout instead of hanging them;
// cached files keep reading; once the registry is back, reads work again.
func TestRegistryGone(t *testing.T) {
	t.Run("hangs", func(t *testing.T) {
		t.Parallel()
		f := newFaultEnv(t, nil)
		f.read(t, 0)
		f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Delay: time.Minute})
		// One FetchTimeout, not two: the kernel's immediate retry of the
		// failed readahead page fails at once.
		f.wantTimelyEIO(t, 1)
		f.read(t, 0)
		f.reg.ClearFaults()
		t0 := time.Now()
		wantEIO(t, filepath.Join(f.dir, "f/1"), f.fx.want["f/1"].Data)
		if d := time.Since(t0); d > time.Second {
			t.Errorf("retrying a chunk that just timed out took %v", d)
		}
		time.Sleep(time.Second)
		f.read(t, 1)
	})
	t.Run("stopped mid-read", func(t *testing.T) {
		t.Parallel()
		f := newFaultEnv(t, nil)
		f.read(t, 0)
		arrived := make(chan struct{}, 64)
		f.reg.Inject(remotetest.Fault{Delay: time.Minute, Match: func(q remotetest.Request) bool {
			if !remotetest.RangeGETs(q) {
				return false
			}
			select {
			case arrived <- struct{}{}:
			default:
			}
			return true
		}})
		done := make(chan error, 1)
		t0 := time.Now()
		go func() {
			_, err := os.ReadFile(filepath.Join(f.dir, "f/2"))
			done <- err
		}()
		select {
		case <-arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("the read never reached the registry")
		}
		f.reg.Stop()
		select {
		case err := <-done:
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("read while the registry went away: %v, want EIO", err)
			}
			if d := time.Since(t0); d > faultFetchTimeout+5*time.Second {
				t.Errorf("read failed after %v, want < FetchTimeout + 5s", d)
			}
		case <-time.After(faultFetchTimeout + 10*time.Second):
			t.Fatal("read hangs after the registry went away")
		}
		f.wantTimelyEIO(t, 3)
		f.read(t, 0)
		f.reg.ClearFaults()
		f.reg.Start(t)
		f.read(t, 2)
	})
}

// wantTimelyEIO reads file i, which must fail with EIO within the fetch
// timeout (with generous slack).
func (f *faultEnv) wantTimelyEIO(t *testing.T, i int) {
	t.Helper()
	t0 := time.Now()
	wantEIO(t, filepath.Join(f.dir, fmt.Sprintf("f/%d", i)), f.fx.want[fmt.Sprintf("f/%d", i)].Data)
	// Generous, but less than two FetchTimeouts.
	if d := time.Since(t0); d > faultFetchTimeout+2500*time.Millisecond {
		t.Errorf("failing read took %v, want < FetchTimeout + 2.5s", d)
	}
}

// When the registry redirects blob reads to object storage, an expired
// signed URL is noticed and the registry asked for a new one.
func TestExpiredRedirect(t *testing.T) {
	var store *remotetest.ObjectStore
	f := newFaultEnv(t, func(reg *remotetest.Registry) { store = reg.RedirectBlobs(t, time.Hour) })
	f.read(t, 0)
	objectGETs := func(status int) int {
		return f.reg.Count(func(q remotetest.Request) bool {
			return remotetest.ObjectStoreGETs(q) && (status == 0 || q.Status == status)
		})
	}
	if objectGETs(0) == 0 {
		t.Fatal("reads were not redirected to the object store")
	}
	registryGETs := func() int { return f.reg.Count(remotetest.BlobGETs) }
	before := registryGETs()
	store.ExpireAll()
	f.read(t, 1)
	if objectGETs(403) == 0 {
		t.Error("the expired URL was not tried")
	}
	if registryGETs() == before {
		t.Error("the registry was not asked for a new URL")
	}
	f.read(t, 2)
}

// Many goroutines reading the same and different files through the mount
// all get the right bytes.
func TestConcurrentReaders(t *testing.T) {
	e := newEnv(t, envOptions{})
	fx := newFixture(t, fixture.RichLayer(4096))
	dir, m := e.mount(t, e.push(t, "concurrent", oursZstd.build(t, fx.tar, 4096, nil)))
	files := fx.want.Files()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 24 {
		wg.Go(func() {
			for i := range 40 {
				// Half the readers hammer the big files, the rest spread out.
				p := files[(g*7+i*13)%len(files)]
				if g%2 == 0 {
					p = []string{fixture.RichLarge, fixture.RichText, fixture.RichMulti}[(g+i)%3]
				}
				want := fx.want[p].Data
				f, err := os.OpenFile(filepath.Join(dir, p), os.O_RDONLY|syscall.O_DIRECT, 0)
				if err != nil {
					errs <- err
					return
				}
				off := int64(0)
				if len(want) > 0 {
					off = int64((g*4099 + i*65537) % len(want))
				}
				buf := make([]byte, 3*4096+11)
				n, err := f.ReadAt(buf, off)
				f.Close()
				if n < len(buf) && (err == nil || int64(n) != int64(len(want))-off) || !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
					errs <- fmt.Errorf("%s: pread(%d) = %d, %v: wrong", p, off, n, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	compareTree(t, dir, fx.want, &fixture.DiffOptions{AllowExtra: fixture.Landmarks})
	if st := m.Layer().Stats(); st.VerifyFailures != 0 {
		t.Errorf("stats %+v", st)
	}
}

// Concurrent misses of one chunk share one fetch: through the Layer and
// through the mount.
func TestConcurrentMissesShareFetch(t *testing.T) {
	const readers = 16
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{ReadAhead: -1}}})
	chunk := 64 << 10
	fx := newFixture(t, []fixture.Entry{
		fixture.Reg("one", 0o644, fixture.Random(40, 4*chunk)),
		fixture.Reg("two", 0o644, fixture.Random(41, 4*chunk)),
	})
	src := e.push(t, "shared", oursGzip.build(t, fx.tar, chunk, nil))
	ctx := context.Background()
	// Slow responses so that every reader misses before the first fetch
	// completes.
	e.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Delay: 300 * time.Millisecond})

	t.Run("layer", func(t *testing.T) {
		l, err := e.mgr.OpenLayer(ctx, src)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		n, _ := l.Index().Lookup("one")
		want := fx.want["one"].Data
		before := rangeGETs(e.reg, src.Digest)
		var wg sync.WaitGroup
		for i := range readers {
			wg.Go(func() {
				off := int64(chunk + i*1000)
				buf := make([]byte, 1000)
				if k, err := l.ReadAt(ctx, n, buf, off); err != nil || k != len(buf) || !bytes.Equal(buf, want[off:off+1000]) {
					t.Errorf("ReadAt(%d) = %d, %v", off, k, err)
				}
			})
		}
		wg.Wait()
		if got := rangeGETs(e.reg, src.Digest) - before; got != 1 {
			t.Errorf("%d range requests for one chunk, want 1", got)
		}
		if st := l.Stats(); st.Requests != 1 || st.CacheMisses != readers {
			t.Errorf("stats %+v, want 1 request and %d misses", st, readers)
		}
	})

	t.Run("mount", func(t *testing.T) {
		dir, m := e.mount(t, src)
		want := fx.want["two"].Data
		before := rangeGETs(e.reg, src.Digest)
		var wg sync.WaitGroup
		for i := range readers {
			wg.Go(func() {
				f, err := os.OpenFile(filepath.Join(dir, "two"), os.O_RDONLY|syscall.O_DIRECT, 0)
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				off := int64(2*chunk + i*4096)
				buf := make([]byte, 4096)
				if k, err := f.ReadAt(buf, off); err != nil || !bytes.Equal(buf, want[off:off+4096]) {
					t.Errorf("pread(%d) = %d, %v", off, k, err)
				}
			})
		}
		wg.Wait()
		if got := rangeGETs(e.reg, src.Digest) - before; got != 1 {
			t.Errorf("%d range requests for one chunk, want 1", got)
		}
		if st := m.Layer().Stats(); st.Requests != 1 || st.CacheMisses < 2 {
			t.Errorf("stats %+v, want 1 request shared by several misses", st)
		}
	})
}
