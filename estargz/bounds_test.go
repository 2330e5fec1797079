package estargz

import (
	"bytes"
	"fmt"
	"runtime"
	"testing"

	"github.com/opencontainers/go-digest"
)

// Hostile TOCs that would make a reader allocate without bound are refused
// at parse time with an error naming the entry.

// A chunk whose compressed extent (to the next member) is 1 TiB: a read of
// its 10 bytes would fetch and hold the whole terabyte.
func TestParseTOCRefusesHugeExtent(t *testing.T) {
	d := digest.FromString("0123456789").String()
	const tib = 1 << 40
	toc := &TOC{Version: 1, Entries: []*TOCEntry{
		{Name: "small", Type: TypeReg, Size: 10, Offset: 100, ChunkDigest: d},
		{Name: "next", Type: TypeReg, Size: 10, Offset: 100 + tib, ChunkDigest: d},
	}}
	_, err := ParseTOC(tocJSON(t, toc), 100+tib+1000, Limits{})
	wantErr(t, err, ErrTOCTooLarge, `"small"`, "compressed extent", "10 plain bytes")

	// At the bound it is accepted, one byte more is not.
	toc.Entries[1].Offset = 100 + maxExtent(10)
	if _, err := ParseTOC(tocJSON(t, toc), toc.Entries[1].Offset+1000, Limits{}); err != nil {
		t.Errorf("extent at the bound: %v", err)
	}
	toc.Entries[1].Offset++
	_, err = ParseTOC(tocJSON(t, toc), toc.Entries[1].Offset+1000, Limits{})
	wantErr(t, err, ErrTOCTooLarge, `"small"`)

	// The last member's extent runs to the end of the payload region.
	toc.Entries = toc.Entries[:1]
	_, err = ParseTOC(tocJSON(t, toc), 100+tib, Limits{})
	wantErr(t, err, ErrTOCTooLarge, `"small"`, "compressed extent")
}

// zeros4GiB is the sha256 of 4 GiB of zero bytes: a chunk that honestly
// decompresses to it (from about 4 MiB of gzip) would pass verification.
const zeros4GiB = "sha256:8479e43911dc45e89f934fe48d01297e16f51d17aa561d4d1c216b1ae0fcddca"

// A 4 GiB plain chunk whose digest is right: decoding it would hold 4 GiB
// in memory before verifying it.
func TestParseTOCRefusesHugeChunk(t *testing.T) {
	const size = 4 << 30
	toc := &TOC{Version: 1, Entries: []*TOCEntry{
		{Name: "zeros", Type: TypeReg, Size: size, Offset: 0, ChunkDigest: zeros4GiB},
	}}
	_, err := ParseTOC(tocJSON(t, toc), 5<<20, Limits{})
	wantErr(t, err, ErrTOCTooLarge, `"zeros"`, "chunk of 4294967296 bytes", "chunk limit")

	// Split into 64 MiB chunks, the same file is fine.
	toc.Entries[0].ChunkSize = DefaultMaxChunkSize
	for off := int64(DefaultMaxChunkSize); off < size; off += DefaultMaxChunkSize {
		e := &TOCEntry{Name: "zeros", Type: TypeChunk, Offset: off >> 10, ChunkOffset: off, ChunkDigest: digest.FromString(fmt.Sprint(off)).String()}
		if off+DefaultMaxChunkSize < size {
			e.ChunkSize = DefaultMaxChunkSize
		}
		toc.Entries = append(toc.Entries, e)
	}
	if _, err := ParseTOC(tocJSON(t, toc), 5<<20, Limits{}); err != nil {
		t.Errorf("4 GiB in 64 MiB chunks: %v", err)
	}
	// A lower limit is honoured.
	_, err = ParseTOC(tocJSON(t, toc), 5<<20, Limits{MaxChunkSize: 1 << 20})
	wantErr(t, err, ErrTOCTooLarge, `"zeros"`, "1048576-byte chunk limit")

	// Skipping inner bytes costs decompression too: innerOffset counts.
	toc = &TOC{Version: 1, Entries: []*TOCEntry{
		{Name: "inner", Type: TypeReg, Size: 10, Offset: 0, InnerOffset: DefaultMaxChunkSize, ChunkDigest: digest.FromString("x").String()},
	}}
	_, err = ParseTOC(tocJSON(t, toc), 1000, Limits{})
	wantErr(t, err, ErrTOCTooLarge, `"inner"`, "inner offset")
}

// A TOC of 4 Mi entries (126 MiB of JSON, within the TOC size limit) would
// take about 3 GiB of index: it is refused by the entry limit before it is
// decoded, for a few MiB.
func TestParseTOCRefuses4MiEntries(t *testing.T) {
	var b bytes.Buffer
	b.WriteString(`{"version":1,"entries":[`)
	const n = 4 << 20
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"name":"%x","type":"fifo"}`, i)
	}
	b.WriteString(`]}`)
	j := b.Bytes()
	if int64(len(j)) > DefaultMaxTOCSize {
		t.Fatalf("test TOC is %d bytes, over the size limit it means to pass", len(j))
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := ParseTOC(j, 1000, Limits{})
	runtime.ReadMemStats(&after)
	wantErr(t, err, ErrTOCTooLarge, fmt.Sprintf("more than %d entries", DefaultMaxEntries))
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 8<<20 {
		t.Errorf("refusing a TOC of %d entries allocated %d bytes", n, alloc)
	}
}
