package fs

import (
	"fmt"
	"path"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// raLayer is a layer's chunks for read-ahead tests: name -> chunk, in blob
// order, with the directory of each.
type raLayer struct {
	chunks []estargz.Chunk
	names  map[digest.Digest]string
	di     *dirIndex
}

// newRALayer lays out chunks of the given compressed sizes, one after the
// other in the blob, each in the directory given.
func newRALayer(spec ...struct {
	dir  string
	size int64
}) *raLayer {
	l := &raLayer{names: map[digest.Digest]string{}, di: &dirIndex{dirChunks: map[string][]int{}}}
	var off int64
	for i, s := range spec {
		name := fmt.Sprintf("%s/c%d", s.dir, i)
		d := digest.FromString(name)
		l.chunks = append(l.chunks, estargz.Chunk{Offset: off, End: off + s.size, Size: s.size, Digest: d})
		l.names[d] = name
		l.di.chunkDir = append(l.di.chunkDir, s.dir)
		l.di.dirChunks[s.dir] = append(l.di.dirChunks[s.dir], i)
		off += s.size
	}
	return l
}

func (l *raLayer) group(t *testing.T, from int, di *dirIndex, cached []int, dirBudget, readAhead int64) []string {
	t.Helper()
	isCached := func(d digest.Digest) bool {
		return slices.ContainsFunc(cached, func(i int) bool { return l.chunks[i].Digest == d })
	}
	var out []string
	for _, c := range readAheadChunks(l.chunks, di, l.chunks[from], isCached, dirBudget, readAhead) {
		out = append(out, l.names[c.Digest])
	}
	return out
}

type ds = struct {
	dir  string
	size int64
}

func TestReadAheadChunks(t *testing.T) {
	// a/c0 a/c1 b/c2 a/c3 a/c4 b/c5 a/c6 : 100 bytes each but c4 (1000)
	// and c6 (100), then a far-away a/c8 after a 5000-byte b/c7.
	l := newRALayer(ds{"a", 100}, ds{"a", 100}, ds{"b", 100}, ds{"a", 100}, ds{"a", 1000}, ds{"b", 100}, ds{"a", 100}, ds{"b", 5000}, ds{"a", 100})
	for _, c := range []struct {
		name                 string
		from                 int
		noDirIndex           bool
		cached               []int
		dirBudget, readAhead int64
		want                 []string
	}{
		{name: "read-ahead disabled", from: 0, dirBudget: 1 << 20, readAhead: -1, want: []string{"a/c0"}},
		{name: "blob order only while the dir index is being built", from: 0, noDirIndex: true, dirBudget: 1 << 20, readAhead: 200,
			want: []string{"a/c0", "a/c1", "b/c2"}},
		{name: "blob order stops at the first chunk ending past the window", from: 2, noDirIndex: true, dirBudget: 1 << 20, readAhead: 1050,
			want: []string{"b/c2", "a/c3"}},
		{name: "blob order first, then the directory", from: 0, dirBudget: 400, readAhead: 100,
			// a/c4 ends past twice the budget.
			want: []string{"a/c0", "a/c1", "a/c3"}},
		{name: "the directory's chunks listed already are not repeated", from: 0, dirBudget: 400, readAhead: 300,
			want: []string{"a/c0", "a/c1", "b/c2", "a/c3"}},
		{name: "directory stops at its budget", from: 3, dirBudget: 1050, readAhead: 1,
			// c6 would be within the span but over the budget.
			want: []string{"a/c3", "a/c4"}},
		{name: "directory skips cached chunks", from: 0, cached: []int{1, 3}, dirBudget: 1200, readAhead: 1,
			want: []string{"a/c0", "a/c4", "a/c6"}},
		{name: "directory never spans more than twice its budget", from: 3, dirBudget: 1100, readAhead: 1,
			// c4 and c6 are within 2200 bytes of c3's start, c8 is not.
			want: []string{"a/c3", "a/c4", "a/c6"}},
		{name: "directory is only what follows", from: 6, dirBudget: 10000, readAhead: 1,
			want: []string{"a/c6", "a/c8"}},
		{name: "other directory", from: 2, dirBudget: 10000, readAhead: 1,
			want: []string{"b/c2", "b/c5", "b/c7"}},
		{name: "last chunk", from: 8, dirBudget: 10000, readAhead: 10000, want: []string{"a/c8"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			di := l.di
			if c.noDirIndex {
				di = nil
			}
			got := l.group(t, c.from, di, c.cached, c.dirBudget, c.readAhead)
			if !slices.Equal(got, c.want) {
				t.Errorf("got %v, want %v", got, c.want)
			}
		})
	}
}

// Directory read-ahead takes the next files' first chunks only; the rest
// of a large file comes with blob-order read-ahead once it is read.
func TestReadAheadFirstChunksOfDirectory(t *testing.T) {
	// a/c0 is file x, a/c1..c3 file y (three chunks), a/c4 file z.
	l := newRALayer(ds{"a", 100}, ds{"a", 100}, ds{"a", 100}, ds{"a", 100}, ds{"a", 100})
	l.di.notFirst = []bool{false, false, true, true, false}
	if got, want := l.group(t, 0, l.di, nil, 1000, 1), []string{"a/c0", "a/c1", "a/c4"}; !slices.Equal(got, want) {
		t.Errorf("from x: got %v, want %v", got, want)
	}
	// Reading y's first chunk: its next chunks follow in the blob.
	if got, want := l.group(t, 1, l.di, nil, 1000, 200), []string{"a/c1", "a/c2", "a/c3", "a/c4"}; !slices.Equal(got, want) {
		t.Errorf("from y: got %v, want %v", got, want)
	}
}

func TestReadAheadChunkNotInLayer(t *testing.T) {
	l := newRALayer(ds{"a", 100}, ds{"a", 100})
	stray := estargz.Chunk{Offset: 0, End: 100, Digest: digest.FromString("stray")}
	got := readAheadChunks(l.chunks, l.di, stray, func(digest.Digest) bool { return false }, 1<<20, 1<<20)
	if len(got) != 1 || got[0] != stray {
		t.Fatalf("read-ahead of a chunk the layer does not list: %v", got)
	}
}

func TestNewDirIndex(t *testing.T) {
	files := []tarFile{
		{"etc/a", []byte("aaaa")},
		{"usr/lib/x", []byte("xxxx")},
		{"etc/b", []byte("bbbb")},
		{"usr/lib/y", []byte("yyyyyyyyyy")}, // three chunks of 4
		{"top", []byte("top")},
		{"etc/dup", []byte("aaaa")}, // same content as etc/a: one chunk
	}
	_, r := buildLayer(t, files, 4)
	chunks := r.Index.Chunks()
	di := newDirIndex(r.Index, chunks)
	dirOf := map[string]string{}
	for i, c := range chunks {
		dirOf[fmt.Sprintf("%d+%d", c.Offset, c.InnerOffset)] = di.chunkDir[i]
	}
	for _, f := range files {
		n, ok := r.Index.Lookup(f.name)
		if !ok {
			t.Fatalf("%s not in the index", f.name)
		}
		want := path.Dir(f.name)
		for k, c := range n.Chunks {
			if got := dirOf[fmt.Sprintf("%d+%d", c.Offset, c.InnerOffset)]; got != want {
				t.Errorf("%s: chunk at %d in dir %q, want %q", f.name, c.FileOffset, got, want)
			}
			i := slices.IndexFunc(chunks, func(x estargz.Chunk) bool { return x.Offset == c.Offset && x.InnerOffset == c.InnerOffset })
			if di.notFirst[i] != (k > 0) {
				t.Errorf("%s: chunk %d marked first=%v", f.name, k, !di.notFirst[i])
			}
		}
	}
	var total int
	for d, idx := range di.dirChunks {
		total += len(idx)
		if !slices.IsSorted(idx) {
			t.Errorf("dir %s: chunk indexes %v not in blob order", d, idx)
		}
		for _, i := range idx {
			if di.chunkDir[i] != d {
				t.Errorf("chunk %d listed under %s but mapped to %s", i, d, di.chunkDir[i])
			}
		}
	}
	if total != len(chunks) {
		t.Errorf("%d chunks indexed by directory, layer has %d", total, len(chunks))
	}
	if got := len(di.dirChunks["usr/lib"]); got != 4 {
		t.Errorf("usr/lib has %d chunks, want 4 (x, and y in three)", got)
	}
}
