package fs

import (
	"context"
	"fmt"
	"math/rand"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
)

// BenchmarkColdChunkRead is the foreground fetch path without a network:
// each iteration reads a small file whose only chunk is not cached, from
// a blob in memory, into a store with a disk tier. ns/op is what the
// reader waits for: fetching, inflating and verifying the chunk (and,
// when the store is written before the reader is answered, the cache
// file's creation and write).
func BenchmarkColdChunkRead(b *testing.B) {
	for _, size := range []int{4 << 10, 32 << 10} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			const files = 2000
			rng := rand.New(rand.NewSource(1))
			var tf []tarFile
			for i := range files {
				data := make([]byte, size)
				rng.Read(data)
				tf = append(tf, tarFile{fmt.Sprintf("d%d/f%d", i%50, i), data})
			}
			blob, r := buildLayer(b, tf, 64<<10)
			nodes := make([]*estargz.Node, files)
			for i, f := range tf {
				nodes[i], _ = r.Index.Lookup(f.name)
			}
			buf := make([]byte, size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			newLayer := func() *Layer {
				store, err := cache.Open(cache.Options{Dir: b.TempDir()})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { store.Close() })
				return NewLayer(digest.FromBytes(blob), r.Index, r.Footer.Compression,
					func(context.Context) (Blob, error) { return fileBlob{bytesReaderAt(blob)}, nil }, store, LayerOptions{ReadAhead: -1})
			}
			l := newLayer()
			i := 0
			for b.Loop() {
				if i == files {
					b.StopTimer()
					l.Close()
					l, i = newLayer(), 0
					b.StartTimer()
				}
				if _, err := l.ReadAt(context.Background(), nodes[i], buf, 0); err != nil {
					b.Fatal(err)
				}
				i++
			}
			l.Close()
		})
	}
}

type bytesReaderAt []byte

func (p bytesReaderAt) ReadAt(dst []byte, off int64) (int, error) {
	if off >= int64(len(p)) {
		return 0, fmt.Errorf("offset %d past %d bytes", off, len(p))
	}
	n := copy(dst, p[off:])
	if n < len(dst) {
		return n, fmt.Errorf("short read")
	}
	return n, nil
}
