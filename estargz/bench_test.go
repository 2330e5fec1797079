package estargz

import (
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"fmt"
	"io"
	"math"
	"math/rand"
	"runtime"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
)

// benchLayer is a realistic synthetic layer of about 64 MiB: files of
// log-uniformly varied sizes (100 B to 4 MiB), most of them text-like and
// compressible, about a sixth of the bytes incompressible random data,
// plus directories and symlinks.
var benchLayer = sync.OnceValue(func() []byte {
	rng := rand.New(rand.NewSource(2024))
	var ents []fixture.Entry
	total := 0
	for i := 0; total < 64<<20; i++ {
		dir := fmt.Sprintf("usr/share/pkg%03d/", i/40)
		if i%40 == 0 {
			ents = append(ents, dirFx(dir))
		}
		size := int(math.Exp(rng.Float64()*math.Log(4<<20/100)) * 100)
		size = min(size, 64<<20-total+1)
		var data []byte
		if rng.Intn(6) == 0 {
			data = fixture.RandomFrom(rng, size)
		} else {
			data = fixture.TextFrom(rng, size)
		}
		name := fmt.Sprintf("%sfile-%05d", dir, i)
		ents = append(ents, regFx(name, data))
		if i%10 == 0 {
			ents = append(ents, symFx(name+".link", fmt.Sprintf("file-%05d", i)))
		}
		total += size
	}
	var b bytes.Buffer
	tarTo(&b, ents)
	return b.Bytes()
})

// tarTo is fixture.Tar without a testing.TB, for package-level fixtures.
func tarTo(w io.Writer, ents []fixture.Entry) {
	if err := fixture.WriteTar(w, ents); err != nil {
		panic(err)
	}
}

type panicTB struct{ testing.TB }

func (*panicTB) Helper()                   {}
func (*panicTB) Fatal(args ...any)         { panic(fmt.Sprint(args...)) }
func (*panicTB) Fatalf(f string, a ...any) { panic(fmt.Sprintf(f, a...)) }

// BenchmarkBuild reports MB/s of uncompressed input and the output size
// as a fraction of the input ("ratio").
func BenchmarkBuild(b *testing.B) {
	layer := benchLayer()
	for _, c := range []struct {
		name  string
		comp  Compression
		level int
	}{
		{"gzip-9", Gzip, 9},
		{"gzip-6", Gzip, 6},
		{"zstd-3", Zstd, 3},
	} {
		for _, workers := range []int{1, runtime.GOMAXPROCS(0)} {
			b.Run(fmt.Sprintf("%s/workers=%d", c.name, workers), func(b *testing.B) {
				b.SetBytes(int64(len(layer)))
				var size int64
				for b.Loop() {
					res, err := Build(context.Background(), io.Discard, bytes.NewReader(layer),
						BuildOptions{Compression: c.comp, Level: c.level, Workers: workers})
					if err != nil {
						b.Fatal(err)
					}
					size = res.Size
				}
				b.ReportMetric(float64(size)/float64(len(layer)), "ratio")
			})
		}
	}
}

// BenchmarkStdlibGzip is the baseline: single-threaded compress/gzip of
// the same tar, one stream, at the same levels.
func BenchmarkStdlibGzip(b *testing.B) {
	layer := benchLayer()
	for _, level := range []int{9, 6} {
		b.Run(fmt.Sprintf("gzip-%d", level), func(b *testing.B) {
			b.SetBytes(int64(len(layer)))
			var cw countWriter
			for b.Loop() {
				cw = 0
				zw, _ := stdgzip.NewWriterLevel(&cw, level)
				zw.Write(layer)
				zw.Close()
			}
			b.ReportMetric(float64(cw)/float64(len(layer)), "ratio")
		})
	}
}

type countWriter int64

func (c *countWriter) Write(p []byte) (int, error) { *c += countWriter(len(p)); return len(p), nil }

// bench50k is a built layer of 50,000 entries (files, dirs, symlinks).
var bench50k = sync.OnceValues(func() ([]byte, *BuildResult) {
	rng := rand.New(rand.NewSource(50))
	var ents []fixture.Entry
	for len(ents) < 50000 {
		i := len(ents)
		switch {
		case i%50 == 0:
			ents = append(ents, dirFx(fmt.Sprintf("usr/lib/python3/site-packages/pkg%04d/", i/50)))
		case i%7 == 0:
			ents = append(ents, symFx(fmt.Sprintf("usr/lib/python3/site-packages/pkg%04d/link%d", i/50, i), "module.py"))
		default:
			ents = append(ents, regFx(fmt.Sprintf("usr/lib/python3/site-packages/pkg%04d/module_%d.py", i/50, i), fixture.TextFrom(rng, 50+rng.Intn(300))))
		}
	}
	var src, out bytes.Buffer
	tarTo(&src, ents)
	res, err := Build(context.Background(), &out, &src, BuildOptions{Level: 1})
	if err != nil {
		panic(err)
	}
	return out.Bytes(), res
})

// BenchmarkOpen opens a 50k-entry layer: footer, TOC decompression, JSON
// parsing and validation, index construction.
func BenchmarkOpen(b *testing.B) {
	blob, res := bench50k()
	b.ReportAllocs()
	for b.Loop() {
		r, err := Open(bytes.NewReader(blob), int64(len(blob)), OpenOptions{TOCDigest: res.TOCDigest})
		if err != nil {
			b.Fatal(err)
		}
		if r.NumNodes() < 50000 {
			b.Fatalf("%d nodes", r.NumNodes())
		}
	}
	b.ReportMetric(float64(res.Entries), "entries")
}

// BenchmarkDecodeChunk decompresses and verifies one 4 MiB chunk of
// text-like data, reusing the buffer.
func BenchmarkDecodeChunk(b *testing.B) {
	rng := rand.New(rand.NewSource(1))
	plain := fixture.TextFrom(rng, DefaultChunkSize)
	src := fixture.Tar(&panicTB{}, []fixture.Entry{regFx("f", plain)})
	for _, comp := range compressions {
		b.Run(comp.String(), func(b *testing.B) {
			var out bytes.Buffer
			if _, err := Build(context.Background(), &out, bytes.NewReader(src), BuildOptions{Compression: comp}); err != nil {
				b.Fatal(err)
			}
			blob := out.Bytes()
			r, err := Open(bytes.NewReader(blob), int64(len(blob)), OpenOptions{})
			if err != nil {
				b.Fatal(err)
			}
			n, _ := r.Lookup("f")
			c := n.Chunks[0]
			compressed := blob[c.Offset:c.End]
			dec := NewDecoder()
			buf := make([]byte, 0, DefaultChunkSize)
			b.SetBytes(c.Size)
			b.ReportAllocs()
			for b.Loop() {
				got, err := dec.DecodeChunk(comp, compressed, c, buf)
				if err != nil {
					b.Fatal(err)
				}
				if len(got) != DefaultChunkSize {
					b.Fatal("short")
				}
			}
			if digest.FromBytes(plain) != n.Digest {
				b.Fatal("digest")
			}
		})
	}
}
