package fs

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
)

// newHintLayer opens a Layer of blob (whose reader is r) over a memory
// cache, serving the blob from memory and recording the ranges read,
// without read-ahead; the cache is closed with the test.
func newHintLayer(t *testing.T, blob []byte, r *estargz.Reader) (*Layer, *recordingBlob, *cache.Store) {
	t.Helper()
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	rb := &recordingBlob{r: bytes.NewReader(blob)}
	l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return rb, nil }, store, LayerOptions{ReadAhead: -1})
	return l, rb, store
}

// Hint fetches the named chunks in the order given (adjacent ones in one
// request), ignores offsets that name no chunk and repeats, and caches
// nothing else.
func TestHintFetchesInOrder(t *testing.T) {
	var files []tarFile
	for i := range 8 {
		files = append(files, tarFile{fmt.Sprintf("d/f%d", i), bytes.Repeat([]byte{byte('a' + i)}, 5000)})
	}
	blob, r := buildLayer(t, files, 64<<10)
	l, rb, store := newHintLayer(t, blob, r)
	defer l.Close()

	chunk := func(name string) estargz.Chunk {
		n, ok := r.Index.Lookup(name)
		if !ok || len(n.Chunks) != 1 {
			t.Fatalf("%s: %v %d chunks", name, ok, len(n.Chunks))
		}
		return n.Chunks[0]
	}
	f6, f2, f3 := chunk("d/f6"), chunk("d/f2"), chunk("d/f3")
	l.spec.parallel = 1                       // one request at a time: their order is the test's
	l.spec.hintWindow, l.spec.hintGap = 1, -1 // each chunk its own window, no gaps
	l.Hint(context.Background(), []int64{f6.Offset, f2.Offset, f3.Offset, f6.Offset, f2.Offset + 1, -5, 1 << 40})
	l.hintWG.Wait()

	got := rb.requests()
	want := [][2]int64{{f6.Offset, f6.End - f6.Offset}, {f2.Offset, f3.End - f2.Offset}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("requests %v, want %v (f6 first, then f2+f3 in one)", got, want)
	}
	for i := range 8 {
		c := chunk(fmt.Sprintf("d/f%d", i))
		if want := i == 6 || i == 2 || i == 3; store.Has(c.Digest) != want {
			t.Errorf("d/f%d cached %v, want %v", i, !want, want)
		}
	}
}

// A hint in first-read order, scattered over the blob, is fetched in blob
// order within a window, and a request spans the small gaps between hinted
// chunks (unhinted chunks in a gap are neither decoded nor cached); the
// order between windows is kept.
func TestHintCoalescesScatteredChunks(t *testing.T) {
	var files []tarFile
	for i := range 8 {
		files = append(files, tarFile{fmt.Sprintf("d/f%d", i), fixture.Random(int64(i), 3000)})
	}
	blob, r := buildLayer(t, files, 64<<10)
	l, rb, store := newHintLayer(t, blob, r)
	defer l.Close()
	chunk := func(i int) estargz.Chunk {
		n, ok := r.Index.Lookup(fmt.Sprintf("d/f%d", i))
		if !ok || len(n.Chunks) != 1 {
			t.Fatalf("d/f%d: %v", i, ok)
		}
		return n.Chunks[0]
	}
	l.spec.parallel = 1
	// The first window holds f6, f3 and f4; f0 comes in the next.
	l.spec.hintWindow = chunk(6).End - chunk(6).Offset + chunk(3).End - chunk(3).Offset + chunk(4).End - chunk(4).Offset + 10
	l.Hint(context.Background(), []int64{chunk(6).Offset, chunk(3).Offset, chunk(4).Offset, chunk(0).Offset})
	l.hintWG.Wait()
	got := rb.requests()
	want := [][2]int64{{chunk(3).Offset, chunk(6).End - chunk(3).Offset}, {chunk(0).Offset, chunk(0).End - chunk(0).Offset}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("requests %v, want %v (f3..f6 in one, then f0)", got, want)
	}
	for i := range 8 {
		if want := i == 0 || i == 3 || i == 4 || i == 6; store.Has(chunk(i).Digest) != want {
			t.Errorf("d/f%d cached %v, want %v", i, !want, want)
		}
	}
}

// Close stops hinted fetches and a closed layer takes no hint.
func TestHintAfterCloseDoesNothing(t *testing.T) {
	blob, r := buildLayer(t, []tarFile{{"a", []byte("x")}}, 64<<10)
	l, rb, _ := newHintLayer(t, blob, r)
	l.Close()
	n, _ := r.Index.Lookup("a")
	l.Hint(context.Background(), []int64{n.Chunks[0].Offset})
	l.hintWG.Wait()
	if got := rb.requests(); len(got) != 0 {
		t.Fatalf("requests after Close: %v", got)
	}
}
