package fs

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
)

// blockingStore is a Store whose Adds wait until released, like a slow
// disk.
type blockingStore struct {
	*cache.Store
	adding  chan digest.Digest // one value per Add started
	release chan struct{}
}

func (s *blockingStore) Add(d digest.Digest, data []byte) error {
	s.adding <- d
	<-s.release
	return s.Store.Add(d, data)
}

// A fetched chunk reaches the reader waiting for it before it is written
// to the store, and readers arriving while it is being written share it
// instead of fetching it again.
func TestFetchDeliversBeforeStoring(t *testing.T) {
	data := bytes.Repeat([]byte("deliver "), 4000)
	blob, r := buildLayer(t, []tarFile{{"a/f", data}}, 64<<10)
	n, _ := r.Index.Lookup("a/f")
	mem, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	store := &blockingStore{Store: mem, adding: make(chan digest.Digest, 16), release: make(chan struct{})}
	rb := &recordingBlob{r: bytes.NewReader(blob)}
	l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return rb, nil }, store, LayerOptions{ReadAhead: -1})
	defer l.Close()
	defer close(store.release)

	read := func() <-chan error {
		ch := make(chan error, 1)
		go func() {
			buf := make([]byte, 100)
			_, err := l.ReadAt(context.Background(), n, buf, 0)
			if err == nil && !bytes.Equal(buf, data[:100]) {
				err = errWrongBytes
			}
			ch <- err
		}()
		return ch
	}
	first := read()
	select {
	case d := <-store.adding:
		if d != n.Chunks[0].Digest {
			t.Fatalf("storing %s, want the read chunk", d)
		}
	case <-time.After(watchdog):
		t.Fatal("the chunk was never stored")
	}
	// The Add is blocked: the reader must have its bytes anyway.
	select {
	case err := <-first:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(watchdog):
		t.Fatal("the reader waited for the store")
	}
	second := read()
	select {
	case err := <-second:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(watchdog):
		t.Fatal("a reader arriving during the store waited for it")
	}
	if got := len(rb.requests()); got != 1 {
		t.Fatalf("%d blob requests, want 1 (the second reader shares the fetch)", got)
	}
	if mem.Has(n.Chunks[0].Digest) {
		t.Fatal("stored before the Add was released")
	}
}

type wrongBytesError struct{}

func (wrongBytesError) Error() string { return "wrong bytes" }

var errWrongBytes error = wrongBytesError{}
