package estargz

import (
	"bytes"
	"context"
	"fmt"
	"hash/fnv"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazypull/lazypull/internal/fixture"
)

// BenchmarkChunkPolicy measures what a chunk size (or rule) costs and
// saves, for the table in docs/benchmarks.md ("Chunk size"):
//
//   - blob-MB: the blob (compression lost to member boundaries);
//   - entries, toc-KB, tail-KB: TOC entries, TOC JSON, and the blob's tail
//     from the TOC on (what mounting the layer fetches before anything
//     can be read);
//   - partial-KB: compressed bytes of the chunks that a partial read of
//     every file of 1 MiB or more needs — its first and last 64 KiB and
//     16 pages of 4 KiB at seeded random offsets, the way a loader maps a
//     shared library or a zip reader reads its central directory and a
//     few members — and partial-% that as a share of those files' whole
//     compressed size; partial-runs the number of separate ranges.
//
// The layers are the tars (plain or compressed) named in
// LAZYPULL_CHUNK_STUDY (comma-separated), else the synthetic benchLayer:
//
//	LAZYPULL_CHUNK_STUDY=/tmp/debian.tar,/tmp/go.tar go test ./estargz -run '^$' -bench ChunkPolicy -benchtime 1x
func BenchmarkChunkPolicy(b *testing.B) {
	type input struct {
		name string
		data []byte
	}
	var inputs []input
	if env := os.Getenv("LAZYPULL_CHUNK_STUDY"); env != "" {
		for _, p := range strings.Split(env, ",") {
			data, err := os.ReadFile(p)
			if err != nil {
				b.Fatal(err)
			}
			inputs = append(inputs, input{strings.SplitN(filepath.Base(p), ".", 2)[0], data})
		}
	} else {
		inputs = append(inputs, input{"synthetic", benchLayer()})
	}
	type policy struct {
		name string
		opts BuildOptions
	}
	policies := []policy{
		{"fixed-64K", BuildOptions{ChunkSize: 64 << 10}},
		{"fixed-256K", BuildOptions{ChunkSize: 256 << 10}},
		{"fixed-1M", BuildOptions{ChunkSize: 1 << 20}},
		{"fixed-4M", BuildOptions{ChunkSize: 4 << 20}},
		{"grow-256K-4M", BuildOptions{sizer: growingChunks(32), sizerMin: 256 << 10, sizerMax: 4 << 20}},
		{"fixed-128K", BuildOptions{ChunkSize: 128 << 10}},
		{"elf-256K+4M", BuildOptions{sizer: magicChunks(256<<10, 4<<20), sizerMin: 64 << 10, sizerMax: 4 << 20}},
		{"elf-128K+1M", BuildOptions{sizer: magicChunks(128<<10, 1<<20), sizerMin: 64 << 10, sizerMax: 4 << 20}},
		{"elf-64K+256K", BuildOptions{sizer: magicChunks(64<<10, 256<<10), sizerMin: 64 << 10, sizerMax: 4 << 20}},
		{"auto", BuildOptions{}},
		{"zstd-fixed-64K", BuildOptions{Compression: Zstd, ChunkSize: 64 << 10}},
		{"zstd-fixed-256K", BuildOptions{Compression: Zstd, ChunkSize: 256 << 10}},
		{"zstd-fixed-4M", BuildOptions{Compression: Zstd, ChunkSize: 4 << 20}},
		{"zstd-auto", BuildOptions{Compression: Zstd}},
	}
	for _, in := range inputs {
		for _, p := range policies {
			b.Run(in.name+"/"+p.name, func(b *testing.B) {
				for b.Loop() {
					m := measureChunking(b, in.data, p.opts)
					b.ReportMetric(float64(m.blob)/1e6, "blob-MB")
					b.ReportMetric(float64(m.entries), "entries")
					b.ReportMetric(float64(m.tocJSON)/1e3, "toc-KB")
					b.ReportMetric(float64(m.tail)/1e3, "tail-KB")
					b.ReportMetric(float64(m.partial)/1e3, "partial-KB")
					b.ReportMetric(100*float64(m.partial)/float64(max(m.whole, 1)), "partial-%")
					b.ReportMetric(float64(m.runs), "partial-runs")
					b.ReportMetric(0, "ns/op")
				}
			})
		}
	}
}

// growingChunks gives each file about perFile chunks (rounded up to a power
// of two); Build clamps the result to its bounds.
func growingChunks(perFile int64) chunkSizer {
	return func(size int64, _ []byte) int64 {
		cs := int64(64 << 10)
		for cs*perFile < size {
			cs *= 2
		}
		return cs
	}
}

// magicChunks gives ELF files and zip archives (read in pieces) chunks of
// partial bytes, other files chunks of rest bytes.
func magicChunks(partial, rest int64) chunkSizer {
	return func(_ int64, head []byte) int64 {
		if bytes.HasPrefix(head, []byte("\x7fELF")) || bytes.HasPrefix(head, []byte("PK\x03\x04")) {
			return partial
		}
		return rest
	}
}

type chunkingCost struct {
	blob, tocJSON, tail int64
	entries             int
	partial, whole      int64
	runs                int
}

func measureChunking(tb testing.TB, src []byte, opts BuildOptions) chunkingCost {
	tb.Helper()
	var blob bytes.Buffer
	res, err := Build(context.Background(), &blob, bytes.NewReader(src), opts)
	if err != nil {
		tb.Fatal(err)
	}
	r, err := Open(bytes.NewReader(blob.Bytes()), int64(blob.Len()), OpenOptions{TOCDigest: res.TOCDigest})
	if err != nil {
		tb.Fatal(err)
	}
	m := chunkingCost{blob: res.Size, tocJSON: int64(len(r.TOCJSON)), tail: res.Size - r.Footer.TOCOffset, entries: res.Entries}
	const large, edge, page, pages = 1 << 20, 64 << 10, 4 << 10, 16
	seen := map[*Node]bool{}
	r.Walk(func(name string, n *Node) bool {
		if n.Type != TypeReg || n.Size < large || seen[n] {
			return true
		}
		seen[n] = true
		h := fnv.New64a()
		h.Write([]byte(name))
		rng := rand.New(rand.NewSource(int64(h.Sum64())))
		ranges := [][2]int64{{0, edge}, {n.Size - edge, n.Size}}
		for range pages {
			off := rng.Int63n(n.Size/page) * page
			ranges = append(ranges, [2]int64{off, min(off+page, n.Size)})
		}
		need := make([]bool, len(n.Chunks))
		for _, rg := range ranges {
			for i := n.ChunkAt(rg[0]); i >= 0 && i < len(n.Chunks) && n.Chunks[i].FileOffset < rg[1]; i++ {
				need[i] = true
			}
		}
		for i, c := range n.Chunks {
			m.whole += c.End - c.Offset
			if need[i] {
				m.partial += c.End - c.Offset
				if i == 0 || !need[i-1] {
					m.runs++
				}
			}
		}
		return true
	})
	if m.whole == 0 {
		tb.Logf("no file of %d bytes or more", large)
	}
	return m
}

func TestMeasureChunkingCountsPartialReads(t *testing.T) {
	// Two 8 MiB files: one chunk each with 16 MiB chunks, so a partial
	// read costs the whole file; with 64 KiB chunks at most 18 chunks.
	data := bytes.Repeat([]byte("0123456789abcdef"), 8<<20/16)
	var ents []fixture.Entry
	for i := range 2 {
		ents = append(ents, regFx(fmt.Sprintf("f%d", i), data))
	}
	var src bytes.Buffer
	tarTo(&src, ents)
	big := measureChunking(t, src.Bytes(), BuildOptions{ChunkSize: 16 << 20})
	small := measureChunking(t, src.Bytes(), BuildOptions{ChunkSize: 64 << 10})
	if big.partial != big.whole || big.runs != 2 {
		t.Errorf("16 MiB chunks: partial %d of %d in %d runs, want all in 2", big.partial, big.whole, big.runs)
	}
	if small.partial*4 > small.whole || small.runs < 4 || small.entries <= big.entries {
		t.Errorf("64 KiB chunks: partial %d of %d in %d runs, %d entries (16 MiB: %d)", small.partial, small.whole, small.runs, small.entries, big.entries)
	}
}

func TestDefaultChunks(t *testing.T) {
	elf, zip, text := []byte("\x7fELF"), []byte("PK\x03\x04"), []byte("#!/b")
	for _, c := range []struct {
		size int64
		head []byte
		want int64
	}{
		{1 << 20, elf, PieceChunkSize},
		{1 << 20, zip, PieceChunkSize},
		{1 << 20, text, BaseChunkSize},
		{1 << 20, elf[:3], BaseChunkSize},
		{MaxChunksPerFile * PieceChunkSize, elf, PieceChunkSize},
		{MaxChunksPerFile*PieceChunkSize + 1, elf, 2 * PieceChunkSize},
		{MaxChunksPerFile * BaseChunkSize, text, BaseChunkSize},
		{MaxChunksPerFile*BaseChunkSize + 1, text, 2 * BaseChunkSize},
		{1 << 40, text, DefaultChunkSize},
	} {
		if got := defaultChunks(c.size, c.head); got != c.want {
			t.Errorf("defaultChunks(%d, %q) = %d, want %d", c.size, c.head, got, c.want)
		}
	}
}

// Blobs built with the default rule — files of one layer in chunks of
// different sizes — read back with upstream's reader and verifier.
func TestDefaultChunksWithUpstreamReader(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	elf := append([]byte("\x7fELF"), fixture.TextFrom(rng, 300<<10)...)
	zip := append([]byte("PK\x03\x04"), fixture.RandomFrom(rng, 100<<10)...)
	ents := []fixture.Entry{
		dirFx("usr/"), dirFx("usr/lib/"),
		regFx("usr/lib/libfoo.so", elf),
		regFx("usr/lib/app.jar", zip),
		regFx("usr/lib/data.bin", fixture.TextFrom(rng, 700<<10)),
		regFx("usr/lib/small", []byte("small")),
	}
	src := fixture.Tar(t, ents)
	srcEnts := fixture.Read(t, src)
	for _, comp := range compressions {
		t.Run(comp.String(), func(t *testing.T) {
			blob, res := build(t, src, BuildOptions{Compression: comp})
			r := checkBuilt(t, src, blob, res, BuildOptions{Compression: comp})
			for name, want := range map[string]int{"usr/lib/libfoo.so": 5, "usr/lib/app.jar": 2, "usr/lib/data.bin": 3, "usr/lib/small": 1} {
				if n, ok := r.Lookup(name); !ok || len(n.Chunks) != want {
					t.Errorf("%s: %d chunks, want %d", name, len(n.Chunks), want)
				}
			}
			checkUpstreamReads(t, comp, blob, res, srcEnts)
		})
	}
}
