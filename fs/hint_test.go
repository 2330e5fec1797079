package fs

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
)

// Hint fetches the named chunks in the order given (adjacent ones in one
// request), ignores offsets that name no chunk and repeats, and caches
// nothing else.
func TestHintFetchesInOrder(t *testing.T) {
	var files []tarFile
	for i := range 8 {
		files = append(files, tarFile{fmt.Sprintf("d/f%d", i), bytes.Repeat([]byte{byte('a' + i)}, 5000)})
	}
	blob, r := buildLayer(t, files, 64<<10)
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	rb := &recordingBlob{r: bytes.NewReader(blob)}
	l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return rb, nil }, store, LayerOptions{ReadAhead: -1})
	defer l.Close()

	chunk := func(name string) estargz.Chunk {
		n, ok := r.Index.Lookup(name)
		if !ok || len(n.Chunks) != 1 {
			t.Fatalf("%s: %v %d chunks", name, ok, len(n.Chunks))
		}
		return n.Chunks[0]
	}
	f6, f2, f3 := chunk("d/f6"), chunk("d/f2"), chunk("d/f3")
	l.spec.parallel = 1 // one request at a time: their order is the test's
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

// Close stops hinted fetches and a closed layer takes no hint.
func TestHintAfterCloseDoesNothing(t *testing.T) {
	blob, r := buildLayer(t, []tarFile{{"a", []byte("x")}}, 64<<10)
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	rb := &recordingBlob{r: bytes.NewReader(blob)}
	l := NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return rb, nil }, store, LayerOptions{ReadAhead: -1})
	l.Close()
	n, _ := r.Index.Lookup("a")
	l.Hint(context.Background(), []int64{n.Chunks[0].Offset})
	l.hintWG.Wait()
	if got := rb.requests(); len(got) != 0 {
		t.Fatalf("requests after Close: %v", got)
	}
}
