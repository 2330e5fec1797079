package estargz

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/fixture/upstream"
)

// checkFixture is a layer with every kind of entry the check compares.
func checkFixture() []fixture.Entry {
	big := bytes.Repeat([]byte("0123456789abcdef"), 3000) // several chunks
	x := regFx("etc/x.conf", []byte("x=1\n")).X("user.tag", "v")
	dev := fixture.Char("dev/null", 0o666, 1, 3).At(fixtureTime)
	fifo := fixture.Fifo("run/fifo", 0o600).Own(7, 8).At(fixtureTime)
	return []fixture.Entry{
		dirFx("bin/"), regFx("bin/sh", []byte("#!shell\n")), regFx("bin/big", big),
		linkFx("bin/big2", "bin/big"), symFx("bin/ls", "sh"),
		dirFx("etc/"), x, dirFx("dev/"), dev, dirFx("run/"), fifo,
		regFx("empty", nil), regFx(".wh.gone", nil),
		regFx("implicit/dir/file", []byte("parents only implied")),
	}
}

func sha(p []byte) digest.Digest { return digest.FromBytes(p) }

func TestCheckLayerHonest(t *testing.T) {
	src := fixture.Tar(t, checkFixture())
	for _, comp := range []Compression{Gzip, Zstd} {
		for _, builder := range []string{"ours", "upstream"} {
			t.Run(fmt.Sprintf("%s/%s", comp, builder), func(t *testing.T) {
				var blob []byte
				switch builder {
				case "ours":
					blob, _ = build(t, src, BuildOptions{Compression: comp, ChunkSize: 4096})
				default:
					blob = upstream.Build(t, src, upstream.Options{Zstd: comp == Zstd, ChunkSize: 4096}).Data
				}
				r := openBlob(t, blob, OpenOptions{})
				diffID := sha(decompressAll(t, comp, blob))
				var chunks int
				var chunkBytes int64
				res, err := CheckLayer(context.Background(), bytes.NewReader(blob), comp, r.Index,
					LayerDigests{Blob: sha(blob), DiffID: diffID},
					CheckOptions{OnChunk: func(c Chunk, data []byte) error {
						if sha(data) != c.Digest || int64(len(data)) != c.Size {
							t.Errorf("OnChunk got bytes that do not match chunk %v", c)
						}
						chunks++
						chunkBytes += int64(len(data))
						return nil
					}})
				if err != nil {
					t.Fatalf("CheckLayer of an honest %s blob: %v", builder, err)
				}
				if res.BlobDigest != sha(blob) || res.DiffID != diffID || res.Size != int64(len(blob)) {
					t.Errorf("result %+v; want blob %s, diffID %s, size %d", res, sha(blob), diffID, len(blob))
				}
				want := len(r.Index.Chunks())
				if chunks != want {
					t.Errorf("OnChunk called %d times, want %d (every chunk once)", chunks, want)
				}
				if chunkBytes == 0 {
					t.Error("no chunk bytes passed on")
				}
			})
		}
	}
}

// The attack issue 9 is about: the TOC serves "evil" under a name whose
// tar entry holds "good" (by pointing the file's chunk at another member).
// Chunk digests alone accept it; CheckLayer does not.
func TestCheckLayerTOCServesOtherContent(t *testing.T) {
	for _, comp := range []Compression{Gzip, Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			src := fixture.Tar(t, []fixture.Entry{regFx("bin/x", []byte("good")), regFx("zz/y", []byte("evil"))})
			blob, _ := build(t, src, BuildOptions{Compression: comp})
			j, _, _ := rawTOC(t, comp, blob)
			toc := parseTOCJSON(t, j)
			var x, y *TOCEntry
			for _, e := range toc.Entries {
				switch e.Name {
				case "bin/x":
					x = e
				case "zz/y":
					y = e
				}
			}
			x.Offset, x.InnerOffset, x.ChunkDigest, x.Digest = y.Offset, y.InnerOffset, y.ChunkDigest, y.Digest
			forged := rebuildWithTOC(t, comp, blob, toc)
			r := openBlob(t, forged, OpenOptions{})
			// The forged layer reads "evil" and every chunk verifies.
			f, err := r.OpenFile("bin/x")
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4)
			if _, err := f.ReadAt(got, 0); err != nil || string(got) != "evil" {
				t.Fatalf("forged blob reads %q, %v; the fixture is wrong", got, err)
			}
			_, err = CheckLayer(context.Background(), bytes.NewReader(forged), comp, r.Index, LayerDigests{}, CheckOptions{})
			wantErr(t, err, ErrLayerMismatch, `"bin/x"`, "digest")
		})
	}
}

func TestCheckLayerDigests(t *testing.T) {
	src := fixture.Tar(t, checkFixture())
	blob, res := build(t, src, BuildOptions{})
	r := openBlob(t, blob, OpenOptions{})
	other := digest.FromString("other")
	_, err := CheckLayer(context.Background(), bytes.NewReader(blob), Gzip, r.Index, LayerDigests{Blob: other}, CheckOptions{})
	wantErr(t, err, ErrLayerMismatch, "blob digest", other.String())
	_, err = CheckLayer(context.Background(), bytes.NewReader(blob), Gzip, r.Index, LayerDigests{Blob: res.Digest, DiffID: other}, CheckOptions{})
	wantErr(t, err, ErrLayerMismatch, "DiffID", other.String())
	// A truncated blob is a format error, not a pass.
	_, err = CheckLayer(context.Background(), bytes.NewReader(blob[:len(blob)/2]), Gzip, r.Index, LayerDigests{}, CheckOptions{})
	if err == nil {
		t.Fatal("a truncated blob passed the check")
	}
}

// Every attribute the TOC serves is compared with the tar: change one at
// a time in the TOC and the check names the entry and the attribute.
func TestCheckLayerAttributes(t *testing.T) {
	src := fixture.Tar(t, checkFixture())
	for _, tc := range []struct {
		name   string
		entry  string
		change func(e *TOCEntry)
		want   string
	}{
		{"mode", "bin/sh", func(e *TOCEntry) { e.Mode = 0o4755 }, "mode"},
		{"owner", "run/fifo", func(e *TOCEntry) { e.UID = 0 }, "owner"},
		{"mtime", "etc/x.conf", func(e *TOCEntry) { e.ModTime3339 = "2001-01-01T00:00:00Z" }, "mtime"},
		{"symlink", "bin/ls", func(e *TOCEntry) { e.LinkName = "/etc/shadow" }, "symlink"},
		{"device", "dev/null", func(e *TOCEntry) { e.DevMinor = 5 }, "device"},
		{"xattr", "etc/x.conf", func(e *TOCEntry) { e.Xattrs = map[string][]byte{"security.capability": []byte("x")} }, "extended attributes"},
		{"type", "run/fifo", func(e *TOCEntry) { e.Type = TypeChar }, "type"},
		{"file digest", "bin/sh", func(e *TOCEntry) { e.Digest = digest.FromString("x").String() }, "content digest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob, _ := build(t, src, BuildOptions{})
			j, _, _ := rawTOC(t, Gzip, blob)
			toc := parseTOCJSON(t, j)
			found := false
			for _, e := range toc.Entries {
				if e.Name == tc.entry && e.Type != TypeChunk {
					tc.change(e)
					found = true
					break
				}
			}
			if !found {
				t.Fatalf("no entry %s", tc.entry)
			}
			forged := rebuildWithTOC(t, Gzip, blob, toc)
			r := openBlob(t, forged, OpenOptions{})
			_, err := CheckLayer(context.Background(), bytes.NewReader(forged), Gzip, r.Index, LayerDigests{}, CheckOptions{})
			wantErr(t, err, ErrLayerMismatch, fmt.Sprintf("%q", tc.entry), tc.want)
		})
	}
}

// Names the tar has and the TOC omits, and the reverse, are mismatches;
// a name repeated in the tar is compared by its last entry.
func TestCheckLayerCoverage(t *testing.T) {
	t.Run("tar has more", func(t *testing.T) {
		src := fixture.Tar(t, []fixture.Entry{regFx("a", []byte("a")), regFx("hidden", []byte("payload"))})
		blob, _ := build(t, src, BuildOptions{})
		j, _, _ := rawTOC(t, Gzip, blob)
		toc := parseTOCJSON(t, j)
		var kept []*TOCEntry
		for _, e := range toc.Entries {
			if e.Name != "hidden" {
				kept = append(kept, e)
			}
		}
		toc.Entries = kept
		forged := rebuildWithTOC(t, Gzip, blob, toc)
		r := openBlob(t, forged, OpenOptions{})
		_, err := CheckLayer(context.Background(), bytes.NewReader(forged), Gzip, r.Index, LayerDigests{}, CheckOptions{})
		wantErr(t, err, ErrLayerMismatch, `"hidden"`, "the TOC does not")
	})
	t.Run("TOC has more", func(t *testing.T) {
		src := fixture.Tar(t, []fixture.Entry{regFx("a", []byte("a"))})
		blob, _ := build(t, src, BuildOptions{})
		j, _, _ := rawTOC(t, Gzip, blob)
		toc := parseTOCJSON(t, j)
		toc.Entries = append(toc.Entries, &TOCEntry{Name: "extra", Type: TypeSymlink, LinkName: "a", ModTime3339: "2024-05-17T10:20:30Z"})
		forged := rebuildWithTOC(t, Gzip, blob, toc)
		r := openBlob(t, forged, OpenOptions{})
		_, err := CheckLayer(context.Background(), bytes.NewReader(forged), Gzip, r.Index, LayerDigests{}, CheckOptions{})
		wantErr(t, err, ErrLayerMismatch, `"extra"`, "the tar does not")
	})
	t.Run("duplicates", func(t *testing.T) {
		src := fixture.Tar(t, []fixture.Entry{regFx("a", []byte("first")), regFx("a", []byte("second"))})
		blob, _ := build(t, src, BuildOptions{})
		r := openBlob(t, blob, OpenOptions{})
		if _, err := CheckLayer(context.Background(), bytes.NewReader(blob), Gzip, r.Index, LayerDigests{Blob: sha(blob)}, CheckOptions{}); err != nil {
			t.Fatalf("a tar with a repeated name: %v", err)
		}
	})
}

func TestCheckLayerCancel(t *testing.T) {
	blob, _ := build(t, fixture.Tar(t, checkFixture()), BuildOptions{})
	r := openBlob(t, blob, OpenOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := CheckLayer(ctx, bytes.NewReader(blob), Gzip, r.Index, LayerDigests{}, CheckOptions{}); err != context.Canceled {
		t.Fatalf("cancelled check: got %v", err)
	}
}

// FuzzCheckLayer feeds arbitrary bytes as the blob checked against a valid
// index: no panic, no hang, and nothing passes unless it is the blob.
func FuzzCheckLayer(f *testing.F) {
	blob, _ := build(f, fixture.Tar(f, checkFixture()), BuildOptions{ChunkSize: 4096})
	r := openBlob(f, blob, OpenOptions{})
	f.Add(blob)
	f.Add(blob[:len(blob)/3])
	f.Add(append(bytes.Clone(blob[:100]), blob[200:]...))
	want := sha256.Sum256(blob)
	f.Fuzz(func(t *testing.T, p []byte) {
		res, err := CheckLayer(context.Background(), bytes.NewReader(p), Gzip, r.Index, LayerDigests{DiffID: sha(decompressAllOrNil(p))}, CheckOptions{})
		if err == nil && sha256.Sum256(p) != want {
			// A different blob may only pass if it unpacks to the
			// very same tar stream (e.g. recompressed).
			if res.DiffID != sha(decompressAllOrNil(blob)) {
				t.Fatalf("a blob with another tar stream passed: %+v", res)
			}
		}
	})
}

// decompressAllOrNil returns the gzip-decompressed bytes of p, or nil if p
// does not decompress.
func decompressAllOrNil(p []byte) []byte {
	zr, err := gzip.NewReader(bytes.NewReader(p))
	if err != nil {
		return nil
	}
	out, err := io.ReadAll(zr)
	if err != nil {
		return nil
	}
	return out
}

// BenchmarkCheckLayer measures whole-layer verification on the 64 MiB
// benchmark layer against what any full pull spends on the same blob:
// decompressing it and hashing the blob and the tar stream ("unpack"
// sub-benchmarks). MB/s are of the uncompressed layer.
func BenchmarkCheckLayer(b *testing.B) {
	src := benchLayer()
	for _, comp := range compressions {
		var out bytes.Buffer
		if _, err := Build(context.Background(), &out, bytes.NewReader(src), BuildOptions{Compression: comp}); err != nil {
			b.Fatal(err)
		}
		blob := out.Bytes()
		r, err := Open(bytes.NewReader(blob), int64(len(blob)), OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		plainSize := int64(len(decompressAll(b, comp, blob)))
		b.Run(comp.String()+"/check", func(b *testing.B) {
			b.SetBytes(plainSize)
			for b.Loop() {
				if _, err := CheckLayer(context.Background(), bytes.NewReader(blob), comp, r.Index, LayerDigests{}, CheckOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(comp.String()+"/unpack", func(b *testing.B) {
			b.SetBytes(plainSize)
			for b.Loop() {
				blobHash, diffHash := sha256.New(), sha256.New()
				tee := io.TeeReader(bytes.NewReader(blob), blobHash)
				var plain io.Reader
				if comp == Zstd {
					zr, err := zstd.NewReader(tee, zstd.WithDecoderConcurrency(1))
					if err != nil {
						b.Fatal(err)
					}
					plain = zr
					defer zr.Close()
				} else {
					zr, err := gzip.NewReader(tee)
					if err != nil {
						b.Fatal(err)
					}
					plain = zr
				}
				if _, err := io.Copy(diffHash, plain); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
