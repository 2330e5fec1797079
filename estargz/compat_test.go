package estargz

// Compatibility with the upstream implementation
// (github.com/containerd/stargz-snapshotter/estargz), both ways.

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"testing"
	"time"

	upstream "github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
	fupstream "github.com/lazypull/lazypull/internal/fixture/upstream"
)

// compatFixture is a layer without duplicate names (the two builders
// resolve those differently) and with one user name per uid (a TOC entry
// without a user name takes the last one recorded for its uid).
func compatFixture(t testing.TB) []byte {
	rng := rand.New(rand.NewSource(11))
	sub := time.Date(2022, 3, 4, 5, 6, 7, 500000000, time.UTC)
	own := func(f fixture.Entry, uid int, uname string) fixture.Entry {
		f.Header.Uid, f.Header.Gid, f.Header.Uname, f.Header.Gname = uid, uid, uname, uname
		return f
	}
	ents := []fixture.Entry{
		dirFx("./"),
		dirFx("./etc/"),
		own(regFx("./etc/hostname", []byte("box\n")), 2, "daemon"),
		own(regFx("./etc/passwd", fixture.TextFrom(rng, 700)), 2, "daemon"),
		own(regFx("./etc/empty", nil), 2, "daemon"),
		dirFx("./home/"),
		own(dirFx("./home/user/"), 1000, "user"),
		own(regFx("./home/user/notes.txt", fixture.TextFrom(rng, 10000)), 1000, "user"),
		own(regFx("./home/user/blob.bin", fixture.RandomFrom(rng, 9000)), 1000, "user"),
		own(regFx("./home/user/other", fixture.TextFrom(rng, 300)), 1000, "user"),
		own(symFx("./home/user/link", "notes.txt"), 1000, "user"),
		linkFx("./home/user/hard", "./home/user/notes.txt"),
		dirFx("./usr/"),
		dirFx("./usr/bin/"),
		regFx("./usr/bin/app", fixture.TextFrom(rng, 3*4096+17)),
		regFx("./usr/bin/tool", fixture.RandomFrom(rng, 4096)),
		regFx("./usr/bin/tiny1", []byte("1")),
		regFx("./usr/bin/tiny2", []byte("22")),
		regFx("./usr/bin/tiny3", fixture.TextFrom(rng, 100)),
		dirFx("./dev/"),
		{Header: tar.Header{Typeflag: tar.TypeChar, Name: "./dev/tty", Mode: 0o666, Devmajor: 5, Devminor: 0, ModTime: fixtureTime}},
		{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "./dev/loop0", Mode: 0o660, Devmajor: 7, Devminor: 0, ModTime: fixtureTime}},
		{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "./dev/initctl", Mode: 0o600, ModTime: fixtureTime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./xattr", Mode: 0o4755, ModTime: sub, Format: tar.FormatPAX,
			PAXRecords: map[string]string{"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0\x00"}},
			Data: []byte("xattr file")},
		regFx("./.wh.removed", nil),
		regFx("./large", fixture.TextFrom(rng, 40000)),
	}
	return fixture.Tar(t, ents)
}

// Blobs built by upstream open, verify and read back identically with our
// reader.
func TestUpstreamBlobsWithOurReader(t *testing.T) {
	src := compatFixture(t)
	srcEnts := fixture.Read(t, (src))
	type cfg struct {
		chunk, minChunk int
		prio            []string
	}
	cfgs := []cfg{
		{},
		{chunk: 4096},
		{chunk: 1000},
		{chunk: 4096, prio: []string{"etc/hostname", "./usr/bin/app", "home/user/hard", "/no/such/file"}},
		{chunk: 4096, minChunk: 16384},
		{chunk: 1000, minChunk: 1 << 20, prio: []string{"usr/bin/tiny2", "large"}},
		{minChunk: 300},
	}
	for _, comp := range compressions {
		for _, c := range cfgs {
			t.Run(fmt.Sprintf("%v/chunk=%d/min=%d/prio=%d", comp, c.chunk, c.minChunk, len(c.prio)), func(t *testing.T) {
				t.Parallel()
				var missed []string
				ub := fupstream.Build(t, src, fupstream.Options{
					Zstd: comp == Zstd, ChunkSize: c.chunk, MinChunkSize: c.minChunk, Prioritized: c.prio, Missing: &missed,
				})
				blob, tocDigest, diffID := ub.Data, ub.TOCDigest, ub.DiffID
				if got := digest.FromBytes(decompressAll(t, comp, blob)); got != diffID {
					t.Fatalf("upstream DiffID %s, blob decompresses to %s", diffID, got)
				}
				r := openBlob(t, blob, OpenOptions{TOCDigest: tocDigest})
				if r.Footer.Compression != comp {
					t.Errorf("footer compression %v", r.Footer.Compression)
				}
				if err := r.Verify(); err != nil {
					t.Fatalf("Verify: %v", err)
				}
				chunk := int64(c.chunk)
				if chunk == 0 {
					chunk = DefaultChunkSize
				}
				checkIndexAgainstTar(t, r, srcEnts, compareOpts{roundMtime: true, chunkSize: chunk})
				if c.prio != nil {
					if r.NoPrefetch || r.PrefetchEnd <= 0 {
						t.Errorf("prioritized blob: NoPrefetch %v PrefetchEnd %d", r.NoPrefetch, r.PrefetchEnd)
					}
					n, _ := r.Lookup(c.prio[0])
					if n.Chunks[0].Offset >= r.PrefetchEnd {
						t.Errorf("prioritized %s at %d, after the landmark at %d", c.prio[0], n.Chunks[0].Offset, r.PrefetchEnd)
					}
				} else if !r.NoPrefetch || r.PrefetchEnd != -1 {
					t.Errorf("NoPrefetch %v PrefetchEnd %d", r.NoPrefetch, r.PrefetchEnd)
				}
				if c.minChunk > 0 {
					shared := 0
					for _, ch := range r.Chunks() {
						if ch.InnerOffset > 0 {
							shared++
						}
					}
					if shared == 0 {
						t.Errorf("WithMinChunkSize(%d) produced no shared members", c.minChunk)
					}
				}
				// Chunks decode on their own from their member's bytes.
				dec := NewDecoder()
				for _, ch := range r.Chunks() {
					if _, err := dec.DecodeChunk(comp, blob[ch.Offset:ch.End], ch, nil); err != nil {
						t.Errorf("%v: %v", ch, err)
					}
				}
				// And our builder can rebuild upstream's blob.
				blob2, res := build(t, blob, BuildOptions{Compression: comp, ChunkSize: chunk})
				r2 := openBlob(t, blob2, OpenOptions{TOCDigest: res.TOCDigest})
				checkIndexAgainstTar(t, r2, srcEnts, compareOpts{chunkSize: chunk})
			})
		}
	}
}

// Blobs built by us open with upstream's reader, pass its TOC and chunk
// verification and read back the same bytes and metadata.
func TestOurBlobsWithUpstreamReader(t *testing.T) {
	srcs := map[string][]byte{
		"compat": compatFixture(t),
		"rich":   fixture.Tar(t, richFixture(tar.FormatPAX, "./")),
	}
	for name, src := range srcs {
		srcEnts := fixture.Read(t, (src))
		for _, comp := range compressions {
			for _, chunk := range []int64{1000, 4096, 0} {
				for _, prio := range [][]string{nil, {"etc/passwd", "usr/bin/app", "dir/hard"}} {
					t.Run(fmt.Sprintf("%s/%v/chunk=%d/prio=%d", name, comp, chunk, len(prio)), func(t *testing.T) {
						t.Parallel()
						blob, res := build(t, src, BuildOptions{Compression: comp, ChunkSize: chunk, Prioritized: prio, TempDir: t.TempDir()})
						checkUpstreamReads(t, comp, blob, res, srcEnts)
					})
				}
			}
		}
	}
}

func checkUpstreamReads(t *testing.T, comp Compression, blob []byte, res *BuildResult, srcEnts []fixture.Entry) {
	t.Helper()
	sr := io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob)))
	ur, err := upstream.Open(sr, upstream.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		t.Fatalf("upstream Open: %v", err)
	}
	if ur.TOCDigest() != res.TOCDigest {
		t.Errorf("upstream TOC digest %s, ours %s", ur.TOCDigest(), res.TOCDigest)
	}
	v, err := ur.VerifyTOC(res.TOCDigest)
	if err != nil {
		t.Fatalf("upstream VerifyTOC: %v", err)
	}
	if _, err := ur.VerifyTOC(digest.FromString("other")); err == nil {
		t.Errorf("upstream VerifyTOC accepted a wrong digest")
	}
	// Upstream's unpacker yields the payload region of our decompressed
	// stream: all of it (the DiffID) for zstd:chunked, everything before
	// the TOC entry for gzip.
	var d upstream.Decompressor = new(upstream.GzipDecompressor)
	if comp == Zstd {
		d = new(zstdchunked.Decompressor)
	}
	rc, err := upstream.Unpack(sr, d)
	if err != nil {
		t.Fatalf("upstream Unpack: %v", err)
	}
	unpacked, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatalf("upstream Unpack: %v", err)
	}
	plain := decompressAll(t, comp, blob)
	if comp == Zstd && digest.FromBytes(unpacked) != res.DiffID {
		t.Errorf("upstream unpacks a stream of digest %s, DiffID is %s", digest.FromBytes(unpacked), res.DiffID)
	}
	if !bytes.HasPrefix(plain, unpacked) || len(fixture.Read(t, (unpacked))) == 0 {
		t.Errorf("upstream unpacks %d bytes that are not a tar prefix of the %d-byte stream", len(unpacked), len(plain))
	}

	want, order := finalState(t, srcEnts)
	verified := 0
	for _, name := range order {
		e := want[name]
		ue, ok := ur.Lookup(name)
		if !ok {
			t.Errorf("%q: upstream cannot find it", name)
			continue
		}
		hh := &e.Header
		if hh.Typeflag == tar.TypeLink {
			te, _ := ur.Lookup(mustClean(t, hh.Linkname))
			if te != ue {
				t.Errorf("%q: upstream resolves the hardlink to %q", name, ue.Name)
			}
			continue
		}
		if ue.Type != tarTypeToTOC(hh.Typeflag) || ue.Mode != hh.Mode || ue.UID != hh.Uid || ue.GID != hh.Gid ||
			ue.Uname != hh.Uname || ue.Gname != hh.Gname || ue.DevMajor != int(hh.Devmajor) || ue.DevMinor != int(hh.Devminor) {
			t.Errorf("%q: upstream sees %s mode %o owner %d:%d %q:%q dev %d,%d; want %s %o %d:%d %q:%q %d,%d", name,
				ue.Type, ue.Mode, ue.UID, ue.GID, ue.Uname, ue.Gname, ue.DevMajor, ue.DevMinor,
				tarTypeToTOC(hh.Typeflag), hh.Mode, hh.Uid, hh.Gid, hh.Uname, hh.Gname, hh.Devmajor, hh.Devminor)
		}
		if !ue.ModTime().Equal(hh.ModTime) {
			t.Errorf("%q: upstream mtime %v, want %v", name, ue.ModTime(), hh.ModTime)
		}
		if hh.Typeflag == tar.TypeSymlink && ue.LinkName != hh.Linkname {
			t.Errorf("%q: upstream link %q, want %q", name, ue.LinkName, hh.Linkname)
		}
		if !xattrsEqual(ue.Xattrs, xattrsOf(hh)) {
			t.Errorf("%q: upstream xattrs %q, want %q", name, ue.Xattrs, xattrsOf(hh))
		}
		if ue.Type != TypeReg {
			continue
		}
		if ue.Size != int64(len(e.Data)) {
			t.Errorf("%q: upstream size %d, want %d", name, ue.Size, len(e.Data))
		}
		f, err := ur.OpenFile(name)
		if err != nil {
			t.Errorf("%q: upstream OpenFile: %v", name, err)
			continue
		}
		got, err := io.ReadAll(f)
		if err != nil || !bytes.Equal(got, e.Data) {
			t.Errorf("%q: upstream reads %d bytes (%v), want the %d source bytes", name, len(got), err, len(e.Data))
			continue
		}
		// Every chunk passes upstream's verifier, the way the stargz
		// snapshotter checks what it fetches.
		for off := int64(0); off < ue.Size; {
			ce, ok := ur.ChunkEntryForOffset(name, off)
			if !ok {
				t.Errorf("%q: upstream has no chunk at %d", name, off)
				break
			}
			cv, err := v.Verifier(ce)
			if err != nil {
				t.Errorf("%q chunk at %d: %v", name, off, err)
				break
			}
			cv.Write(got[ce.ChunkOffset : ce.ChunkOffset+ce.ChunkSize])
			if !cv.Verified() {
				t.Errorf("%q chunk at %d: upstream verifier rejects it", name, off)
			}
			// A flipped byte must not verify.
			bad, _ := v.Verifier(ce)
			flipped := bytes.Clone(got[ce.ChunkOffset : ce.ChunkOffset+ce.ChunkSize])
			flipped[0] ^= 1
			bad.Write(flipped)
			if bad.Verified() {
				t.Errorf("%q chunk at %d: upstream verifier accepts corrupt bytes", name, off)
			}
			verified++
			off = ce.ChunkOffset + ce.ChunkSize
		}
	}
	if verified == 0 {
		t.Errorf("no chunk was verified")
	}
}
