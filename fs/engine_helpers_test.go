package fs

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/lazypull/lazypull/estargz"
)

// watchdog bounds how long a test waits for something that must happen;
// it is a hang guard, never an assertion about speed.
const watchdog = 30 * time.Second

// fakeClock is a Clock that moves only when the test says so.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []fakeTimer
	added  chan time.Duration // one value per After call, its duration
}

type fakeTimer struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), added: make(chan time.Duration, 1024)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
	} else {
		c.timers = append(c.timers, fakeTimer{at: c.now.Add(d), ch: ch})
	}
	c.added <- d
	return ch
}

// Advance moves the clock by d and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, t := range c.timers {
		if t.at.After(c.now) {
			kept = append(kept, t)
			continue
		}
		t.ch <- c.now
	}
	c.timers = kept
}

// waitTimer waits until some goroutine asks for a timer, and returns its
// duration.
func (c *fakeClock) waitTimer(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-c.added:
		return d
	case <-time.After(watchdog):
		t.Fatal("nobody asked the clock for a timer")
		return 0
	}
}

// result is what a call running in a goroutine returned.
type result struct {
	release func()
	err     error
}

// startBackground asks s for a background slot in a goroutine.
func startBackground(ctx context.Context, s *Scheduler) <-chan result {
	ch := make(chan result, 1)
	go func() {
		release, err := s.background(ctx)
		ch <- result{release, err}
	}()
	return ch
}

// mustGet waits for a result.
func mustGet(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(watchdog):
		t.Fatal("background slot not granted")
		return result{}
	}
}

// notYet fails if ch has a result already.
func notYet(t *testing.T, ch <-chan result, why string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("background slot granted %s", why)
	default:
	}
}

// tarFile is one regular file of a test layer.
type tarFile struct {
	name string
	data []byte
}

// buildLayer builds an eStargz blob of files (directories are created as
// needed) with the given chunk size and opens it.
func buildLayer(t testing.TB, files []tarFile, chunkSize int64) ([]byte, *estargz.Reader) {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	dirs := map[string]bool{}
	for _, f := range files {
		for i := range len(f.name) {
			if f.name[i] == '/' && !dirs[f.name[:i]] {
				dirs[f.name[:i]] = true
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: f.name[:i] + "/", Mode: 0o755}); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.data))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(f.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var blob bytes.Buffer
	if _, err := estargz.Build(context.Background(), &blob, &tb, estargz.BuildOptions{ChunkSize: chunkSize, Workers: 1}); err != nil {
		t.Fatal(err)
	}
	r, err := estargz.Open(bytes.NewReader(blob.Bytes()), int64(blob.Len()), estargz.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return blob.Bytes(), r
}

// recordingBlob serves a blob from memory and records the ranges read.
type recordingBlob struct {
	r      io.ReaderAt
	mu     sync.Mutex
	ranges [][2]int64 // [offset, length]
}

func (b *recordingBlob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	b.mu.Lock()
	b.ranges = append(b.ranges, [2]int64{off, int64(len(p))})
	b.mu.Unlock()
	return b.r.ReadAt(p, off)
}

func (b *recordingBlob) requests() [][2]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([][2]int64(nil), b.ranges...)
}
