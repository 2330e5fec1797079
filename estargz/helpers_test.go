package estargz

// Test helpers: tar fixtures, independent decoders for blobs, TOC and
// footers (written without the package's own code paths), and the
// comparison of an Index against the tar it was built from.

import (
	"archive/tar"
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
)

var fixtureTime = time.Date(2024, 5, 17, 10, 20, 30, 0, time.UTC)

// plainFx is e at fixtureTime, without owner names and without a tar
// format: the tar writer picks the simplest that fits, unless a fixture
// sets Header.Format (USTAR, PAX or GNU per entry).
func plainFx(e fixture.Entry) fixture.Entry {
	e.Header.Format, e.Header.Uname, e.Header.Gname = tar.FormatUnknown, "", ""
	return e.At(fixtureTime)
}

func dirFx(name string) fixture.Entry { return plainFx(fixture.Dir(name, 0o755)) }

func regFx(name string, data []byte) fixture.Entry {
	return plainFx(fixture.Reg(name, 0o644, data))
}

func symFx(name, target string) fixture.Entry { return plainFx(fixture.Symlink(name, target)) }

func linkFx(name, target string) fixture.Entry {
	e := plainFx(fixture.Hardlink(name, target))
	e.Header.Mode = 0o644
	return e
}

func mustClean(t testing.TB, name string) string {
	t.Helper()
	n, err := CleanName(name)
	if err != nil {
		t.Fatalf("CleanName(%q): %v", name, err)
	}
	return n
}

// finalState applies "the later entry wins" to a tar's entries the way an
// extractor does: a later entry replaces an earlier one of the same name,
// and a non-directory replacing a directory (explicit or implicit) removes
// everything below it. Global headers are ignored. The result is keyed by
// cleaned name, in first-kept order.
func finalState(t testing.TB, ents []fixture.Entry) (map[string]fixture.Entry, []string) {
	t.Helper()
	m := map[string]fixture.Entry{}
	var order []string
	for _, e := range ents {
		if e.Header.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		name := mustClean(t, e.Header.Name)
		switch name {
		case TOCTarName, PrefetchLandmark, NoPrefetchLandmark:
			continue
		}
		if e.Header.Typeflag != tar.TypeDir {
			for k := range m {
				if strings.HasPrefix(k, name+"/") {
					delete(m, k)
				}
			}
		}
		if _, ok := m[name]; !ok {
			order = append(order, name)
		} else {
			order = slices.DeleteFunc(order, func(s string) bool { return s == name })
			order = append(order, name)
		}
		m[name] = e
	}
	order = slices.DeleteFunc(order, func(s string) bool { _, ok := m[s]; return !ok })
	return m, order
}

// xattrsOf is fixture.Xattrs with the values as bytes, as a TOC has them.
func xattrsOf(h *tar.Header) map[string][]byte {
	var m map[string][]byte
	for k, v := range fixture.Xattrs(h) {
		if m == nil {
			m = map[string][]byte{}
		}
		m[k] = []byte(v)
	}
	return m
}

func tarTypeToTOC(f byte) string {
	switch f {
	case tar.TypeReg, tar.TypeRegA:
		return TypeReg
	case tar.TypeDir:
		return TypeDir
	case tar.TypeSymlink:
		return TypeSymlink
	case tar.TypeLink:
		return TypeHardlink
	case tar.TypeChar:
		return TypeChar
	case tar.TypeBlock:
		return TypeBlock
	case tar.TypeFifo:
		return TypeFifo
	}
	return fmt.Sprintf("tar type %q", f)
}

// compareOpts relaxes checks for blobs written by other builders.
type compareOpts struct {
	// roundMtime compares modification times rounded to seconds (the
	// upstream builder drops sub-second precision).
	roundMtime bool
	// chunkSize, when > 0, is the maximal chunk size files must be split to.
	chunkSize int64
}

// checkIndexAgainstTar checks every entry of the final state of the source
// tar against the opened blob: node attributes and, via OpenFile, content.
// It also checks that the Index holds nothing else (besides implicit
// parent directories and the landmark).
func checkIndexAgainstTar(t *testing.T, r *Reader, src []fixture.Entry, co compareOpts) {
	t.Helper()
	want, order := finalState(t, src)
	for _, name := range order {
		e := want[name]
		h := &e.Header
		n, ok := r.Lookup(name)
		if !ok {
			t.Errorf("%q: missing from the index", name)
			continue
		}
		if h.Typeflag == tar.TypeLink {
			target := mustClean(t, h.Linkname)
			tn, ok := r.Lookup(target)
			if !ok || tn != n {
				t.Errorf("%q: hardlink does not resolve to the node of %q", name, target)
			}
			if n.NumLink < 2 {
				t.Errorf("%q: hardlinked node has NumLink %d", name, n.NumLink)
			}
			continue
		}
		if got, w := n.Type, tarTypeToTOC(h.Typeflag); got != w {
			t.Errorf("%q: type %s, want %s", name, got, w)
			continue
		}
		if got, w := n.Mode, uint32(h.Mode)&0o7777; got != w {
			t.Errorf("%q: mode %o, want %o", name, got, w)
		}
		if n.UID != uint32(h.Uid) || n.GID != uint32(h.Gid) {
			t.Errorf("%q: owner %d:%d, want %d:%d", name, n.UID, n.GID, h.Uid, h.Gid)
		}
		if n.Uname != h.Uname || n.Gname != h.Gname {
			t.Errorf("%q: owner names %q:%q, want %q:%q", name, n.Uname, n.Gname, h.Uname, h.Gname)
		}
		wantMt := h.ModTime
		if co.roundMtime {
			wantMt = wantMt.Round(time.Second)
		}
		if !n.ModTime.Equal(wantMt) {
			t.Errorf("%q: mtime %v, want %v", name, n.ModTime, wantMt)
		}
		if h.Typeflag == tar.TypeSymlink && n.LinkName != h.Linkname {
			t.Errorf("%q: link target %q, want %q", name, n.LinkName, h.Linkname)
		}
		if h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock {
			if n.DevMajor != uint32(h.Devmajor) || n.DevMinor != uint32(h.Devminor) {
				t.Errorf("%q: device %d,%d, want %d,%d", name, n.DevMajor, n.DevMinor, h.Devmajor, h.Devminor)
			}
		}
		if wx := xattrsOf(h); !xattrsEqual(n.Xattrs, wx) {
			t.Errorf("%q: xattrs %q, want %q", name, n.Xattrs, wx)
		}
		if n.Type != TypeReg {
			continue
		}
		if n.Size != int64(len(e.Data)) {
			t.Errorf("%q: size %d, want %d", name, n.Size, len(e.Data))
		}
		if want := digest.FromBytes(e.Data); n.Digest != "" && n.Digest != want {
			t.Errorf("%q: digest %s, want %s", name, n.Digest, want)
		}
		checkChunks(t, name, n, co.chunkSize)
		f, err := r.OpenFile(name)
		if err != nil {
			t.Errorf("%q: OpenFile: %v", name, err)
			continue
		}
		got, err := io.ReadAll(f)
		if err != nil {
			t.Errorf("%q: reading: %v", name, err)
		} else if !bytes.Equal(got, e.Data) {
			t.Errorf("%q: content differs (%d bytes, want %d)", name, len(got), len(e.Data))
		}
	}
	// Nothing else in the tree.
	r.Walk(func(name string, n *Node) bool {
		if name == "" || name == PrefetchLandmark || name == NoPrefetchLandmark {
			return true
		}
		if _, ok := want[name]; ok {
			return true
		}
		for k := range want {
			if strings.HasPrefix(k, name+"/") {
				if n.Type != TypeDir {
					t.Errorf("%q: implicit parent is a %s", name, n.Type)
				}
				return true
			}
		}
		t.Errorf("%q: in the index but not in the source", name)
		return true
	})
}

func xattrsEqual(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// checkChunks checks that a file's chunks tile it exactly, each at most
// chunkSize long (when given), and lie in the payload region.
func checkChunks(t *testing.T, name string, n *Node, chunkSize int64) {
	t.Helper()
	var off int64
	for i, c := range n.Chunks {
		if c.FileOffset != off {
			t.Errorf("%q: chunk %d at %d, want %d", name, i, c.FileOffset, off)
		}
		if c.Size <= 0 || (chunkSize > 0 && c.Size > chunkSize) {
			t.Errorf("%q: chunk %d has size %d (chunk size %d)", name, i, c.Size, chunkSize)
		}
		if c.End <= c.Offset {
			t.Errorf("%q: chunk %d member [%d,%d) is empty", name, i, c.Offset, c.End)
		}
		off += c.Size
	}
	if off != n.Size {
		t.Errorf("%q: chunks cover %d of %d bytes", name, off, n.Size)
	}
	if chunkSize > 0 && n.Size > 0 {
		if want := int((n.Size + chunkSize - 1) / chunkSize); len(n.Chunks) != want {
			t.Errorf("%q: %d chunks, want %d", name, len(n.Chunks), want)
		}
	}
}

// --- independent blob decoding (stdlib gzip, hand-parsed footers) ---

// decompressAll decompresses a whole blob: every gzip member (stdlib
// multistream reader), or every zstd frame (skippable frames are skipped).
func decompressAll(t testing.TB, comp Compression, blob []byte) []byte {
	t.Helper()
	var r io.Reader
	switch comp {
	case Gzip:
		zr, err := stdgzip.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatalf("blob is not gzip: %v", err)
		}
		r = zr
	case Zstd:
		zr, err := zstd.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("decompressing the blob: %v", err)
	}
	return out
}

// rawTOC finds the TOC of a blob from its footer bytes without the
// package's parser and returns the TOC JSON, the compressed TOC bytes and
// the TOC's compressed offset.
func rawTOC(t testing.TB, comp Compression, blob []byte) (tocJSON, compressed []byte, off int64) {
	t.Helper()
	switch comp {
	case Gzip:
		if len(blob) < 51 {
			t.Fatalf("blob of %d bytes has no footer", len(blob))
		}
		ft := blob[len(blob)-51:]
		wantHead := []byte{0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, 'S', 'G', 22, 0}
		if !bytes.Equal(ft[:16], wantHead) || string(ft[32:38]) != "STARGZ" ||
			!bytes.Equal(ft[38:], []byte{1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0}) {
			t.Fatalf("footer bytes % x are not the 51-byte eStargz footer", ft)
		}
		o, err := strconv.ParseInt(string(ft[16:32]), 16, 64)
		if err != nil || strings.ToLower(string(ft[16:32])) != string(ft[16:32]) {
			t.Fatalf("footer offset %q: %v", ft[16:32], err)
		}
		compressed = blob[o : len(blob)-51]
		zr, err := stdgzip.NewReader(bytes.NewReader(compressed))
		if err != nil {
			t.Fatalf("TOC member: %v", err)
		}
		zr.Multistream(false)
		tr := tar.NewReader(zr)
		h, err := tr.Next()
		if err != nil || h.Name != TOCTarName {
			t.Fatalf("TOC member holds %v, %v", h, err)
		}
		tocJSON, err = io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tr.Next(); err != io.EOF {
			t.Fatalf("TOC member: want end of archive after the TOC, got %v", err)
		}
		return tocJSON, compressed, o
	case Zstd:
		ft := blob[len(blob)-48:]
		if !bytes.Equal(ft[:8], []byte{0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0}) || string(ft[40:]) != "GnUlInUx" {
			t.Fatalf("footer % x is not a zstd:chunked footer", ft)
		}
		o := int64(binary.LittleEndian.Uint64(ft[8:]))
		cs := int64(binary.LittleEndian.Uint64(ft[16:]))
		us := int64(binary.LittleEndian.Uint64(ft[24:]))
		if mt := binary.LittleEndian.Uint64(ft[32:]); mt != 1 {
			t.Fatalf("manifest type %d", mt)
		}
		if sk := blob[o-8 : o]; !bytes.Equal(sk[:4], []byte{0x50, 0x2a, 0x4d, 0x18}) || int64(binary.LittleEndian.Uint32(sk[4:])) != cs {
			t.Fatalf("TOC is not in a skippable frame of %d bytes: % x", cs, sk)
		}
		if o+cs != int64(len(blob))-48 {
			t.Fatalf("TOC frame [%d,+%d) does not end at the footer (%d)", o, cs, len(blob)-48)
		}
		compressed = blob[o : o+cs]
		dec, _ := zstd.NewReader(nil)
		defer dec.Close()
		var err error
		tocJSON, err = dec.DecodeAll(compressed, nil)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(tocJSON)) != us {
			t.Fatalf("TOC is %d bytes, footer says %d", len(tocJSON), us)
		}
		return tocJSON, compressed, o
	}
	panic("unknown compression")
}

// decodeMemberAt independently decodes the member (gzip) or frame (zstd)
// at off, skips inner bytes and returns the next n bytes.
func decodeMemberAt(t testing.TB, comp Compression, blob []byte, off, inner, n int64) []byte {
	t.Helper()
	var r io.Reader
	switch comp {
	case Gzip:
		zr, err := stdgzip.NewReader(bytes.NewReader(blob[off:]))
		if err != nil {
			t.Fatalf("no gzip member at %d: %v", off, err)
		}
		zr.Multistream(false)
		r = zr
	case Zstd:
		if !bytes.HasPrefix(blob[off:], []byte{0x28, 0xb5, 0x2f, 0xfd}) {
			t.Fatalf("no zstd frame at %d", off)
		}
		zr, err := zstd.NewReader(bytes.NewReader(blob[off:]))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	}
	if _, err := io.CopyN(io.Discard, r, inner); err != nil {
		t.Fatalf("member at %d: skipping %d: %v", off, inner, err)
	}
	out := make([]byte, n)
	if _, err := io.ReadFull(r, out); err != nil {
		t.Fatalf("member at %d: reading %d bytes: %v", off, n, err)
	}
	return out
}

// --- assembling blobs with arbitrary TOCs ---

// handGzipFooter builds the 51-byte (or 47-byte legacy) footer by hand.
func handGzipFooter(off int64, legacy bool) []byte {
	b := []byte{0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff}
	if legacy {
		b = append(b, 22, 0)
	} else {
		b = append(b, 26, 0, 'S', 'G', 22, 0)
	}
	b = append(b, fmt.Sprintf("%016xSTARGZ", off)...)
	return append(b, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0)
}

func handZstdFooter(off, csize, usize, mtype uint64) []byte {
	b := []byte{0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0}
	b = binary.LittleEndian.AppendUint64(b, off)
	b = binary.LittleEndian.AppendUint64(b, csize)
	b = binary.LittleEndian.AppendUint64(b, usize)
	b = binary.LittleEndian.AppendUint64(b, mtype)
	return append(b, "GnUlInUx"...)
}

// assemble returns payload followed by a TOC holding tocJSON and a footer.
func assemble(t testing.TB, comp Compression, payload, tocJSON []byte, legacy bool) []byte {
	t.Helper()
	blob := slices.Clone(payload)
	off := int64(len(blob))
	switch comp {
	case Gzip:
		var tb bytes.Buffer
		tw := tar.NewWriter(&tb)
		tw.WriteHeader(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeReg, Size: int64(len(tocJSON)), Mode: 0o644})
		tw.Write(tocJSON)
		tw.Close()
		blob = append(blob, fixture.Gzip(t, tb.Bytes())...)
		blob = append(blob, handGzipFooter(off, legacy)...)
	case Zstd:
		enc, _ := zstd.NewWriter(nil)
		c := enc.EncodeAll(tocJSON, nil)
		blob = binary.LittleEndian.AppendUint32(append(blob, 0x50, 0x2a, 0x4d, 0x18), uint32(len(c)))
		blob = append(blob, c...)
		blob = append(blob, handZstdFooter(uint64(off+8), uint64(len(c)), uint64(len(tocJSON)), 1)...)
	}
	return blob
}

// rebuildWithTOC replaces the TOC of blob by the JSON of toc (after
// mutating it), keeping the payload region.
func rebuildWithTOC(t testing.TB, comp Compression, blob []byte, toc *TOC) []byte {
	t.Helper()
	_, _, off := rawTOC(t, comp, blob)
	if comp == Zstd {
		off -= 8
	}
	j, err := json.MarshalIndent(toc, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	return assemble(t, comp, blob[:off], j, false)
}

func parseTOCJSON(t testing.TB, j []byte) *TOC {
	t.Helper()
	var toc TOC
	if err := json.Unmarshal(j, &toc); err != nil {
		t.Fatal(err)
	}
	return &toc
}

// --- building ---

func build(t testing.TB, src []byte, opts BuildOptions) ([]byte, *BuildResult) {
	t.Helper()
	var out bytes.Buffer
	res, err := Build(context.Background(), &out, bytes.NewReader(src), opts)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return out.Bytes(), res
}

func openBlob(t testing.TB, blob []byte, opts OpenOptions) *Reader {
	t.Helper()
	r, err := Open(bytes.NewReader(blob), int64(len(blob)), opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return r
}

// --- errors ---

// wantErr checks that err is an *Error of the given kind whose message
// contains every one of subs.
func wantErr(t testing.TB, err error, kind error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %v", kind)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %q (%T) is not an *Error", err, err)
	}
	if !errors.Is(err, kind) {
		t.Fatalf("error %q is not %v", err, kind)
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
}

func hexSum(p []byte) string {
	s := sha256.Sum256(p)
	return hex.EncodeToString(s[:])
}

func parentsOf(name string) []string {
	var out []string
	for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
		out = append([]string{d}, out...)
	}
	return out
}
