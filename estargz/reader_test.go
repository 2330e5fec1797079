package estargz

import (
	"archive/tar"
	"bytes"
	_ "crypto/sha512" // for digest.SHA512
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
)

// --- ParseTOC validation ---

const testPayloadEnd = 1000

// baseTOC is a small valid TOC whose payload region ends at 1000.
func baseTOC() *TOC {
	d := func(s string) string { return digest.FromString(s).String() }
	return &TOC{Version: 1, Entries: []*TOCEntry{
		{Name: "./", Type: TypeDir, Mode: 0o755},
		{Name: "dir/", Type: TypeDir, Mode: 0o755},
		{Name: "dir/f", Type: TypeReg, Size: 10, Offset: 100, ChunkDigest: d("0123456789"), Digest: d("0123456789"), Uname: "u", UID: 5},
		{Name: "big", Type: TypeReg, Size: 25, Offset: 200, ChunkSize: 10, ChunkDigest: d("a"), UID: 5},
		{Name: "big", Type: TypeChunk, Offset: 300, ChunkOffset: 10, ChunkSize: 10, ChunkDigest: d("b")},
		{Name: "big", Type: TypeChunk, Offset: 400, ChunkOffset: 20, ChunkDigest: d("c")},
		{Name: "empty", Type: TypeReg},
		{Name: "link", Type: TypeHardlink, LinkName: "dir/f"},
		{Name: "link2", Type: TypeHardlink, LinkName: "/link"},
		{Name: "sym", Type: TypeSymlink, LinkName: "../../anywhere"},
		{Name: "implicit/dir/file", Type: TypeReg, Size: 1, Offset: 500, ChunkDigest: d("x")},
	}}
}

func tocJSON(t testing.TB, toc *TOC) []byte {
	t.Helper()
	j, err := json.Marshal(toc)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func TestParseTOCValid(t *testing.T) {
	ix, err := ParseTOC(tocJSON(t, baseTOC()), testPayloadEnd, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	f, _ := ix.Lookup("/dir/f")
	if l, _ := ix.Lookup("link"); l != f {
		t.Errorf("hardlink does not share its target's node")
	}
	if l, _ := ix.Lookup("./link2"); l != f || f.NumLink != 3 {
		t.Errorf("hardlink to hardlink: node %v, nlink %d", l, f.NumLink)
	}
	if f.Uname != "u" {
		t.Errorf("uname %q", f.Uname)
	}
	big, _ := ix.Lookup("big")
	if big.Uname != "u" {
		t.Errorf("uname of a later entry with the same uid is %q, want it carried over", big.Uname)
	}
	if len(big.Chunks) != 3 || big.Chunks[2].Size != 5 || big.Chunks[2].End != 500 || big.Chunks[0].End != 300 {
		t.Errorf("big chunks %v", big.Chunks)
	}
	for off, want := range map[int64]int{0: 0, 9: 0, 10: 1, 24: 2, 25: -1, -1: -1} {
		if got := big.ChunkAt(off); got != want {
			t.Errorf("ChunkAt(%d) = %d, want %d", off, got, want)
		}
	}
	if c, _ := ix.Lookup("implicit/dir/file"); c.Chunks[0].End != testPayloadEnd {
		t.Errorf("last chunk ends at %d, want the payload end", c.Chunks[0].End)
	}
	if d, _ := ix.Lookup("implicit"); d.Type != TypeDir || d.Mode != 0o755 || d.NumLink != 3 {
		t.Errorf("implicit dir %+v", d)
	}
	if got := ix.Root().Names(); !slices.Equal(got, []string{"big", "dir", "empty", "implicit", "link", "link2", "sym"}) {
		t.Errorf("root names %q", got)
	}
	if ix.NumNodes() != 9 { // root, dir, dir/f, big, empty, sym, implicit, implicit/dir, file
		t.Errorf("NumNodes %d", ix.NumNodes())
	}
	var walked []string
	ix.Walk(func(name string, n *Node) bool { walked = append(walked, name); return name != "implicit" })
	if want := []string{"", "big", "dir", "dir/f", "empty", "implicit", "link", "link2", "sym"}; !slices.Equal(walked, want) {
		t.Errorf("Walk visited %q, want %q", walked, want)
	}
	if cs := ix.Chunks(); len(cs) != 5 || !slices.IsSortedFunc(cs, func(a, b Chunk) int { return int(a.Offset - b.Offset) }) {
		t.Errorf("Chunks() = %v", cs)
	}
	if ix.TOCDigest != digest.FromBytes(tocJSON(t, baseTOC())) {
		t.Errorf("TOCDigest")
	}
}

func TestParseTOCInvalid(t *testing.T) {
	d := digest.FromString("z").String()
	for _, tc := range []struct {
		name   string
		mutate func(toc *TOC)
		kind   error
		subs   []string
	}{
		{"version", func(toc *TOC) { toc.Version = 2 }, ErrFormat, []string{"version 2"}},
		{"null entry", func(toc *TOC) { toc.Entries = append(toc.Entries, nil) }, ErrFormat, []string{"null"}},
		{"dotdot", func(toc *TOC) { toc.Entries[2].Name = "dir/../../etc/passwd" }, ErrUnsafePath, []string{`".."`, "etc/passwd"}},
		{"dotdot absolute", func(toc *TOC) { toc.Entries[2].Name = "/../etc/passwd" }, ErrUnsafePath, []string{`".."`}},
		{"dotdot only", func(toc *TOC) { toc.Entries[1].Name = ".." }, ErrUnsafePath, []string{`".."`}},
		{"nul", func(toc *TOC) { toc.Entries[2].Name = "dir/f\x00.so" }, ErrUnsafePath, []string{"NUL"}},
		{"hardlink escape", func(toc *TOC) { toc.Entries[7].LinkName = "../../etc/shadow" }, ErrUnsafePath, []string{`".."`, "shadow"}},
		{"long name", func(toc *TOC) { toc.Entries[2].Name = strings.Repeat("a/", 3000) }, ErrFormat, []string{"longer than 4096"}},
		{"duplicate", func(toc *TOC) { toc.Entries = append(toc.Entries, &TOCEntry{Name: "./sym", Type: TypeFifo}) }, ErrFormat, []string{"duplicate", `"sym"`}},
		{"duplicate dir", func(toc *TOC) { toc.Entries = append(toc.Entries, &TOCEntry{Name: "dir", Type: TypeDir}) }, ErrFormat, []string{"duplicate", `"dir"`}},
		{"duplicate hardlink", func(toc *TOC) {
			toc.Entries = append(toc.Entries, &TOCEntry{Name: "link", Type: TypeHardlink, LinkName: "sym"})
		}, ErrFormat, []string{"duplicate", `"link"`}},
		{"file over hardlink", func(toc *TOC) { toc.Entries = append(toc.Entries, &TOCEntry{Name: "link", Type: TypeFifo}) }, ErrFormat, []string{"duplicate"}},
		{"root as file", func(toc *TOC) { toc.Entries[0].Type = TypeFifo }, ErrFormat, []string{"duplicate"}},
		{"root hardlink", func(toc *TOC) { toc.Entries[0] = &TOCEntry{Name: "/", Type: TypeHardlink, LinkName: "sym"} }, ErrFormat, []string{"root"}},
		{"unknown type", func(toc *TOC) { toc.Entries[9].Type = "socket" }, ErrFormat, []string{`"socket"`, `"sym"`}},
		{"parent is a file", func(toc *TOC) {
			toc.Entries = append(toc.Entries, &TOCEntry{Name: "dir/f/x", Type: TypeFifo})
		}, ErrFormat, []string{`parent "dir/f" is a reg`}},
		{"parent is a symlink", func(toc *TOC) {
			toc.Entries = append(toc.Entries, &TOCEntry{Name: "sym/x/y", Type: TypeDir})
		}, ErrFormat, []string{`parent "sym" is a symlink`}},
		{"parent is a hardlink", func(toc *TOC) {
			toc.Entries = append(toc.Entries, &TOCEntry{Name: "link/x", Type: TypeDir})
		}, ErrFormat, []string{`parent "link" is a hardlink`}},
		{"hardlink below a hardlink", func(toc *TOC) {
			toc.Entries = append(toc.Entries, &TOCEntry{Name: "link2/x", Type: TypeHardlink, LinkName: "dir/f"})
		}, ErrFormat, []string{`"link2"`}},
		{"hardlink to missing", func(toc *TOC) { toc.Entries[7].LinkName = "nope" }, ErrFormat, []string{`"nope" does not exist`}},
		{"hardlink to dir", func(toc *TOC) { toc.Entries[7].LinkName = "dir" }, ErrFormat, []string{"directory"}},
		{"hardlink to implicit dir", func(toc *TOC) { toc.Entries[7].LinkName = "implicit" }, ErrFormat, []string{"directory"}},
		{"hardlink to root", func(toc *TOC) { toc.Entries[7].LinkName = "./" }, ErrFormat, []string{"directory"}},
		{"hardlink to itself", func(toc *TOC) { toc.Entries[7].LinkName = "link" }, ErrFormat, []string{"cyclic"}},
		{"hardlink cycle", func(toc *TOC) {
			toc.Entries[7].LinkName = "link2"
			toc.Entries[8].LinkName = "link"
		}, ErrFormat, []string{"cyclic"}},
		{"hardlink long chain", func(toc *TOC) {
			for i := range 40 {
				toc.Entries = append(toc.Entries, &TOCEntry{Name: fmt.Sprint("h", i), Type: TypeHardlink, LinkName: fmt.Sprint("h", i+1)})
			}
			toc.Entries = append(toc.Entries, &TOCEntry{Name: "h40", Type: TypeHardlink, LinkName: "dir/f"})
		}, ErrFormat, []string{"too long"}},
		{"uid", func(toc *TOC) { toc.Entries[1].UID = -1 }, ErrFormat, []string{"uid/gid"}},
		{"gid", func(toc *TOC) { toc.Entries[1].GID = 1 << 33 }, ErrFormat, []string{"uid/gid"}},
		{"dev", func(toc *TOC) { toc.Entries[9].DevMinor = -3 }, ErrFormat, []string{"device numbers"}},
		{"modtime", func(toc *TOC) { toc.Entries[1].ModTime3339 = "yesterday" }, ErrFormat, []string{"modtime", `"dir"`}},
		{"xattr name", func(toc *TOC) { toc.Entries[1].Xattrs = map[string][]byte{"": []byte("x")} }, ErrFormat, []string{"xattr"}},
		{"xattr nul", func(toc *TOC) { toc.Entries[1].Xattrs = map[string][]byte{"user.\x00": nil} }, ErrFormat, []string{"xattr"}},
		{"empty symlink", func(toc *TOC) { toc.Entries[9].LinkName = "" }, ErrFormat, []string{"symlink target"}},
		{"negative size", func(toc *TOC) { toc.Entries[6].Size = -1 }, ErrFormat, []string{"file size -1"}},
		{"huge size", func(toc *TOC) { toc.Entries[6].Size = 1 << 60 }, ErrFormat, []string{"file size"}},
		{"bad file digest", func(toc *TOC) { toc.Entries[2].Digest = "sha256:xyz" }, ErrFormat, []string{"file digest", `"dir/f"`}},
		{"missing chunkDigest", func(toc *TOC) { toc.Entries[2].ChunkDigest = "" }, ErrFormat, []string{"chunkDigest", `"dir/f"`}},
		{"bad chunkDigest", func(toc *TOC) { toc.Entries[4].ChunkDigest = "md5:abc" }, ErrFormat, []string{"chunkDigest", `"big"`}},
		{"chunk without file", func(toc *TOC) {
			toc.Entries = slices.Insert(toc.Entries, 1, &TOCEntry{Name: "big", Type: TypeChunk, Offset: 10, ChunkDigest: d})
		}, ErrFormat, []string{"does not follow"}},
		{"chunk of another file", func(toc *TOC) { toc.Entries[4].Name = "dir/f" }, ErrFormat, []string{"does not follow"}},
		{"chunk after hardlink", func(toc *TOC) {
			toc.Entries = slices.Insert(toc.Entries, 3, &TOCEntry{Name: "l", Type: TypeHardlink, LinkName: "dir/f"},
				&TOCEntry{Name: "dir/f", Type: TypeChunk, Offset: 150, ChunkOffset: 10, ChunkDigest: d})
		}, ErrFormat, []string{"does not follow"}},
		{"file ends early", func(toc *TOC) {
			toc.Entries = slices.Insert(toc.Entries, 4, &TOCEntry{Name: "l", Type: TypeHardlink, LinkName: "dir/f"})
		}, ErrFormat, []string{`"big"`, "chunks cover 10 of 25"}},
		{"overlap", func(toc *TOC) { toc.Entries[4].ChunkOffset = 5 }, ErrFormat, []string{"overlaps", "at offset 5"}},
		{"gap", func(toc *TOC) { toc.Entries[4].ChunkOffset = 12 }, ErrFormat, []string{"gap", "ends at 10"}},
		{"first chunk not at 0", func(toc *TOC) { toc.Entries[3].ChunkOffset = 1 }, ErrFormat, []string{"gap"}},
		{"sizes short", func(toc *TOC) { toc.Entries[5].ChunkSize = 4 }, ErrFormat, []string{"chunks cover 24 of 25"}},
		{"sizes short at end", func(toc *TOC) { toc.Entries[10].Size = 2; toc.Entries[10].ChunkSize = 1 }, ErrFormat, []string{"chunks cover 1 of 2"}},
		{"chunk too big", func(toc *TOC) { toc.Entries[4].ChunkSize = 16 }, ErrFormat, []string{"does not fit"}},
		{"chunk beyond file", func(toc *TOC) {
			toc.Entries = slices.Insert(toc.Entries, 6, &TOCEntry{Name: "big", Type: TypeChunk, Offset: 450, ChunkOffset: 25, ChunkDigest: d})
		}, ErrFormat, []string{"does not fit"}},
		{"negative chunk size", func(toc *TOC) { toc.Entries[4].ChunkSize = -10 }, ErrFormat, []string{"negative"}},
		{"negative inner offset", func(toc *TOC) { toc.Entries[4].InnerOffset = -1 }, ErrFormat, []string{"negative"}},
		{"negative offset", func(toc *TOC) { toc.Entries[2].Offset = -100 }, ErrFormat, []string{"outside the payload region", "offset -100"}},
		{"offset at payload end", func(toc *TOC) { toc.Entries[4].Offset = testPayloadEnd }, ErrFormat, []string{"outside the payload region"}},
		{"offset past blob", func(toc *TOC) { toc.Entries[5].Offset = 1 << 50 }, ErrFormat, []string{"outside the payload region"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			toc := baseTOC()
			tc.mutate(toc)
			ix, err := ParseTOC(tocJSON(t, toc), testPayloadEnd, Limits{})
			if ix != nil {
				t.Errorf("got an Index with the error")
			}
			wantErr(t, err, tc.kind, tc.subs...)
		})
	}
}

func TestParseTOCAcceptsOffsetZero(t *testing.T) {
	// A builder that shares members between small files may start the
	// first payload inside the first member (upstream WithMinChunkSize).
	toc := baseTOC()
	toc.Entries[2].Offset, toc.Entries[2].InnerOffset = 0, 1024
	ix, err := ParseTOC(tocJSON(t, toc), testPayloadEnd, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if f, _ := ix.Lookup("dir/f"); f.Chunks[0].Offset != 0 || f.Chunks[0].End != 200 || f.Chunks[0].InnerOffset != 1024 {
		t.Errorf("chunk %v", f.Chunks[0])
	}
}

func TestParseTOCLimits(t *testing.T) {
	j := tocJSON(t, baseTOC())
	_, err := ParseTOC(j, testPayloadEnd, Limits{MaxTOCSize: int64(len(j) - 1)})
	wantErr(t, err, ErrTOCTooLarge, fmt.Sprint(len(j)), "limit")
	if _, err := ParseTOC(j, testPayloadEnd, Limits{MaxTOCSize: int64(len(j))}); err != nil {
		t.Errorf("TOC of exactly the limit: %v", err)
	}
	n := len(baseTOC().Entries)
	_, err = ParseTOC(j, testPayloadEnd, Limits{MaxEntries: n - 1})
	wantErr(t, err, ErrTOCTooLarge, "entries")
	if _, err := ParseTOC(j, testPayloadEnd, Limits{MaxEntries: n}); err != nil {
		t.Errorf("entries at the limit: %v", err)
	}
	_, err = ParseTOC([]byte(`{"version":1,"entries":[`), testPayloadEnd, Limits{})
	wantErr(t, err, ErrFormat, "JSON")
	_, err = ParseTOC([]byte(`{"version":1,"entries":{}}`), testPayloadEnd, Limits{})
	wantErr(t, err, ErrFormat, "JSON")
}

// Entries cost memory however little JSON they take: the limit must be
// enforced before decoding, for every shape of array element.
func TestParseTOCEntryCountBeforeDecoding(t *testing.T) {
	for _, elem := range []string{"{}", "0", "null", `""`, "[]", `{"name":"a{[\"\\","xattrs":{"k":"dg=="}}`} {
		j := []byte(`{"version":1,"entries":[` + strings.Repeat(elem+",", 200000) + elem + `]}`)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := ParseTOC(j, testPayloadEnd, Limits{MaxEntries: 1000})
		runtime.ReadMemStats(&after)
		wantErr(t, err, ErrTOCTooLarge, "more than 1000 entries")
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20 {
			t.Errorf("%s: rejecting %d bytes of JSON allocated %d bytes", elem, len(j), alloc)
		}
	}
	// Exact at the limit, with strings and nested values that look like
	// structure.
	var toc TOC
	toc.Version = 1
	for i := range 1000 {
		toc.Entries = append(toc.Entries, &TOCEntry{Name: fmt.Sprintf("f[%d],{\"x\"", i), Type: TypeFifo,
			Xattrs: map[string][]byte{"user.a": []byte("[,]")}})
	}
	j := tocJSON(t, &toc)
	if _, err := ParseTOC(j, testPayloadEnd, Limits{MaxEntries: 1000}); err != nil {
		t.Errorf("1000 entries with limit 1000: %v", err)
	}
	wantErr(t, func() error { _, err := ParseTOC(j, testPayloadEnd, Limits{MaxEntries: 999}); return err }(), ErrTOCTooLarge)
}

func TestParseTOCDeepNamesAreCheap(t *testing.T) {
	// Names as deep as PATH_MAX allows, each in a fresh tree: indexing
	// must stay linear in the TOC size.
	var toc TOC
	toc.Version = 1
	for i := range 500 {
		toc.Entries = append(toc.Entries, &TOCEntry{Name: fmt.Sprintf("%c", 'a'+i%26) + strings.Repeat(fmt.Sprintf("/%d", i), 4000/(len(fmt.Sprint(i))+1)), Type: TypeFifo})
	}
	// What bounds the work is the implied-directory limit: the TOC is
	// refused once its names imply too many directories (the speed of
	// indexing is BenchmarkOpen's business, not a timed unit test's).
	_, err := ParseTOC(tocJSON(t, &toc), testPayloadEnd, Limits{})
	wantErr(t, err, ErrTOCTooLarge, "directories")
	// A few of them are fine.
	toc.Entries = toc.Entries[:10]
	if _, err := ParseTOC(tocJSON(t, &toc), testPayloadEnd, Limits{}); err != nil {
		t.Errorf("10 deep names: %v", err)
	}
}

// --- footers ---

func TestParseFooterValid(t *testing.T) {
	for _, tc := range []struct {
		name   string
		footer []byte
		want   Footer
	}{
		{"gzip", handGzipFooter(0x1234, false), Footer{Compression: Gzip, Size: 51, TOCOffset: 0x1234, TOCCompressedSize: 10000 - 51 - 0x1234, PayloadEnd: 0x1234}},
		{"legacy", handGzipFooter(0x1234, true), Footer{Compression: Gzip, Legacy: true, Size: 47, TOCOffset: 0x1234, TOCCompressedSize: 10000 - 47 - 0x1234, PayloadEnd: 0x1234}},
		{"zstd", handZstdFooter(5000, 100, 400, 1), Footer{Compression: Zstd, Size: 48, TOCOffset: 5000, TOCCompressedSize: 100, TOCSize: 400, PayloadEnd: 4992}},
	} {
		// With exactly the footer, and with more tail before it.
		for _, pre := range [][]byte{nil, bytes.Repeat([]byte{0xaa}, 100)} {
			f, err := ParseFooter(append(slices.Clone(pre), tc.footer...), 10000)
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
				continue
			}
			if *f != tc.want {
				t.Errorf("%s: %+v, want %+v", tc.name, *f, tc.want)
			}
		}
	}
	// Upper-case hex digits are read too.
	ft := handGzipFooter(0xabc, false)
	copy(ft[16:32], "0000000000000ABC")
	if f, err := ParseFooter(ft, 10000); err != nil || f.TOCOffset != 0xabc {
		t.Errorf("upper-case offset: %v %v", f, err)
	}
}

func TestParseFooterInvalid(t *testing.T) {
	const size = 10000
	set := func(b []byte, i int, v ...byte) []byte { b = slices.Clone(b); copy(b[i:], v); return b }
	gz := handGzipFooter(0x100, false)
	lg := handGzipFooter(0x100, true)
	zs := handZstdFooter(5000, 100, 400, 1)
	for _, tc := range []struct {
		name string
		tail []byte
		size int64
		kind error
		subs []string
	}{
		{"gzip magic", set(gz, 0, 0x1f, 0x8c), size, ErrNotEStargz, []string{"no eStargz"}},
		{"gzip flags", set(gz, 3, 0x0c), size, ErrNotEStargz, []string{"no eStargz"}},
		{"gzip subfield id", set(gz, 12, 'S', 'X'), size, ErrFormat, []string{"SG"}},
		{"gzip subfield len", set(gz, 14, 21), size, ErrFormat, []string{"SG of length 22"}},
		{"gzip magic string", set(gz, 32, 'X'), size, ErrFormat, []string{"STARGZ"}},
		{"gzip hex", set(gz, 20, 'g'), size, ErrFormat, []string{"16 hex digits"}},
		{"gzip hex overflow", set(gz, 16, 'f', 'f', 'f', 'f'), size, ErrFormat, []string{"16 hex digits"}},
		{"gzip stored block", set(gz, 38, 0), size, ErrFormat, []string{"stored block"}},
		{"gzip trailer", set(gz, 50, 1), size, ErrFormat, []string{"zero trailer"}},
		{"gzip offset past blob", handGzipFooter(size, false), size, ErrFormat, []string{"outside the blob"}},
		{"gzip offset in footer", handGzipFooter(size-51, false), size, ErrFormat, []string{"outside the blob"}},
		{"legacy magic string", set(lg, 28, 'X'), size, ErrFormat, []string{"legacy", "STARGZ"}},
		{"legacy hex", set(lg, 13, 'z'), size, ErrFormat, []string{"legacy", "hex"}},
		{"legacy trailer", set(lg, 46, 9), size, ErrFormat, []string{"legacy", "trailer"}},
		{"legacy offset", handGzipFooter(size, true), size, ErrFormat, []string{"legacy", "outside the blob"}},
		{"zstd frame magic", set(zs, 0, 0x51), size, ErrFormat, []string{"skippable frame"}},
		{"zstd frame length", set(zs, 4, 41), size, ErrFormat, []string{"skippable frame"}},
		{"zstd manifest type", handZstdFooter(5000, 100, 400, 2), size, ErrFormat, []string{"manifest type 2"}},
		{"zstd offset small", handZstdFooter(4, 100, 400, 1), size, ErrFormat, []string{"does not fit"}},
		{"zstd offset past blob", handZstdFooter(size, 100, 400, 1), size, ErrFormat, []string{"does not fit"}},
		{"zstd offset huge", handZstdFooter(1<<63, 100, 400, 1), size, ErrFormat, []string{"does not fit"}},
		{"zstd size overruns footer", handZstdFooter(5000, size-5000-47, 400, 1), size, ErrFormat, []string{"does not fit"}},
		{"zstd size huge", handZstdFooter(5000, 1<<63, 400, 1), size, ErrFormat, []string{"does not fit"}},
		{"zstd size zero", handZstdFooter(5000, 0, 400, 1), size, ErrFormat, []string{"does not fit"}},
		{"zstd uncompressed huge", handZstdFooter(5000, 100, 1<<50, 1), size, ErrFormat, []string{"claims"}},
		{"zstd short", zs[1:], size, ErrFormat, []string{"needs 48 bytes"}},
		{"tail longer than blob", gz, 50, ErrFormat, []string{"longer than the blob"}},
		{"tiny blob", gz[:20], 20, ErrNotEStargz, []string{"too small"}},
		{"empty blob", nil, 0, ErrNotEStargz, []string{"too small"}},
		{"zeros", make([]byte, 64), size, ErrNotEStargz, []string{"no eStargz"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := ParseFooter(tc.tail, tc.size)
			if f != nil {
				t.Errorf("got a footer %+v", f)
			}
			wantErr(t, err, tc.kind, tc.subs...)
		})
	}
	rng := rand.New(rand.NewSource(5))
	for range 1000 {
		tail := fixture.RandomFrom(rng, 51+rng.Intn(100))
		_, err := ParseFooter(tail, 1<<20)
		wantErr(t, err, ErrNotEStargz)
	}
}

// --- Open ---

// countingReaderAt counts ReadAt calls and bytes.
type countingReaderAt struct {
	r     io.ReaderAt
	reads atomic.Int64
	bytes atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	c.bytes.Add(int64(len(p)))
	return c.r.ReadAt(p, off)
}

func TestOpenReadCount(t *testing.T) {
	rng := rand.New(rand.NewSource(9))
	var ents []fixture.Entry
	for i := range 800 {
		ents = append(ents, regFx(fmt.Sprintf("dir%d/file-with-a-longish-name-%d", i%50, i), fixture.TextFrom(rng, 10+rng.Intn(200))))
	}
	ents = append(ents, regFx("big", fixture.RandomFrom(rng, 400<<10)))
	src := fixture.Tar(t, ents)
	smallSrc := fixture.Tar(t, richFixture(tar.FormatPAX, ""))
	for _, comp := range compressions {
		blob, _ := build(t, src, BuildOptions{Compression: comp, ChunkSize: 64 << 10, Level: 1})
		small, _ := build(t, smallSrc, BuildOptions{Compression: comp, Level: 1})
		_, compressedTOC, _ := rawTOC(t, comp, blob)
		for _, tc := range []struct {
			name  string
			blob  []byte
			tail  int64
			reads int64
		}{
			{"TOC in default tail", blob, 0, 1},
			{"small blob", small, 0, 1},
			{"TOC outside tail", blob, int64(len(compressedTOC)) / 2, 2},
			{"minimal tail", blob, 1, 2},
			{"tail larger than blob", small, 1 << 30, 1},
		} {
			cr := &countingReaderAt{r: bytes.NewReader(tc.blob)}
			r, err := Open(cr, int64(len(tc.blob)), OpenOptions{TailSize: tc.tail})
			if err != nil {
				t.Fatalf("%v %s: %v", comp, tc.name, err)
			}
			if got := cr.reads.Load(); got != tc.reads {
				t.Errorf("%v %s: %d reads, want %d", comp, tc.name, got, tc.reads)
			}
			if got := cr.bytes.Load(); got > max(tc.tail, DefaultTailSize)+int64(len(compressedTOC))+MaxFooterSize {
				t.Errorf("%v %s: read %d bytes", comp, tc.name, got)
			}
			if r.NumNodes() < 3 {
				t.Errorf("%v %s: %d nodes", comp, tc.name, r.NumNodes())
			}
		}
		if len(blob) <= DefaultTailSize {
			t.Fatalf("the big blob (%d bytes) fits in the default tail", len(blob))
		}
	}
}

func TestOpenLegacyFooter(t *testing.T) {
	src := fixture.Tar(t, richFixture(tar.FormatPAX, ""))
	blob, _ := build(t, src, BuildOptions{ChunkSize: testChunk})
	tocJ, _, off := rawTOC(t, Gzip, blob)
	legacy := assemble(t, Gzip, blob[:off], tocJ, true)
	if !bytes.Equal(legacy[len(legacy)-47:], handGzipFooter(off, true)) || len(legacy) == len(blob) {
		t.Fatalf("test blob does not end with a legacy footer")
	}
	r := openBlob(t, legacy, OpenOptions{TOCDigest: digest.FromBytes(tocJ)})
	if !r.Footer.Legacy || r.Footer.Size != 47 || r.Footer.TOCOffset != off {
		t.Errorf("footer %+v", r.Footer)
	}
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	checkIndexAgainstTar(t, r, fixture.Read(t, (src)), compareOpts{chunkSize: testChunk})
	// The legacy blob is still a valid tar.gz.
	if got := decompressAll(t, Gzip, legacy); !bytes.Equal(got, decompressAll(t, Gzip, assemble(t, Gzip, blob[:off], tocJ, false))) {
		t.Errorf("legacy blob decompresses differently")
	}
}

func TestOpenInvalid(t *testing.T) {
	src := fixture.Tar(t, []fixture.Entry{regFx("a", []byte("hello")), regFx("b", bytes.Repeat([]byte("b"), 5000))})
	for _, comp := range compressions {
		blob, res := build(t, src, BuildOptions{Compression: comp})
		tocJ, compressed, off := rawTOC(t, comp, blob)
		payloadEnd := off
		if comp == Zstd {
			payloadEnd -= 8
		}
		payload := blob[:payloadEnd]
		open := func(b []byte, opts OpenOptions) error {
			_, err := Open(bytes.NewReader(b), int64(len(b)), opts)
			return err
		}
		t.Run(comp.String(), func(t *testing.T) {
			wantErr(t, open(blob, OpenOptions{TOCDigest: digest.FromString("x")}), ErrDigest, "TOC digest", res.TOCDigest.String())
			if err := open(blob, OpenOptions{TOCDigest: res.TOCDigest}); err != nil {
				t.Errorf("right TOC digest: %v", err)
			}
			wantErr(t, open(blob, OpenOptions{Limits: Limits{MaxTOCSize: int64(len(compressed)) - 1}}), ErrTOCTooLarge, "compressed TOC")
			wantErr(t, open(blob, OpenOptions{Limits: Limits{MaxTOCSize: int64(len(tocJ)) - 1, MaxEntries: 0}}), ErrTOCTooLarge)
			wantErr(t, open(blob, OpenOptions{Limits: Limits{MaxEntries: 2}}), ErrTOCTooLarge, "entries")
			wantErr(t, open(blob[:len(blob)-1], OpenOptions{}), ErrNotEStargz)
			wantErr(t, open(blob[:len(blob)-30], OpenOptions{}), ErrNotEStargz)
			wantErr(t, open(blob[10:], OpenOptions{}), ErrFormat)
			wantErr(t, open(blob[:40], OpenOptions{}), ErrNotEStargz, "too small")
			wantErr(t, open(nil, OpenOptions{}), ErrNotEStargz)
			_, err := Open(bytes.NewReader(blob), -5, OpenOptions{})
			wantErr(t, err, ErrFormat, "negative")
			// A TOC that is not valid JSON.
			wantErr(t, open(assemble(t, comp, payload, []byte("{not json"), false), OpenOptions{}), ErrFormat, "JSON")
			// A TOC whose chunk points past the payload region.
			toc := parseTOCJSON(t, tocJ)
			toc.Entries[len(toc.Entries)-1].Offset = payloadEnd + 10
			wantErr(t, open(rebuildWithTOC(t, comp, blob, toc), OpenOptions{}), ErrFormat, "outside the payload region")
		})
	}

	// gzip-specific TOC member problems.
	blob, _ := build(t, src, BuildOptions{})
	tocJ, _, off := rawTOC(t, Gzip, blob)
	payload := blob[:off]
	withMember := func(member []byte) []byte {
		b := append(slices.Clone(payload), member...)
		return append(b, handGzipFooter(off, false)...)
	}
	tarWith := func(h *tar.Header, body []byte) []byte {
		var tb bytes.Buffer
		tw := tar.NewWriter(&tb)
		tw.WriteHeader(h)
		tw.Write(body)
		tw.Close()
		return tb.Bytes()
	}
	open := func(b []byte, l Limits) error {
		_, err := Open(bytes.NewReader(b), int64(len(b)), OpenOptions{Limits: l})
		return err
	}
	wantErr(t, open(withMember([]byte("not a gzip member at all")), Limits{}), ErrFormat, "not gzip")
	wantErr(t, open(withMember(fixture.Gzip(t, []byte("short"))), Limits{}), ErrFormat, "TOC tar header")
	wantErr(t, open(withMember(fixture.Gzip(t, tarWith(&tar.Header{Name: "other.json", Typeflag: tar.TypeReg, Size: 2}, []byte("{}")))), Limits{}),
		ErrFormat, `"other.json"`, TOCTarName)
	wantErr(t, open(withMember(fixture.Gzip(t, tarWith(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeDir}, nil))), Limits{}),
		ErrFormat, "regular file")
	// The header claims more than the limit: rejected before reading.
	big := tarWith(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeReg, Size: 1 << 32}, nil)
	wantErr(t, open(withMember(fixture.Gzip(t, big[:512])), Limits{}), ErrTOCTooLarge, "limit")
	// The header claims more than the member holds (but within the
	// limit): an error, without allocating the claimed size.
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	hdr := tarWith(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeReg, Size: 100 << 20}, nil)[:512]
	wantErr(t, open(withMember(fixture.Gzip(t, append(hdr, tocJ...))), Limits{}), ErrFormat, "reading the TOC")
	runtime.ReadMemStats(&after)
	if a := after.TotalAlloc - before.TotalAlloc; a > 20<<20 {
		t.Errorf("a TOC header claiming 100 MiB made Open allocate %d bytes", a)
	}
	// Trailing garbage after the TOC entry inside its member is ignored,
	// a corrupt member is not.
	m := fixture.Gzip(t, tarWith(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeReg, Size: int64(len(tocJ))}, tocJ))
	m[len(m)/2] ^= 0xff
	if err := open(withMember(m), Limits{}); !errors.Is(err, ErrFormat) {
		t.Errorf("corrupt TOC member: %v", err)
	}
}

func TestOpenZstdTOCLimits(t *testing.T) {
	src := fixture.Tar(t, []fixture.Entry{regFx("a", []byte("hello"))})
	blob, _ := build(t, src, BuildOptions{Compression: Zstd})
	tocJ, _, off := rawTOC(t, Zstd, blob)
	payload := blob[:off-8]
	enc, _ := zstd.NewWriter(nil)
	withFrame := func(compressed []byte, usize uint64) []byte {
		b := binary.LittleEndian.AppendUint32(append(slices.Clone(payload), 0x50, 0x2a, 0x4d, 0x18), uint32(len(compressed)))
		b = append(b, compressed...)
		return append(b, handZstdFooter(uint64(off), uint64(len(compressed)), usize, 1)...)
	}
	open := func(b []byte, l Limits) error {
		_, err := Open(bytes.NewReader(b), int64(len(b)), OpenOptions{Limits: l})
		return err
	}
	good := enc.EncodeAll(tocJ, nil)
	if err := open(withFrame(good, uint64(len(tocJ))), Limits{}); err != nil {
		t.Fatalf("hand-made zstd TOC: %v", err)
	}
	if err := open(withFrame(good, 0), Limits{}); err != nil {
		t.Errorf("footer without uncompressed size: %v", err)
	}
	wantErr(t, open(withFrame(good, uint64(len(tocJ))), Limits{MaxTOCSize: int64(len(tocJ)) - 1}), ErrTOCTooLarge, "footer says")
	wantErr(t, open(withFrame(good, uint64(len(tocJ))+1), Limits{}), ErrFormat, "footer says")
	wantErr(t, open(withFrame(good, 0), Limits{MaxTOCSize: int64(len(tocJ)) - 1}), ErrTOCTooLarge)
	wantErr(t, open(withFrame([]byte("garbage, not zstd"), 0), Limits{}), ErrFormat, "zstd TOC")
	// Bombs: 64 MiB of spaces in a small frame, with the footer not
	// saying how big; once with the size in the frame header, once
	// streamed with a small window. Rejected quickly without
	// decompressing it all.
	spaces := bytes.Repeat([]byte(" "), 64<<20)
	var streamed bytes.Buffer
	sw, _ := zstd.NewWriter(&streamed, zstd.WithWindowSize(1<<17))
	sw.Write(spaces)
	sw.Close()
	for i, bomb := range [][]byte{enc.EncodeAll(spaces, nil), streamed.Bytes()} {
		start := time.Now()
		msg := []string{"zstd TOC frame needs more than"}
		if i == 1 {
			msg = []string{"decompresses to more than"}
		}
		wantErr(t, open(withFrame(bomb, 0), Limits{MaxTOCSize: 1 << 20}), ErrTOCTooLarge, msg...)
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("zstd TOC bomb took %v", d)
		}
	}
}

// --- chunks ---

func TestDecodeChunk(t *testing.T) {
	plain := []byte("the chunk's plain bytes, and some more after them")
	c := Chunk{Size: 24, Digest: digest.FromBytes(plain[:24])}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(plain)
	zw.Close()
	enc, _ := zstd.NewWriter(nil)
	members := map[Compression][]byte{Gzip: gz.Bytes(), Zstd: enc.EncodeAll(plain, nil)}
	dec := NewDecoder()
	for comp, m := range members {
		got, err := dec.DecodeChunk(comp, m, c, nil)
		if err != nil || !bytes.Equal(got, plain[:24]) {
			t.Errorf("%v: %q, %v", comp, got, err)
		}
		// Reuses a large enough buffer.
		buf := make([]byte, 0, 100)
		if got, _ := dec.DecodeChunk(comp, m, c, buf); &got[0] != &buf[:1][0] {
			t.Errorf("%v: buffer not reused", comp)
		}
		// Inner offset.
		ci := Chunk{InnerOffset: 4, Size: 5, Digest: digest.FromString("chunk")}
		if got, err := dec.DecodeChunk(comp, m, ci, nil); err != nil || string(got) != "chunk" {
			t.Errorf("%v inner: %q, %v", comp, got, err)
		}
		bad := c
		bad.Digest = digest.FromString("other")
		_, err = dec.DecodeChunk(comp, m, bad, nil)
		wantErr(t, err, ErrDigest, "hash to", bad.Digest.String())
		bad.Digest = digest.SHA512.FromBytes(plain[:24])
		_, err = dec.DecodeChunk(comp, m, bad, nil)
		wantErr(t, err, ErrDigest, "algorithm")
		long := Chunk{Size: int64(len(plain)) + 1, Digest: digest.FromBytes(plain), Offset: 77}
		_, err = dec.DecodeChunk(comp, m, long, nil)
		wantErr(t, err, ErrFormat, "decompressing", "unexpected EOF", "offset 77")
		far := Chunk{InnerOffset: 100, Size: 1, Digest: c.Digest}
		_, err = dec.DecodeChunk(comp, m, far, nil)
		wantErr(t, err, ErrFormat, "skipping")
		_, err = dec.DecodeChunk(comp, m[:len(m)/2], c, nil)
		wantErr(t, err, ErrFormat)
		_, err = dec.DecodeChunk(comp, []byte("nonsense"), c, nil)
		wantErr(t, err, ErrFormat)
		_, err = dec.DecodeChunk(comp, nil, c, nil)
		wantErr(t, err, ErrFormat)
		_, err = dec.DecodeChunk(comp, m, Chunk{Size: -1, Digest: c.Digest}, nil)
		wantErr(t, err, ErrFormat, "geometry")
		// An empty chunk of an empty member decodes to nothing.
		if got, err := dec.DecodeChunk(comp, m, Chunk{Digest: digest.FromBytes(nil)}, nil); err != nil || len(got) != 0 {
			t.Errorf("%v empty: %q %v", comp, got, err)
		}
	}
	// A gzip member followed by another: only the first counts.
	two := append(slices.Clone(members[Gzip]), members[Gzip]...)
	_, err := dec.DecodeChunk(Gzip, two, Chunk{Size: int64(len(plain)) + 5, Digest: c.Digest}, nil)
	wantErr(t, err, ErrFormat, "unexpected EOF")
}

// A member that decompresses to far more than the chunk's size, or a
// chunk that claims to be huge, costs neither time nor memory.
func TestDecodeChunkBomb(t *testing.T) {
	zeros := make([]byte, 32<<20)
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	zw.Write(zeros)
	zw.Close()
	enc, _ := zstd.NewWriter(nil)
	members := map[Compression][]byte{Gzip: gz.Bytes(), Zstd: enc.EncodeAll(zeros, nil)}
	zeros = nil
	dec := NewDecoder()
	for comp, m := range members {
		if len(m) > 2<<20 {
			t.Fatalf("%v bomb is %d bytes", comp, len(m))
		}
		for _, c := range []Chunk{
			{Size: 4096, Digest: digest.FromBytes(make([]byte, 4096))},         // honest size
			{Size: 4096, Digest: digest.FromString("wrong")},                   // wrong digest
			{Size: 1 << 40, Digest: digest.FromString("wrong")},                // 1 TiB claimed, 32 MiB there
			{Size: maxFileSize, Digest: digest.FromString("x")},                // the largest size a TOC may hold
			{Size: 4096, InnerOffset: 30 << 20, Digest: digest.FromString("")}, // inner offset inside
		} {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, err := dec.DecodeChunk(comp, m, c, nil)
			d := time.Since(start)
			runtime.ReadMemStats(&after)
			if c.Size == 4096 && c.InnerOffset == 0 && c.Digest == digest.FromBytes(make([]byte, 4096)) {
				if err != nil {
					t.Errorf("%v: honest chunk of a bomb: %v", comp, err)
				}
			} else if err == nil {
				t.Errorf("%v %+v: no error", comp, c)
			}
			if d > 15*time.Second {
				t.Errorf("%v %+v: took %v", comp, c, d)
			}
			// The decoder may allocate its window (bounded by
			// maxChunkDecodeWindow); claimed-huge sizes may grow a buffer
			// up to what the member really holds (32 MiB), never to what
			// is claimed.
			limit := uint64(maxChunkDecodeWindow + 1<<20)
			if c.Size > 1<<30 {
				limit = 256 << 20
			}
			if a := after.TotalAlloc - before.TotalAlloc; a > limit {
				t.Errorf("%v %+v: allocated %d bytes", comp, c, a)
			}
		}
	}
}

func TestReadChunkOutsideBlob(t *testing.T) {
	blob, _ := build(t, fixture.Tar(t, []fixture.Entry{regFx("a", []byte("abc"))}), BuildOptions{})
	r := openBlob(t, blob, OpenOptions{})
	n, _ := r.Lookup("a")
	for _, c := range []Chunk{
		{Offset: 10, End: int64(len(blob)) + 1, Size: 3, Digest: n.Chunks[0].Digest},
		{Offset: 10, End: 10, Size: 3, Digest: n.Chunks[0].Digest},
	} {
		_, err := r.ReadChunk(c, nil)
		wantErr(t, err, ErrFormat, "outside the blob")
	}
	got, err := r.ReadChunk(n.Chunks[0], nil)
	if err != nil || string(got) != "abc" {
		t.Errorf("ReadChunk: %q %v", got, err)
	}
	if _, err := r.OpenFile("missing"); err == nil {
		t.Errorf("OpenFile of a missing file")
	}
	if _, err := r.OpenFile(""); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("OpenFile of the root: %v", err)
	}
}

// --- Verify ---

func TestVerifyDetectsCorruption(t *testing.T) {
	rng := rand.New(rand.NewSource(4))
	src := fixture.Tar(t, []fixture.Entry{
		regFx("a", fixture.TextFrom(rng, 3000)),
		regFx("b", fixture.TextFrom(rng, 3*testChunk+5)),
		regFx("c", fixture.TextFrom(rng, 3000)),
		linkFx("h", "b"),
	})
	for _, comp := range compressions {
		blob, _ := build(t, src, BuildOptions{Compression: comp, ChunkSize: testChunk})
		tocJ, _, _ := rawTOC(t, comp, blob)
		idx := func(toc *TOC, name string, nth int) *TOCEntry {
			for _, e := range toc.Entries {
				if e.Name == name && (e.Type == TypeReg || e.Type == TypeChunk) {
					if nth == 0 {
						return e
					}
					nth--
				}
			}
			t.Fatalf("no entry %s/%d", name, nth)
			return nil
		}
		t.Run(comp.String(), func(t *testing.T) {
			// Wrong chunk digest in the TOC.
			toc := parseTOCJSON(t, tocJ)
			idx(toc, "b", 2).ChunkDigest = digest.FromString("tampered").String()
			r := openBlob(t, rebuildWithTOC(t, comp, blob, toc), OpenOptions{})
			err := r.Verify()
			wantErr(t, err, ErrDigest, `"b"`, fmt.Sprintf("offset %d", 2*testChunk), "tampered"[:0])
			f, _ := r.OpenFile("h")
			_, err = io.ReadAll(f)
			wantErr(t, err, ErrDigest, `"b"`)
			// A chunk pointing at another file's member of the same size.
			toc = parseTOCJSON(t, tocJ)
			idx(toc, "a", 0).Offset = idx(toc, "c", 0).Offset
			r = openBlob(t, rebuildWithTOC(t, comp, blob, toc), OpenOptions{})
			wantErr(t, r.Verify(), ErrDigest, `"a"`, "hash to")
			// Whole-file digest wrong, chunk digests right.
			toc = parseTOCJSON(t, tocJ)
			idx(toc, "b", 0).Digest = digest.FromString("nope").String()
			r = openBlob(t, rebuildWithTOC(t, comp, blob, toc), OpenOptions{})
			wantErr(t, r.Verify(), ErrDigest, `"b"`, "file content")
			// A corrupted compressed byte: a format or digest error.
			bad := slices.Clone(blob)
			n, _ := openBlob(t, blob, OpenOptions{}).Lookup("c")
			bad[n.Chunks[0].Offset+20] ^= 0x55
			err = openBlob(t, bad, OpenOptions{}).Verify()
			if !errors.Is(err, ErrFormat) && !errors.Is(err, ErrDigest) {
				t.Errorf("corrupted member: %v", err)
			}
			var e *Error
			if errors.As(err, &e) && e.Entry != "c" {
				t.Errorf("corrupted member: error names %q, want c", e.Entry)
			}
			// A file size that runs past its member's plain bytes.
			toc = parseTOCJSON(t, tocJ)
			last := idx(toc, "c", 0)
			last.Size += 1 << 20
			last.ChunkSize = 0
			r = openBlob(t, rebuildWithTOC(t, comp, blob, toc), OpenOptions{})
			if err := r.Verify(); !errors.Is(err, ErrFormat) && !errors.Is(err, ErrDigest) {
				t.Errorf("oversized last chunk: %v", err)
			}
		})
	}
}

func TestErrorFormatting(t *testing.T) {
	cause := io.ErrUnexpectedEOF
	e := wrapErr(ErrFormat, "a/b", 12, cause, "reading %d", 3)
	if got := e.Error(); got != `estargz: malformed eStargz: entry "a/b" at offset 12: reading 3: unexpected EOF` {
		t.Errorf("Error() = %q", got)
	}
	if !errors.Is(e, ErrFormat) || !errors.Is(e, io.ErrUnexpectedEOF) || errors.Is(e, ErrDigest) {
		t.Errorf("errors.Is does not match kind and cause")
	}
	if got := errorf(ErrDigest, "", -1, "x").Error(); got != "estargz: digest mismatch: x" {
		t.Errorf("Error() = %q", got)
	}
}
