package estargz

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
)

// Fuzz targets. Each must never panic and must report bad input as an
// *Error. Seeds live in testdata/fuzz/<FuzzName>/; regenerate them with
//
//	ESTARGZ_WRITE_FUZZ_CORPUS=1 go test -run TestWriteFuzzCorpus ./estargz/

var fuzzLimits = Limits{MaxTOCSize: 1 << 20, MaxEntries: 1 << 14}

func requireError(t *testing.T, what string, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: error %q (%T) is not an *Error", what, err, err)
	}
	if e.Kind == nil || e.Error() == "" {
		t.Fatalf("%s: *Error without kind or message", what)
	}
	for _, k := range []error{ErrNotEStargz, ErrFormat, ErrTOCTooLarge, ErrDigest, ErrUnsafePath} {
		if errors.Is(err, k) {
			return
		}
	}
	t.Fatalf("%s: error %q has no known kind", what, err)
}

func FuzzParseFooter(f *testing.F) {
	for _, s := range footerSeeds() {
		f.Add(s.tail, s.size)
	}
	f.Fuzz(func(t *testing.T, tail []byte, size int64) {
		ft, err := ParseFooter(tail, size)
		if err != nil {
			if ft != nil {
				t.Fatal("footer and error")
			}
			requireError(t, "ParseFooter", err)
			return
		}
		switch {
		case ft.Size != 47 && ft.Size != 48 && ft.Size != 51:
			t.Fatalf("footer size %d", ft.Size)
		case ft.TOCOffset < 0 || ft.TOCCompressedSize <= 0 || ft.TOCOffset+ft.TOCCompressedSize > size-ft.Size:
			t.Fatalf("TOC [%d,+%d) does not fit a %d-byte blob before a %d-byte footer", ft.TOCOffset, ft.TOCCompressedSize, size, ft.Size)
		case ft.PayloadEnd < 0 || ft.PayloadEnd > ft.TOCOffset:
			t.Fatalf("payload end %d, TOC at %d", ft.PayloadEnd, ft.TOCOffset)
		case ft.TOCSize < 0:
			t.Fatalf("TOC size %d", ft.TOCSize)
		}
	})
}

func FuzzParseTOC(f *testing.F) {
	for _, s := range tocSeeds(f) {
		f.Add(s.json, s.payloadEnd)
	}
	f.Fuzz(func(t *testing.T, tocJSON []byte, payloadEnd int64) {
		ix, err := ParseTOC(tocJSON, payloadEnd, fuzzLimits)
		if err != nil {
			if ix != nil {
				t.Fatal("index and error")
			}
			requireError(t, "ParseTOC", err)
			return
		}
		checkIndexInvariants(t, ix)
	})
}

// checkIndexInvariants checks what users of an Index rely on.
func checkIndexInvariants(t *testing.T, ix *Index) {
	t.Helper()
	seen := 0
	ix.Walk(func(name string, n *Node) bool {
		seen++
		if n == nil {
			t.Fatalf("%q: nil node", name)
		}
		if l, ok := ix.Lookup(name); !ok || l != n {
			t.Fatalf("%q: Lookup disagrees with Walk", name)
		}
		if seen > 1<<20 {
			t.Fatal("walk does not end")
		}
		switch n.Type {
		case TypeDir:
			if !slices.IsSorted(n.Names()) {
				t.Fatalf("%q: names not sorted", name)
			}
			for _, c := range n.Names() {
				if _, ok := n.Child(c); !ok || c == "" || c == "." || c == ".." {
					t.Fatalf("%q: bad child %q", name, c)
				}
			}
		case TypeReg:
			var off int64
			for i, c := range n.Chunks {
				if c.FileOffset != off || c.Size <= 0 || c.Offset < 0 || c.End <= c.Offset || c.End > ix.PayloadEnd || c.InnerOffset < 0 {
					t.Fatalf("%q: chunk %d %v bad (file offset should be %d, payload end %d)", name, i, c, off, ix.PayloadEnd)
				}
				if n.ChunkAt(c.FileOffset) != i || n.ChunkAt(c.FileOffset+c.Size-1) != i {
					t.Fatalf("%q: ChunkAt disagrees for chunk %d", name, i)
				}
				off += c.Size
			}
			if off != n.Size {
				t.Fatalf("%q: chunks cover %d of %d", name, off, n.Size)
			}
		case TypeSymlink, TypeChar, TypeBlock, TypeFifo:
		default:
			t.Fatalf("%q: node type %q", name, n.Type)
		}
		return true
	})
	if seen < ix.NumNodes() {
		t.Fatalf("walk saw %d names for %d nodes", seen, ix.NumNodes())
	}
	cs := ix.Chunks()
	if !slices.IsSortedFunc(cs, func(a, b Chunk) int { return cmpInt64(a.Offset, b.Offset) }) {
		t.Fatal("Chunks not in blob order")
	}
}

func FuzzDecodeChunk(f *testing.F) {
	plain := []byte("some plain chunk bytes")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(plain)
	zw.Close()
	enc, _ := zstd.NewWriter(nil)
	zs := enc.EncodeAll(plain, nil)
	f.Add(false, gz.Bytes(), int64(0), int64(len(plain)), plain)
	f.Add(true, zs, int64(0), int64(len(plain)), plain)
	f.Add(false, gz.Bytes(), int64(5), int64(5), []byte("plain"))
	f.Add(true, zs, int64(5), int64(5), []byte("plain"))
	f.Add(false, gz.Bytes(), int64(0), int64(1<<40), plain)
	f.Add(true, zs[:10], int64(0), int64(3), plain)
	f.Add(false, []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 3, 0}, int64(0), int64(0), []byte(nil))
	dec := NewDecoder()
	f.Fuzz(func(t *testing.T, isZstd bool, compressed []byte, inner, size int64, want []byte) {
		comp := Gzip
		if isZstd {
			comp = Zstd
		}
		c := Chunk{InnerOffset: inner, Size: size, Digest: digest.FromBytes(want)}
		got, err := dec.DecodeChunk(comp, compressed, c, nil)
		if err != nil {
			requireError(t, "DecodeChunk", err)
			return
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("decoded %q, verified against the digest of %q", got, want)
		}
	})
}

func FuzzOpen(f *testing.F) {
	for _, b := range blobSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, blob []byte) {
		r, err := Open(bytes.NewReader(blob), int64(len(blob)), OpenOptions{Limits: fuzzLimits, TailSize: 512})
		if err != nil {
			if r != nil {
				t.Fatal("reader and error")
			}
			requireError(t, "Open", err)
			return
		}
		checkIndexInvariants(t, r.Index)
		if err := r.Verify(); err != nil {
			requireError(t, "Verify", err)
		}
		// Read every file; whatever comes back passed verification.
		r.Walk(func(name string, n *Node) bool {
			if n.Type != TypeReg {
				return true
			}
			fr, err := r.OpenFile(name)
			if err != nil {
				t.Fatalf("OpenFile(%q): %v", name, err)
			}
			buf := make([]byte, 4096)
			for off := int64(0); off < n.Size; off += int64(len(buf)) {
				if _, err := fr.ReadAt(buf, off); err != nil && err != io.EOF {
					requireError(t, "ReadAt", err)
					return false
				}
			}
			return true
		})
	})
}

// --- seeds ---

type footerSeed struct {
	tail []byte
	size int64
}

func footerSeeds() []footerSeed {
	return []footerSeed{
		{handGzipFooter(100, false), 1000},
		{handGzipFooter(100, true), 1000},
		{handZstdFooter(200, 50, 300, 1), 1000},
		{append(bytes.Repeat([]byte{0}, 20), handGzipFooter(0, false)...), 71},
		{handGzipFooter(1000, false), 1000},
		{handZstdFooter(1<<63, 1<<63, 1<<63, 1), 1 << 62},
		{[]byte("GnUlInUx"), 8},
		{bytes.Repeat([]byte{0xff}, 60), -1},
		{nil, 0},
	}
}

type tocSeed struct {
	json       []byte
	payloadEnd int64
}

func tocSeeds(tb testing.TB) []tocSeed {
	good, _ := json.Marshal(baseTOC())
	cyc := baseTOC()
	cyc.Entries[7].LinkName, cyc.Entries[8].LinkName = "link2", "link"
	cycJ, _ := json.Marshal(cyc)
	overlap := baseTOC()
	overlap.Entries[4].ChunkOffset = 5
	overlapJ, _ := json.Marshal(overlap)
	src := fixture.Tar(tb, richFixture(tar.FormatPAX, "./"))
	blob, _ := build(tb, src, BuildOptions{ChunkSize: testChunk})
	tocJ, _, off := rawTOC(tb, Gzip, blob)
	return []tocSeed{
		{good, testPayloadEnd},
		{good, 0},
		{cycJ, testPayloadEnd},
		{overlapJ, testPayloadEnd},
		{tocJ, off},
		{[]byte(`{"version":1,"entries":[{"name":"a","type":"hardlink","linkName":"f"},{"name":"a/b","type":"dir"},{"name":"f","type":"reg"}]}`), 10},
		{[]byte(`{"version":1,"entries":[0,{},null,""]}`), 10},
		{[]byte(`{"version":1}`), 10},
		{[]byte(`[`), 0},
	}
}

// blobSeeds are small blobs: valid gzip, zstd and legacy ones and a few
// with problems.
func blobSeeds(tb testing.TB) [][]byte {
	src := fixture.Tar(tb, []fixture.Entry{
		dirFx("d/"),
		regFx("d/a", []byte("hello, fuzzer")),
		regFx("d/big", bytes.Repeat([]byte("0123456789abcdef"), 40)),
		symFx("s", "d/a"),
		linkFx("h", "d/big"),
		regFx("e", nil),
	})
	var out [][]byte
	for _, comp := range compressions {
		blob, _ := build(tb, src, BuildOptions{Compression: comp, ChunkSize: 256, Level: 1})
		out = append(out, blob)
		tocJ, _, _ := rawTOC(tb, comp, blob)
		toc := parseTOCJSON(tb, tocJ)
		for _, e := range toc.Entries {
			if e.Type == TypeChunk {
				e.ChunkDigest = digest.FromString("wrong").String()
				break
			}
		}
		out = append(out, rebuildWithTOC(tb, comp, blob, toc))
	}
	blob, _ := build(tb, src, BuildOptions{ChunkSize: 256, Level: 1})
	tocJ, _, off := rawTOC(tb, Gzip, blob)
	out = append(out, assemble(tb, Gzip, blob[:off], tocJ, true))
	out = append(out, blob[:len(blob)-1], blob[1:])
	return out
}

// TestWriteFuzzCorpus writes the seeds as committed corpus files.
func TestWriteFuzzCorpus(t *testing.T) {
	if os.Getenv("ESTARGZ_WRITE_FUZZ_CORPUS") == "" {
		t.Skip("set ESTARGZ_WRITE_FUZZ_CORPUS=1 to regenerate testdata/fuzz")
	}
	write := func(target string, i int, vals ...any) {
		var b bytes.Buffer
		b.WriteString("go test fuzz v1\n")
		for _, v := range vals {
			switch v := v.(type) {
			case []byte:
				fmt.Fprintf(&b, "[]byte(%q)\n", v)
			case int64:
				fmt.Fprintf(&b, "int64(%d)\n", v)
			case bool:
				fmt.Fprintf(&b, "bool(%v)\n", v)
			}
		}
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i, s := range footerSeeds() {
		write("FuzzParseFooter", i, s.tail, s.size)
	}
	for i, s := range tocSeeds(t) {
		write("FuzzParseTOC", i, s.json, s.payloadEnd)
	}
	for i, b := range blobSeeds(t) {
		write("FuzzOpen", i, b)
	}
	plain := []byte("chunk")
	enc, _ := zstd.NewWriter(nil)
	write("FuzzDecodeChunk", 0, true, enc.EncodeAll(plain, nil), int64(0), int64(5), plain)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(plain)
	zw.Close()
	write("FuzzDecodeChunk", 1, false, gz.Bytes(), int64(1), int64(3), plain[1:4])
}
