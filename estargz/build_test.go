package estargz

import (
	"archive/tar"
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
)

const testChunk = 4096

var compressions = []Compression{Gzip, Zstd}

// richFixture returns entries covering every entry type, attribute and
// naming quirk that the tar format can express, with names prefixed by
// prefix. Entries the format cannot encode are left out.
func richFixture(format tar.Format, prefix string) []fixture.Entry {
	rng := rand.New(rand.NewSource(int64(format) + int64(len(prefix))))
	p := func(s string) string { return prefix + s }
	long100 := "d-" + strings.Repeat("x", 90) + "/" + strings.Repeat("f", 30)        // 123 bytes, USTAR prefix split
	long255 := strings.Repeat("long-component-", 20) + "/" + strings.Repeat("n", 40) // > 255
	longTarget := strings.Repeat("../target/", 15)                                   // 150 bytes
	sub := time.Date(2023, 1, 2, 3, 4, 5, 123456789, time.UTC)

	type ent struct {
		fixture.Entry
		needsLong bool // needs PAX or GNU
		needsPAX  bool // needs PAX (xattrs, sub-second times)
	}
	var es []ent
	add := func(f fixture.Entry) { es = append(es, ent{Entry: f}) }
	addL := func(f fixture.Entry) { es = append(es, ent{Entry: f, needsLong: true}) }
	addP := func(f fixture.Entry) { es = append(es, ent{Entry: f, needsPAX: true}) }

	if prefix != "" {
		root := dirFx(prefix)
		root.Header.Mode = 0o750
		add(root)
	}
	add(dirFx(p("dir/")))
	d := dirFx(p("dir/sub/"))
	d.Header.Mode = 0o2775
	add(d)
	d = dirFx(p("tmp/"))
	d.Header.Mode = 0o1777
	add(d)
	add(regFx(p("dir/empty"), nil))
	small := regFx(p("dir/small"), []byte("hello, world\n"))
	small.Header.Uid, small.Header.Gid, small.Header.Uname, small.Header.Gname = 1000, 1001, "user", "group"
	add(small)
	for _, n := range []int{testChunk - 1, testChunk, testChunk + 1, 2 * testChunk, 2*testChunk + 1, 5*testChunk - 7} {
		add(regFx(p(fmt.Sprintf("dir/sub/size-%d", n)), fixture.TextFrom(rng, n)))
	}
	add(regFx(p("dir/random"), fixture.RandomFrom(rng, 3*testChunk+100)))
	su := regFx(p("bin/su"), []byte("#!/bin/true\n"))
	su.Header.Mode = 0o4755
	add(dirFx(p("bin/")))
	add(su)
	sg := regFx(p("bin/sg"), []byte("sg"))
	sg.Header.Mode = 0o2711
	sg.Header.Uid, sg.Header.Gid, sg.Header.Uname, sg.Header.Gname = 3, 42, "sys", "shadow"
	add(sg)
	add(symFx(p("dir/link"), "small"))
	add(symFx(p("dir/abs"), "/etc/passwd"))
	add(linkFx(p("dir/hard"), p("dir/small")))
	add(linkFx(p("bin/hard-chunked"), p("dir/sub/size-8192")))
	add(dirFx(p("dev/")))
	add(fixture.Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: p("dev/null"), Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: fixtureTime}})
	add(fixture.Entry{Header: tar.Header{Typeflag: tar.TypeBlock, Name: p("dev/sda"), Mode: 0o660, Devmajor: 8, Devminor: 0, Gid: 6, Gname: "disk", ModTime: fixtureTime}})
	add(fixture.Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: p("dev/big"), Mode: 0o600, Devmajor: 4095, Devminor: 1 << 19, ModTime: fixtureTime}})
	add(fixture.Entry{Header: tar.Header{Typeflag: tar.TypeFifo, Name: p("dev/fifo"), Mode: 0o620, ModTime: fixtureTime}})
	old := regFx(p("old"), []byte("from the eighties"))
	old.Header.ModTime = time.Date(1985, 10, 26, 1, 21, 0, 0, time.UTC)
	add(old)
	future := regFx(p("future"), []byte("2100"))
	future.Header.ModTime = time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)
	add(future)
	// Whiteouts are ordinary entries to the format.
	add(regFx(p("dir/.wh.gone"), nil))
	add(dirFx(p("opq/")))
	add(regFx(p("opq/.wh..wh..opq"), nil))
	add(regFx(p(long100), []byte("long name")))
	addL(regFx(p(long255), []byte("very long name")))
	addL(symFx(p("longtarget"), longTarget))
	addL(linkFx(p("hard-to-long"), p(long255)))
	// Duplicates: the later entry wins.
	add(regFx(p("dup"), []byte("first version")))
	add(regFx(p("dup"), []byte("second, longer version")))
	add(regFx(p("f2d"), []byte("file, then dir")))
	add(dirFx(p("f2d/")))
	add(regFx(p("f2d/inside"), []byte("in the dir")))
	add(dirFx(p("d2f/")))
	add(regFx(p("d2f/gone"), []byte("removed with its dir")))
	add(regFx(p("d2f"), []byte("dir, then file")))
	add(regFx(p("implicit/gone"), []byte("parent never declared")))
	add(regFx(p("implicit"), []byte("implicit dir replaced by a file")))
	redir := dirFx(p("dir/sub/"))
	redir.Header.Mode = 0o700
	add(redir) // dir replaces dir: attributes change, children stay
	// PAX-only attributes.
	x := regFx(p("xattr-file"), []byte("with xattrs"))
	x.Header.PAXRecords = map[string]string{
		"SCHILY.xattr.user.comment":        "hi",
		"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
	}
	addP(x)
	xd := dirFx(p("xattr-dir/"))
	xd.Header.PAXRecords = map[string]string{"SCHILY.xattr.trusted.overlay.opaque": "y"}
	addP(xd)
	ns := regFx(p("subsecond"), []byte("nanoseconds"))
	ns.Header.ModTime = sub
	addP(ns)
	bigID := regFx(p("bigid"), []byte("uid above ustar"))
	bigID.Header.Uid, bigID.Header.Gid = 1<<24, 1<<22
	addL(bigID)

	var out []fixture.Entry
	for _, e := range es {
		if format == tar.FormatUSTAR && (e.needsLong || e.needsPAX) {
			continue
		}
		if format == tar.FormatGNU && e.needsPAX {
			continue
		}
		e.Header.Format = format
		out = append(out, e.Entry)
	}
	return out
}

// checkBuilt runs every check on a blob built from the plain tar src.
func checkBuilt(t *testing.T, src, blob []byte, res *BuildResult, opts BuildOptions) *Reader {
	t.Helper()
	comp := opts.Compression
	var chunk int64 // of the current file
	srcEnts := fixture.Read(t, (src))

	// Blob digest, size and compression.
	if res.Compression != comp {
		t.Errorf("result compression %v, want %v", res.Compression, comp)
	}
	if got := digest.FromBytes(blob); res.Digest != got || res.Size != int64(len(blob)) {
		t.Errorf("result says blob %s/%d, it is %s/%d", res.Digest, res.Size, got, len(blob))
	}

	// TOC, found by hand from the footer.
	tocJSON, compressedTOC, tocOff := rawTOC(t, comp, blob)
	tocDigest := digest.FromBytes(tocJSON)
	if res.TOCDigest != tocDigest || res.Annotations[TOCDigestAnnotation] != tocDigest.String() {
		t.Errorf("TOC digest %s, annotation %q, want %s", res.TOCDigest, res.Annotations[TOCDigestAnnotation], tocDigest)
	}
	if !bytes.HasPrefix(tocJSON, []byte("{\n\t\"version\": 1,\n\t\"entries\": [\n\t\t{")) {
		t.Errorf("TOC JSON is not tab-indented version 1: %.40q", tocJSON)
	}
	toc := parseTOCJSON(t, tocJSON)
	if res.Entries != len(toc.Entries) {
		t.Errorf("result says %d entries, TOC has %d", res.Entries, len(toc.Entries))
	}
	if comp == Zstd {
		if got, want := res.Annotations[ZstdChunkedManifestChecksumAnnotation], digest.FromBytes(compressedTOC).String(); got != want {
			t.Errorf("manifest checksum %q, want %q", got, want)
		}
		if got, want := res.Annotations[ZstdChunkedManifestPositionAnnotation], fmt.Sprintf("%d:%d:%d:1", tocOff, len(compressedTOC), len(tocJSON)); got != want {
			t.Errorf("manifest position %q, want %q", got, want)
		}
	} else if len(res.Annotations) != 2 {
		t.Errorf("gzip annotations %v, want toc digest and size only", res.Annotations)
	}

	// The decompressed stream: DiffID, size, and a tar equal to the input.
	plain := decompressAll(t, comp, blob)
	if got := digest.FromBytes(plain); res.DiffID != got {
		t.Errorf("DiffID %s, decompressed blob hashes to %s", res.DiffID, got)
	}
	if res.UncompressedSize != int64(len(plain)) || res.Annotations[UncompressedSizeAnnotation] != strconv.Itoa(len(plain)) {
		t.Errorf("uncompressed size %d / annotation %q, decompressed blob is %d bytes",
			res.UncompressedSize, res.Annotations[UncompressedSizeAnnotation], len(plain))
	}
	out := fixture.Read(t, (plain))
	if comp == Gzip {
		if len(out) == 0 || out[len(out)-1].Header.Name != TOCTarName || !bytes.Equal(out[len(out)-1].Data, tocJSON) {
			t.Fatalf("the decompressed tar does not end with the TOC entry")
		}
		out = out[:len(out)-1]
	}
	landmark := NoPrefetchLandmark
	if len(opts.Prioritized) > 0 && len(res.MissingPrioritized) < len(opts.Prioritized) {
		landmark = PrefetchLandmark
	}
	var lm int
	out = slices.DeleteFunc(out, func(e fixture.Entry) bool {
		if e.Header.Name == landmark {
			lm++
			if !bytes.Equal(e.Data, []byte{0x0f}) {
				t.Errorf("landmark holds %q", e.Data)
			}
			return true
		}
		return false
	})
	if lm != 1 {
		t.Errorf("%d %s entries in the blob, want 1", lm, landmark)
	}
	var wantEnts []fixture.Entry
	if len(opts.Prioritized) == 0 {
		for _, e := range srcEnts {
			if e.Header.Typeflag == tar.TypeXGlobalHeader {
				continue
			}
			switch mustClean(t, e.Header.Name) {
			case TOCTarName, PrefetchLandmark, NoPrefetchLandmark:
				continue
			}
			wantEnts = append(wantEnts, e)
		}
	} else {
		wantEnts = expectedPrioritizedOrder(t, srcEnts, opts.Prioritized)
	}
	compareTarEntries(t, out, wantEnts)

	// Every payload and chunk starts its own member at its offset.
	data := map[string][]byte{}
	for _, e := range srcEnts {
		if e.Header.Typeflag == tar.TypeReg || e.Header.Typeflag == tar.TypeRegA {
			data[mustClean(t, e.Header.Name)] = e.Data
		}
	}
	var cur []byte
	var curName string
	_, order := finalState(t, srcEnts)
	final := map[string]bool{}
	for _, n := range order {
		final[n] = true
	}
	for i, e := range toc.Entries {
		if n := e.Name; n != "./" && mustClean(t, n) != n {
			t.Errorf("TOC entry %d name %q is not clean", i, n)
		}
		if e.ModTime3339 != "" {
			if mt, err := time.Parse(time.RFC3339Nano, e.ModTime3339); err != nil || !strings.HasSuffix(e.ModTime3339, "Z") || mt.Location() != time.UTC {
				t.Errorf("TOC entry %q modtime %q is not RFC 3339 UTC", e.Name, e.ModTime3339)
			}
		}
		if e.Type != TypeChunk && e.Name != NoPrefetchLandmark && e.Name != PrefetchLandmark && e.Name != "./" && !final[e.Name] {
			t.Errorf("TOC entry %d %q was replaced by a later entry and should not be listed", i, e.Name)
		}
		switch e.Type {
		case TypeReg:
			curName = e.Name
			cur = data[e.Name]
			if e.Name == PrefetchLandmark || e.Name == NoPrefetchLandmark {
				cur = []byte{0x0f}
			}
			chunk = wantChunkSize(opts, cur)
			if e.Digest != digest.FromBytes(cur).String() {
				t.Errorf("TOC entry %q digest %s, content hashes to %s", e.Name, e.Digest, digest.FromBytes(cur))
			}
			if e.Size == 0 {
				if e.Offset != 0 || e.ChunkDigest != "" {
					t.Errorf("empty file %q has offset %d / chunk digest %q", e.Name, e.Offset, e.ChunkDigest)
				}
				continue
			}
		case TypeChunk:
			if e.Name != curName {
				t.Errorf("chunk entry %d of %q follows %q", i, e.Name, curName)
			}
		default:
			continue
		}
		size := e.ChunkSize
		if size == 0 {
			size = int64(len(cur)) - e.ChunkOffset
		}
		if size > chunk || (e.ChunkSize != 0 && e.ChunkSize != chunk) || (e.ChunkSize == 0 && e.ChunkOffset+chunk < int64(len(cur))) {
			t.Errorf("%q chunk at %d: chunkSize %d, size %d, chunk size %d", e.Name, e.ChunkOffset, e.ChunkSize, size, chunk)
			continue
		}
		if e.InnerOffset != 0 {
			t.Errorf("%q chunk at %d: inner offset %d, want its own member", e.Name, e.ChunkOffset, e.InnerOffset)
		}
		got := decodeMemberAt(t, comp, blob, e.Offset, e.InnerOffset, size)
		if want := cur[e.ChunkOffset : e.ChunkOffset+size]; !bytes.Equal(got, want) {
			t.Errorf("%q chunk at %d: member at %d does not start with the chunk", e.Name, e.ChunkOffset, e.Offset)
		}
		if e.ChunkDigest != digest.FromBytes(got).String() {
			t.Errorf("%q chunk at %d: chunkDigest %s, bytes hash to %s", e.Name, e.ChunkOffset, e.ChunkDigest, digest.FromBytes(got))
		}
	}

	// Our reader: open with the expected TOC digest, verify, compare.
	r := openBlob(t, blob, OpenOptions{TOCDigest: res.TOCDigest})
	if r.Footer.Compression != comp || r.Footer.Legacy || r.TOCDigest != res.TOCDigest {
		t.Errorf("footer %+v, TOC digest %s", r.Footer, r.TOCDigest)
	}
	if err := r.Verify(); err != nil {
		t.Errorf("Verify: %v", err)
	}
	checkIndexAgainstTar(t, r, srcEnts, compareOpts{chunkSize: opts.ChunkSize}) // the default rule is checked per file above
	return r
}

// compareTarEntries compares headers and payloads of two tar entry lists.
func compareTarEntries(t *testing.T, got, want []fixture.Entry) {
	t.Helper()
	if len(got) != len(want) {
		var g, w []string
		for _, e := range got {
			g = append(g, e.Header.Name)
		}
		for _, e := range want {
			w = append(w, e.Header.Name)
		}
		t.Errorf("blob tar has %d entries, want %d:\n got %q\nwant %q", len(got), len(want), g, w)
		return
	}
	for i := range got {
		g, w := got[i].Header, want[i].Header
		wf := w.Typeflag
		if wf == tar.TypeRegA {
			wf = tar.TypeReg
		}
		if g.Name != w.Name || g.Typeflag != wf || g.Linkname != w.Linkname || g.Size != w.Size ||
			g.Mode != w.Mode || g.Uid != w.Uid || g.Gid != w.Gid || g.Uname != w.Uname || g.Gname != w.Gname ||
			!g.ModTime.Equal(w.ModTime) || g.Devmajor != w.Devmajor || g.Devminor != w.Devminor ||
			!xattrsEqual(xattrsOf(&g), xattrsOf(&w)) {
			t.Errorf("blob tar entry %d:\n got %+v\nwant %+v", i, g, w)
		}
		if !bytes.Equal(got[i].Data, want[i].Data) {
			t.Errorf("blob tar entry %d %q: payload differs", i, g.Name)
		}
	}
}

// expectedPrioritizedOrder is the output order of a prioritized build,
// computed independently: each prioritized entry after its explicit parent
// directories and (for hardlinks) its target, then the landmark, then the
// rest in input order, all after "later wins".
func expectedPrioritizedOrder(t *testing.T, src []fixture.Entry, prio []string) []fixture.Entry {
	t.Helper()
	m, order := finalState(t, src)
	picked := map[string]bool{}
	var out []fixture.Entry
	var move func(string) bool
	move = func(name string) bool {
		e, ok := m[name]
		if !ok {
			return false
		}
		if picked[name] {
			return true
		}
		for _, p := range parentsOf(name) {
			if pe, ok := m[p]; ok && !picked[p] {
				picked[p] = true
				out = append(out, pe)
			}
		}
		if e.Header.Typeflag == tar.TypeLink {
			move(mustClean(t, e.Header.Linkname))
		}
		picked[name] = true
		out = append(out, e)
		return true
	}
	for _, p := range prio {
		if n, err := CleanName(p); err == nil {
			move(n)
		}
	}
	for _, n := range order {
		if !picked[n] {
			out = append(out, m[n])
		}
	}
	return out
}

func TestBuildFormatsAndPrefixes(t *testing.T) {
	for _, format := range []tar.Format{tar.FormatUSTAR, tar.FormatPAX, tar.FormatGNU} {
		for _, prefix := range []string{"", "./", "/"} {
			src := fixture.Tar(t, richFixture(format, prefix))
			for _, comp := range compressions {
				t.Run(fmt.Sprintf("%v/%q/%v", format, prefix, comp), func(t *testing.T) {
					t.Parallel()
					opts := BuildOptions{Compression: comp, ChunkSize: testChunk, Workers: 3}
					blob, res := build(t, src, opts)
					r := checkBuilt(t, src, blob, res, opts)
					if !r.NoPrefetch || r.PrefetchEnd != -1 {
						t.Errorf("NoPrefetch %v, PrefetchEnd %d; want a no-prefetch blob", r.NoPrefetch, r.PrefetchEnd)
					}
					if res.MissingPrioritized != nil {
						t.Errorf("MissingPrioritized %q", res.MissingPrioritized)
					}
					if prefix == "" {
						if _, ok := r.Lookup("dir/small"); !ok {
							t.Fatal("dir/small not found")
						}
					}
				})
			}
		}
	}
}

func TestBuildKeepsSpecialAttributes(t *testing.T) {
	// Spot checks with literal expectations, so that a mistake shared by
	// the builder and the comparison helpers would still show.
	src := fixture.Tar(t, richFixture(tar.FormatPAX, "./"))
	for _, comp := range compressions {
		blob, _ := build(t, src, BuildOptions{Compression: comp, ChunkSize: testChunk})
		r := openBlob(t, blob, OpenOptions{})
		get := func(name string) *Node {
			n, ok := r.Lookup(name)
			if !ok {
				t.Fatalf("%q not found", name)
			}
			return n
		}
		if n := get("bin/su"); n.Mode != 0o4755 {
			t.Errorf("setuid mode %o", n.Mode)
		}
		if n := get("tmp"); n.Mode != 0o1777 || n.Type != TypeDir {
			t.Errorf("sticky dir %s %o", n.Type, n.Mode)
		}
		if n := get("dir/sub"); n.Mode != 0o700 {
			t.Errorf("re-declared dir mode %o, want the later 0700", n.Mode)
		}
		if _, ok := r.Lookup("dir/sub/size-4096"); !ok {
			t.Errorf("children of a re-declared dir are gone")
		}
		if n := get("dev/big"); n.Type != TypeChar || n.DevMajor != 4095 || n.DevMinor != 1<<19 {
			t.Errorf("device %s %d,%d", n.Type, n.DevMajor, n.DevMinor)
		}
		if n := get("subsecond"); n.ModTime.Nanosecond() != 123456789 {
			t.Errorf("sub-second mtime lost: %v", n.ModTime)
		}
		if n := get("xattr-file"); string(n.Xattrs["user.comment"]) != "hi" || len(n.Xattrs["security.capability"]) != 20 {
			t.Errorf("xattrs %q", n.Xattrs)
		}
		if n := get("dup"); n.Size != int64(len("second, longer version")) {
			t.Errorf("dup has size %d, want the later version", n.Size)
		}
		if n := get("f2d"); n.Type != TypeDir {
			t.Errorf("f2d is a %s, want dir", n.Type)
		}
		for _, name := range []string{"d2f", "implicit"} {
			if n := get(name); n.Type != TypeReg {
				t.Errorf("%s is a %s, want reg", name, n.Type)
			}
		}
		for _, name := range []string{"d2f/gone", "implicit/gone"} {
			if _, ok := r.Lookup(name); ok {
				t.Errorf("%s survived its parent's replacement", name)
			}
		}
		if n := get("dir/.wh.gone"); n.Type != TypeReg || n.Size != 0 {
			t.Errorf("whiteout %s/%d", n.Type, n.Size)
		}
		if _, ok := r.Lookup("opq/.wh..wh..opq"); !ok {
			t.Errorf("opaque whiteout missing")
		}
		if n := get("dir/small"); n.NumLink != 2 || n.Uname != "user" || n.Gname != "group" {
			t.Errorf("dir/small: nlink %d owner %q:%q", n.NumLink, n.Uname, n.Gname)
		}
		if n := get("dir/sub/size-8193"); len(n.Chunks) != 3 || n.Chunks[2].Size != 1 {
			t.Errorf("size-8193 chunks %v", n.Chunks)
		}
		if n := get("dir/empty"); n.Size != 0 || len(n.Chunks) != 0 {
			t.Errorf("empty file: %d bytes, %d chunks", n.Size, len(n.Chunks))
		}
	}
}

func TestBuildInputCompression(t *testing.T) {
	src := fixture.Tar(t, richFixture(tar.FormatPAX, ""))
	var gz bytes.Buffer
	zw := stdgzip.NewWriter(&gz)
	zw.Write(src)
	zw.Close()
	enc, _ := zstd.NewWriter(nil)
	zs := enc.EncodeAll(src, nil)
	plainBlob, _ := build(t, src, BuildOptions{ChunkSize: testChunk})
	for name, in := range map[string][]byte{"gzip": gz.Bytes(), "zstd": zs} {
		for _, comp := range compressions {
			t.Run(name+"/"+comp.String(), func(t *testing.T) {
				opts := BuildOptions{Compression: comp, ChunkSize: testChunk}
				blob, res := build(t, in, opts)
				checkBuilt(t, src, blob, res, opts)
				if comp == Gzip && !bytes.Equal(blob, plainBlob) {
					t.Errorf("blob built from %s input differs from the one built from plain input", name)
				}
			})
		}
	}
}

func TestBuildRebuild(t *testing.T) {
	src := fixture.Tar(t, richFixture(tar.FormatPAX, "./"))
	for _, first := range compressions {
		for _, second := range compressions {
			t.Run(first.String()+"->"+second.String(), func(t *testing.T) {
				blob1, _ := build(t, src, BuildOptions{Compression: first, ChunkSize: testChunk, Prioritized: []string{"dir/small"}})
				opts := BuildOptions{Compression: second, ChunkSize: 2 * testChunk}
				blob2, res := build(t, blob1, opts)
				// The rebuilt blob holds what the first one held, with
				// one new TOC and landmark (checkBuilt counts them).
				plain1 := fixture.Read(t, (decompressAll(t, first, blob1)))
				var src1 []fixture.Entry
				for _, e := range plain1 {
					switch e.Header.Name {
					case TOCTarName, PrefetchLandmark, NoPrefetchLandmark:
						continue
					}
					src1 = append(src1, e)
				}
				plainSrc := fixture.Tar(t, src1)
				checkBuilt(t, plainSrc, blob2, res, opts)
				r := openBlob(t, blob2, OpenOptions{})
				checkIndexAgainstTar(t, r, fixture.Read(t, (src)), compareOpts{chunkSize: 2 * testChunk})
				if _, ok := r.Lookup(TOCTarName); ok {
					t.Errorf("the old TOC is a file of the rebuilt layer")
				}
				if _, ok := r.Lookup(PrefetchLandmark); ok {
					t.Errorf("the old prefetch landmark survived the rebuild")
				}
			})
		}
	}
}

// wantChunkSize is the chunk size Build should give a file of content
// data: opts.ChunkSize, else the default rule's.
func wantChunkSize(opts BuildOptions, data []byte) int64 {
	if opts.ChunkSize > 0 {
		return opts.ChunkSize
	}
	size := int64(len(data))
	if size <= PieceChunkSize {
		return max(size, 1)
	}
	return defaultChunks(size, data[:min(len(data), headLen)])
}

// TestBuildChunkBoundariesDefaultSize builds files around the chunk sizes
// of the default rule: other files, ELF files and zip archives.
func TestBuildChunkBoundariesDefaultSize(t *testing.T) {
	// Cheap-to-compress content: what matters here is the sizes.
	var ents []fixture.Entry
	for _, kind := range []struct {
		name  string
		magic string
		chunk int
	}{{"data", "", BaseChunkSize}, {"elf", "\x7fELF", PieceChunkSize}, {"zip", "PK\x03\x04", PieceChunkSize}} {
		for _, n := range []int{kind.chunk - 1, kind.chunk, kind.chunk + 1, 3*kind.chunk + 5} {
			data := make([]byte, n)
			for i := 0; i+4 <= n; i += 4096 {
				binary.BigEndian.PutUint32(data[i:], uint32(i))
			}
			copy(data, kind.magic)
			ents = append(ents, regFx(fmt.Sprintf("%s-%d", kind.name, n), data))
		}
	}
	src := fixture.Tar(t, ents)
	for _, comp := range compressions {
		t.Run(comp.String(), func(t *testing.T) {
			opts := BuildOptions{Compression: comp, Level: 1}
			blob, res := build(t, src, opts)
			checkBuilt(t, src, blob, res, opts)
		})
	}
}

func TestBuildPrioritized(t *testing.T) {
	ents := []fixture.Entry{
		dirFx("etc/"),
		regFx("etc/passwd", []byte("root:x:0:0::/root:/bin/sh\n")),
		dirFx("usr/"),
		dirFx("usr/bin/"),
		regFx("usr/bin/app", bytes.Repeat([]byte("app binary "), 2000)),
		regFx("usr/bin/other", []byte("not prioritized")),
		dirFx("usr/lib/"),
		regFx("usr/lib/libc.so", bytes.Repeat([]byte("libc "), 3000)),
		linkFx("usr/bin/app-link", "usr/lib/libc.so"),
		regFx("implicit/parent/file", []byte("no explicit parents")),
		regFx("late", []byte("v1")),
		regFx("late", []byte("v2")),
	}
	src := fixture.Tar(t, ents)
	prio := []string{"usr/bin/app", "/missing/file", "usr/bin/app-link", "./implicit/parent/file", "late", "../escape"}
	for _, comp := range compressions {
		t.Run(comp.String(), func(t *testing.T) {
			opts := BuildOptions{Compression: comp, ChunkSize: testChunk, Prioritized: prio, TempDir: t.TempDir()}
			blob, res := build(t, src, opts)
			r := checkBuilt(t, src, blob, res, opts)
			if want := []string{"/missing/file", "../escape"}; !slices.Equal(res.MissingPrioritized, want) {
				t.Errorf("MissingPrioritized %q, want %q", res.MissingPrioritized, want)
			}
			toc := r.TOC
			var names []string
			for _, e := range toc.Entries {
				if e.Type != TypeChunk {
					names = append(names, e.Name)
				}
			}
			wantHead := []string{"usr", "usr/bin", "usr/bin/app", "usr/lib", "usr/lib/libc.so", "usr/bin/app-link",
				"implicit/parent/file", "late", PrefetchLandmark}
			if len(names) < len(wantHead) || !slices.Equal(names[:len(wantHead)], wantHead) {
				t.Fatalf("TOC order %q, want it to start with %q", names, wantHead)
			}
			if r.NoPrefetch {
				t.Errorf("NoPrefetch set on a prioritized blob")
			}
			lm := toc.Entries[slices.IndexFunc(toc.Entries, func(e *TOCEntry) bool { return e.Name == PrefetchLandmark })]
			if r.PrefetchEnd != lm.Offset || lm.Offset <= 0 {
				t.Errorf("PrefetchEnd %d, landmark at %d", r.PrefetchEnd, lm.Offset)
			}
			prioritized := map[string]bool{"usr/bin/app": true, "usr/lib/libc.so": true, "implicit/parent/file": true, "late": true}
			for _, e := range toc.Entries {
				if e.Offset == 0 || e.Name == PrefetchLandmark {
					continue
				}
				if before := e.Offset < r.PrefetchEnd; before != prioritized[e.Name] {
					t.Errorf("%q at %d: before the landmark (%d) = %v", e.Name, e.Offset, r.PrefetchEnd, before)
				}
			}
			if n, _ := r.Lookup("late"); n.Size != 2 {
				t.Errorf("late has %d bytes", n.Size)
			}
			for _, c := range r.Chunks() {
				if c.Offset < r.PrefetchEnd && c.End > r.PrefetchEnd {
					t.Errorf("chunk %v straddles the landmark", c)
				}
			}
		})
	}
}

// The rich fixture through the spooling (prioritized) path: duplicates,
// replaced directories and hardlinks are resolved there too.
func TestBuildPrioritizedRich(t *testing.T) {
	src := fixture.Tar(t, richFixture(tar.FormatPAX, "./"))
	prio := []string{"bin/hard-chunked", "implicit", "f2d/inside", "d2f/gone", "dup", "dir/sub/size-4095"}
	for _, comp := range compressions {
		t.Run(comp.String(), func(t *testing.T) {
			opts := BuildOptions{Compression: comp, ChunkSize: testChunk, Prioritized: prio, TempDir: t.TempDir(), Workers: 2}
			blob, res := build(t, src, opts)
			r := checkBuilt(t, src, blob, res, opts)
			if !slices.Equal(res.MissingPrioritized, []string{"d2f/gone"}) {
				t.Errorf("MissingPrioritized %q, want the replaced d2f/gone", res.MissingPrioritized)
			}
			target, _ := r.Lookup("dir/sub/size-8192")
			if target.Chunks[len(target.Chunks)-1].Offset >= r.PrefetchEnd {
				t.Errorf("the target of a prioritized hardlink is after the landmark")
			}
		})
	}
}

func TestBuildPrioritizedNoneFound(t *testing.T) {
	src := fixture.Tar(t, []fixture.Entry{regFx("a", []byte("a")), regFx("b", []byte("b"))})
	opts := BuildOptions{Prioritized: []string{"x", "y"}, TempDir: t.TempDir()}
	blob, res := build(t, src, opts)
	r := checkBuilt(t, src, blob, res, opts)
	if !r.NoPrefetch || r.PrefetchEnd != -1 {
		t.Errorf("NoPrefetch %v PrefetchEnd %d, want a no-prefetch blob", r.NoPrefetch, r.PrefetchEnd)
	}
	if !slices.Equal(res.MissingPrioritized, []string{"x", "y"}) {
		t.Errorf("MissingPrioritized %q", res.MissingPrioritized)
	}
	if r.TOC.Entries[0].Name != NoPrefetchLandmark {
		t.Errorf("first entry %q", r.TOC.Entries[0].Name)
	}
}

func TestBuildEmptyLayer(t *testing.T) {
	src := fixture.Tar(t, nil)
	for _, comp := range compressions {
		opts := BuildOptions{Compression: comp}
		blob, res := build(t, src, opts)
		r := checkBuilt(t, src, blob, res, opts)
		if len(r.Root().Names()) != 1 || r.Root().Names()[0] != NoPrefetchLandmark {
			t.Errorf("root of an empty layer lists %q", r.Root().Names())
		}
	}
}

func TestBuildDeterministic(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	ents := richFixture(tar.FormatPAX, "")
	for i := range 100 {
		n := rng.Intn(3 * testChunk)
		if i%5 == 0 {
			ents = append(ents, regFx(fmt.Sprintf("many/r%03d", i), fixture.RandomFrom(rng, n)))
		} else {
			ents = append(ents, regFx(fmt.Sprintf("many/t%03d", i), fixture.TextFrom(rng, n)))
		}
		ents = append(ents, symFx(fmt.Sprintf("many/s%03d", i), "t000"))
	}
	src := fixture.Tar(t, ents)
	for _, comp := range compressions {
		for _, prio := range [][]string{nil, {"many/t010", "dir/small"}} {
			t.Run(fmt.Sprintf("%v/prio=%d", comp, len(prio)), func(t *testing.T) {
				var first []byte
				var firstRes *BuildResult
				for _, w := range []int{1, 2, 7} {
					blob, res := build(t, src, BuildOptions{Compression: comp, ChunkSize: testChunk, Workers: w, Prioritized: prio})
					if first == nil {
						first, firstRes = blob, res
						continue
					}
					if !bytes.Equal(blob, first) {
						t.Errorf("Workers=%d: blob differs from Workers=1 (%d vs %d bytes)", w, len(blob), len(first))
					}
					if res.Digest != firstRes.Digest || res.TOCDigest != firstRes.TOCDigest || res.DiffID != firstRes.DiffID {
						t.Errorf("Workers=%d: result differs", w)
					}
				}
			})
		}
	}
}

func TestBuildLevels(t *testing.T) {
	src := fixture.Tar(t, richFixture(tar.FormatPAX, ""))
	for _, tc := range []struct {
		comp  Compression
		level int
		ok    bool
	}{
		{Gzip, 1, true}, {Gzip, 6, true}, {Gzip, 9, true}, {Gzip, 10, false}, {Gzip, -1, false},
		{Zstd, 1, true}, {Zstd, 19, true}, {Zstd, 23, false},
	} {
		var out bytes.Buffer
		opts := BuildOptions{Compression: tc.comp, Level: tc.level, ChunkSize: testChunk}
		res, err := Build(context.Background(), &out, bytes.NewReader(src), opts)
		if !tc.ok {
			if err == nil || !strings.Contains(err.Error(), "level") {
				t.Errorf("%v level %d: error %v, want a level error", tc.comp, tc.level, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%v level %d: %v", tc.comp, tc.level, err)
		}
		checkBuilt(t, src, out.Bytes(), res, opts)
	}
	if _, err := Build(context.Background(), io.Discard, bytes.NewReader(src), BuildOptions{Compression: 7}); err == nil {
		t.Errorf("unknown compression accepted")
	}
}

func TestBuildProgress(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	src := fixture.Tar(t, []fixture.Entry{regFx("big", fixture.TextFrom(rng, 9<<20))})
	var calls []int64
	_, err := Build(context.Background(), io.Discard, bytes.NewReader(src), BuildOptions{Level: 1, Progress: func(n int64) { calls = append(calls, n) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) < 2 || calls[len(calls)-1] != int64(len(src)) || !slices.IsSorted(calls) {
		t.Errorf("progress calls %v, want increasing, ending at %d", calls, len(src))
	}
}

func TestBuildBadInput(t *testing.T) {
	good := fixture.Tar(t, []fixture.Entry{regFx("a", bytes.Repeat([]byte("x"), 3000))})
	for name, tc := range map[string]struct {
		in   []byte
		prio []string
		want string
	}{
		"truncated payload":         {in: good[:1024], want: "a"},
		"truncated payload spooled": {in: good[:1024], prio: []string{"a"}, want: "a"},
		"not gzip":                  {in: []byte{0x1f, 0x8b, 0, 0, 0, 0}, want: "gzip"},
		"unsafe name":               {in: fixture.Tar(t, []fixture.Entry{regFx("../evil", []byte("x"))}), want: ".."},
		"unsafe hardlink":           {in: fixture.Tar(t, []fixture.Entry{linkFx("l", "../../etc/shadow")}), want: ".."},
		"unsafe name spooled":       {in: fixture.Tar(t, []fixture.Entry{regFx("a/../../evil", []byte("x"))}), prio: []string{"a"}, want: ".."},
		"unsupported type":          {in: fixture.Tar(t, []fixture.Entry{{Header: tar.Header{Name: "x", Typeflag: 'Z', Mode: 0o644}}}), want: "unsupported"},
		"name over PATH_MAX":        {in: fixture.Tar(t, []fixture.Entry{regFx(strings.Repeat("abcdefg/", 513)+"f", []byte("x"))}), want: "longer than 4096"},
		"garbage":                   {in: bytes.Repeat([]byte("garbage!"), 200), want: "tar"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Build(context.Background(), io.Discard, bytes.NewReader(tc.in), BuildOptions{Prioritized: tc.prio, TempDir: t.TempDir()})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

type failWriter struct{ n, limit int }

func (w *failWriter) Write(p []byte) (int, error) {
	if w.n+len(p) > w.limit {
		return 0, errors.New("disk full")
	}
	w.n += len(p)
	return len(p), nil
}

func TestBuildWriteError(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	var ents []fixture.Entry
	for i := range 50 {
		ents = append(ents, regFx(fmt.Sprint(i), fixture.RandomFrom(rng, 5000)))
	}
	src := fixture.Tar(t, ents)
	for _, limit := range []int{0, 10000, 200000} {
		_, err := Build(context.Background(), &failWriter{limit: limit}, bytes.NewReader(src), BuildOptions{ChunkSize: testChunk})
		if err == nil || !strings.Contains(err.Error(), "disk full") {
			t.Errorf("limit %d: error %v, want disk full", limit, err)
		}
	}
}

// endlessTar streams a tar archive that never ends: many small files, or
// one file of a petabyte.
func endlessTar(oneHugeFile bool) (io.ReadCloser, func()) {
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		if oneHugeFile {
			if err := tw.WriteHeader(&tar.Header{Name: "huge", Typeflag: tar.TypeReg, Size: 1 << 50, Mode: 0o644}); err != nil {
				return
			}
			buf := bytes.Repeat([]byte("endless "), 8192)
			for {
				if _, err := tw.Write(buf); err != nil {
					return
				}
			}
		}
		data := bytes.Repeat([]byte("endless "), 512)
		for i := 0; ; i++ {
			if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("f%d", i), Typeflag: tar.TypeReg, Size: int64(len(data)), Mode: 0o644}); err != nil {
				return
			}
			if _, err := tw.Write(data); err != nil {
				return
			}
		}
	}()
	return pr, func() { pr.CloseWithError(errors.New("test over")) }
}

func TestBuildCancel(t *testing.T) {
	for _, huge := range []bool{false, true} {
		for _, prio := range [][]string{nil, {"f1"}} {
			t.Run(fmt.Sprintf("huge=%v/prio=%v", huge, prio != nil), func(t *testing.T) {
				t.Parallel()
				src, stop := endlessTar(huge)
				defer stop()
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() {
					_, err := Build(ctx, io.Discard, src, BuildOptions{Level: 1, ChunkSize: 64 << 10, Prioritized: prio, TempDir: t.TempDir()})
					done <- err
				}()
				time.Sleep(200 * time.Millisecond)
				cancel()
				select {
				case err := <-done:
					if !errors.Is(err, context.Canceled) {
						t.Errorf("Build returned %v, want context.Canceled", err)
					}
				case <-time.After(5 * time.Second):
					stop()
					t.Fatalf("Build still running 5s after cancellation")
				}
			})
		}
	}
	// A context cancelled up front stops Build at once.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	src := fixture.Tar(t, richFixture(tar.FormatPAX, ""))
	if _, err := Build(ctx, io.Discard, bytes.NewReader(src), BuildOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("pre-cancelled Build returned %v", err)
	}
}

func TestBuildTOCJSONFields(t *testing.T) {
	// The TOC uses the specification's JSON keys.
	h := tar.Header{Typeflag: tar.TypeChar, Name: "dev/c", Mode: 0o600, Devmajor: 5, Devminor: 1, Uid: 3, Gid: 4,
		Uname: "u", Gname: "g", ModTime: fixtureTime, Format: tar.FormatPAX,
		PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}}
	src := fixture.Tar(t, []fixture.Entry{{Header: h}, regFx("f", []byte("data")), symFx("s", "f"), linkFx("h", "f")})
	blob, _ := build(t, src, BuildOptions{})
	tocJSON, _, _ := rawTOC(t, Gzip, blob)
	var raw struct {
		Version int                      `json:"version"`
		Entries []map[string]interface{} `json:"entries"`
	}
	if err := json.Unmarshal(tocJSON, &raw); err != nil {
		t.Fatal(err)
	}
	byName := map[string]map[string]interface{}{}
	for _, e := range raw.Entries {
		byName[e["name"].(string)] = e
	}
	c := byName["dev/c"]
	for k, v := range map[string]interface{}{"type": "char", "devMajor": 5.0, "devMinor": 1.0, "uid": 3.0, "gid": 4.0,
		"userName": "u", "groupName": "g", "mode": 384.0, "modtime": "2024-05-17T10:20:30Z"} {
		if c[k] != v {
			t.Errorf("dev/c %s = %v, want %v", k, c[k], v)
		}
	}
	if x, _ := c["xattrs"].(map[string]interface{}); x["user.a"] != "Yg==" {
		t.Errorf("xattrs %v, want base64 of b", c["xattrs"])
	}
	f := byName["f"]
	if f["size"] != 4.0 || f["digest"] != digest.FromString("data").String() || f["chunkDigest"] != digest.FromString("data").String() || f["offset"] == nil {
		t.Errorf("f: %v", f)
	}
	if byName["s"]["linkName"] != "f" || byName["h"]["linkName"] != "f" || byName["h"]["type"] != "hardlink" {
		t.Errorf("links: %v %v", byName["s"], byName["h"])
	}
}
