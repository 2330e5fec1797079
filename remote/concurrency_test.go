package remote_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

func TestConcurrentReadAt(t *testing.T) {
	f := newFixture(t, 1<<20, remote.Options{})
	b := f.open(t)
	// Some weather: a few errors and cuts along the way.
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 5, Status: 503})
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 5, CutAfter: 1000})
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 48)
	for g := range 48 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for range 12 {
				off := rng.Int64N(int64(len(f.data)))
				n := min(rng.Int64N(16<<10)+1, int64(len(f.data))-off)
				p := make([]byte, n)
				if _, err := b.ReadAt(ctx, p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, f.data[off:off+n]) {
					errs <- errors.New("wrong bytes")
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestConcurrentIdenticalReadsShareOneRequest(t *testing.T) {
	f := newFixture(t, 1<<20, remote.Options{})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Delay: time.Second})
	ctx := context.Background()
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			if err := f.readAt(t, ctx, b, 4096, 8192); err != nil {
				t.Error(err)
			}
		})
	}
	// ReadRanges that coalesce to the same range share it too.
	wg.Go(func() {
		out, err := b.ReadRanges(ctx, []remote.Range{{Offset: 4096, Length: 100}, {Offset: 4196, Length: 8092}})
		if err != nil || !bytes.Equal(append(out[0], out[1]...), f.data[4096:4096+8192]) {
			t.Error("ReadRanges", err)
		}
	})
	wg.Wait()
	if n := f.reg.Count(remotetest.RangeGETs); n != 1 {
		t.Fatalf("%d requests for one range, want 1", n)
	}
}

func TestCallerLeavingDoesNotFailOthers(t *testing.T) {
	f := newFixture(t, 1<<20, remote.Options{})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Delay: time.Second})

	impatient, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := f.readAt(t, context.Background(), b, 0, 1000); err != nil {
			t.Error(err)
		}
	})
	time.Sleep(50 * time.Millisecond)
	if err := f.readAt(t, impatient, b, 0, 1000); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("impatient caller: %v", err)
	}
	wg.Wait()
	if n := f.reg.Count(remotetest.RangeGETs); n != 1 {
		t.Fatalf("%d requests, want 1", n)
	}

	// When every caller leaves, the request is abandoned: the next read
	// starts afresh.
	f.reg.ResetRequests()
	ctx, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if err := f.readAt(t, ctx, b, 0, 1000); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want deadline: %v", err)
	}
	if err := f.readAt(t, context.Background(), b, 0, 1000); err != nil {
		t.Fatal(err)
	}
	if n := f.reg.Count(remotetest.RangeGETs); n != 2 {
		t.Fatalf("%d requests, want 2", n)
	}
}
