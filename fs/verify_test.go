package fs_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

const verifyChunk = 16 << 10

// verifyLayer has a 1 MiB victim file of 64 chunks of random data (stored
// uncompressed by both compressors, so a flipped byte decompresses fine
// and only the digest catches it) and two bystanders.
func verifyLayer() []fixture.Entry {
	return []fixture.Entry{
		fixture.Dir("a/", 0o755),
		fixture.Reg("a/victim", 0o644, fixture.Random(21, 64*verifyChunk)),
		fixture.Reg("a/other", 0o644, fixture.Random(22, 50000)),
		fixture.Reg("a/small", 0o644, fixture.Text(23, 900)),
	}
}

// A blob whose bytes were altered in the registry (the TOC, and so the
// toc.digest annotation, still the original's): the file whose chunk
// changed fails with EIO, having returned only correct bytes; everything
// else reads; the bad chunk is never cached and is refetched (and fails
// again) on every read; the failure is counted.
func TestAlteredBlob(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	for _, conv := range []converter{oursGzip, oursZstd} {
		t.Run(conv.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOptions{reg: reg, filePerChunk: true})
			fx := newFixture(t, verifyLayer())
			b := conv.build(t, fx.tar, verifyChunk, nil)
			r, err := estargz.Open(bytes.NewReader(b.data), int64(len(b.data)), estargz.OpenOptions{TOCDigest: b.tocDigest})
			if err != nil {
				t.Fatal(err)
			}
			victim, _ := r.Lookup("a/victim")
			bad := victim.Chunks[len(victim.Chunks)-1]
			altered := bytes.Clone(b.data)
			altered[bad.Offset+(bad.End-bad.Offset)/2] ^= 0x55
			src := e.push(t, "altered", blob{data: altered, tocDigest: b.tocDigest, comp: b.comp})
			if src.Digest == digest.FromBytes(b.data) {
				t.Fatal("blob not altered")
			}
			dir, m := e.mount(t, src)
			l := m.Layer()

			mustRead(t, filepath.Join(dir, "a/other"), fx.want["a/other"].Data)
			mustRead(t, filepath.Join(dir, "a/small"), fx.want["a/small"].Data)
			want := fx.want["a/victim"].Data
			// The start of the victim is fine (far from the bad chunk).
			f, err := os.OpenFile(filepath.Join(dir, "a/victim"), os.O_RDONLY|syscall.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			buf := make([]byte, 4096)
			if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, want[:4096]) {
				t.Fatalf("reading the good start of the victim: %v", err)
			}
			// The directory read-ahead of that first read covers the
			// whole victim: it may have failed on the altered chunk
			// already (once: the chunk is not cached, and fails again
			// only when fetched again).
			// A good chunk whose read-ahead takes in the altered one reads
			// fine; the altered chunk is counted, not cached.
			near := victim.Chunks[len(victim.Chunks)-4]
			if _, err := f.ReadAt(buf, near.FileOffset); err != nil || !bytes.Equal(buf, want[near.FileOffset:near.FileOffset+4096]) {
				t.Fatalf("reading a good chunk near the altered one: %v", err)
			}
			// The reader gets its chunk as soon as it is verified; the
			// rest of the read-ahead group is verified right after.
			deadline := time.Now().Add(10 * time.Second)
			for l.Stats().VerifyFailures == 0 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if n := l.Stats().VerifyFailures; n < 1 || n > 2 {
				t.Errorf("VerifyFailures = %d after read-aheads over the altered chunk, want 1 or 2", n)
			}
			for range 2 {
				if _, err := f.ReadAt(buf, bad.FileOffset+100); !errors.Is(err, syscall.EIO) {
					t.Fatalf("reading the altered chunk: %v, want EIO", err)
				}
			}
			wantEIO(t, filepath.Join(dir, "a/victim"), want)

			// Straight from the Layer: the error says what failed.
			_, err = l.ReadAt(context.Background(), victim, buf, bad.FileOffset)
			// gzip: the flipped byte decompresses and the digest catches
			// it; zstd: the frame checksum catches it first.
			kind := estargz.ErrDigest
			if b.comp == estargz.Zstd {
				kind = estargz.ErrFormat
			}
			if !errors.Is(err, lfs.ErrVerify) || !errors.Is(err, kind) || !strings.Contains(err.Error(), "a/victim") {
				t.Errorf("Layer.ReadAt of the altered chunk: %v, want a verification error (%v) naming the file", err, kind)
			}
			st := l.Stats()
			if st.VerifyFailures < 5 {
				t.Errorf("VerifyFailures = %d, want >= 5 (each read of the chunk refetches and fails)", st.VerifyFailures)
			}
			if e.store.Has(bad.Digest) {
				t.Error("the altered chunk's digest is in the store")
			}
			if !e.store.Has(victim.Chunks[0].Digest) {
				t.Error("the victim's good first chunk is not cached")
			}
			if n := checkStoreIntact(t, e.cacheDir); n == 0 {
				t.Error("nothing cached on disk")
			}
		})
	}
}

// Bytes corrupted in transit fail the read with EIO; the corruption is
// not cached, and the next read fetches good bytes. (A buffered read does
// not even see the error: the kernel retries a failed readahead page with
// a read of its own, which fetches again.)
func TestCorruptedInTransit(t *testing.T) {
	// One request per miss: the injected fault must hit the reader's own
	// chunk, not a read-ahead request sent beside it.
	e := newEnv(t, envOptions{filePerChunk: true, manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{ReadAhead: -1}}})
	fx := newFixture(t, verifyLayer())
	src := e.push(t, "transit", oursGzip.build(t, fx.tar, verifyChunk, nil))
	dir, m := e.mount(t, src)
	want := fx.want["a/other"].Data

	e.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Corrupt: true, Times: 1})
	f, err := os.OpenFile(filepath.Join(dir, "a/other"), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, len(want))
	if _, err := f.ReadAt(buf, 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of corrupted bytes: %v, want EIO", err)
	}
	if n, err := f.ReadAt(buf, 0); n != len(want) || !bytes.Equal(buf, want) {
		t.Fatalf("read after the corruption: %d bytes, %v", n, err)
	}
	if n := m.Layer().Stats().VerifyFailures; n != 1 {
		t.Errorf("VerifyFailures = %d, want 1", n)
	}

	e.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Corrupt: true, Times: 1})
	mustRead(t, filepath.Join(dir, "a/victim"), fx.want["a/victim"].Data)
	if n := m.Layer().Stats().VerifyFailures; n != 2 {
		t.Errorf("VerifyFailures = %d, want 2", n)
	}
	if faulted := e.reg.Count(func(q remotetest.Request) bool { return q.Faulted }); faulted != 2 {
		t.Errorf("%d faulted requests, want 2", faulted)
	}
	checkStoreIntact(t, e.cacheDir)
}

// The TOC is checked against the layer's toc.digest annotation: a wrong
// one refuses the mount, also when the layer's metadata was saved by an
// earlier mount; a missing one refuses the mount unless AllowUnverified;
// tampered saved metadata is not trusted.
func TestTOCDigest(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	e := newEnv(t, envOptions{reg: reg})
	fx := newFixture(t, verifyLayer())
	b := oursZstd.build(t, fx.tar, verifyChunk, nil)
	src := e.push(t, "toc", b)
	ctx := context.Background()

	wrong := src
	wrong.TOCDigest = digest.FromString("not the TOC")
	mnt := filepath.Join(t.TempDir(), "mnt")
	if _, err := e.mgr.Mount(ctx, mnt, wrong); !errors.Is(err, estargz.ErrDigest) || !strings.Contains(err.Error(), "TOC digest") {
		t.Errorf("Mount with a wrong TOC digest: %v, want a TOC digest mismatch", err)
	}
	missing := src
	missing.TOCDigest = ""
	if _, err := e.mgr.Mount(ctx, mnt, missing); !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), estargz.TOCDigestAnnotation) {
		t.Errorf("Mount without a TOC digest: %v, want FailedPrecondition naming the annotation", err)
	}
	if len(e.mgr.Mounts()) != 0 {
		t.Fatal("a refused layer is mounted")
	}

	// Saved metadata does not let a wrong digest through.
	dir, _ := e.mount(t, src)
	mustRead(t, filepath.Join(dir, "a/small"), fx.want["a/small"].Data)
	unmount(t, e.mgr, dir)
	if _, err := e.mgr.Mount(ctx, mnt, wrong); err == nil {
		t.Error("Mount with a wrong TOC digest succeeded from saved metadata")
	}

	// Saved metadata whose TOC was tampered with is ignored: the TOC is
	// read from the registry again.
	tocs, _ := filepath.Glob(filepath.Join(e.root, "layers", "*", "toc.json"))
	if len(tocs) != 1 {
		t.Fatalf("saved TOCs: %v", tocs)
	}
	saved, err := os.ReadFile(tocs[0])
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Replace(saved, []byte(`"a/small"`), []byte(`"a/smalL"`), 1)
	if bytes.Equal(tampered, saved) {
		t.Fatal("TOC not tampered")
	}
	if err := os.WriteFile(tocs[0], tampered, 0o600); err != nil {
		t.Fatal(err)
	}
	before := reg.Count(remotetest.RangeGETs)
	dir, _ = e.mount(t, src)
	if _, err := os.Stat(filepath.Join(dir, "a/smalL")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("tampered TOC served: %v", err)
	}
	mustRead(t, filepath.Join(dir, "a/small"), fx.want["a/small"].Data)
	if reg.Count(remotetest.RangeGETs) == before {
		t.Error("the TOC was not read from the registry again")
	}

	// AllowUnverified mounts a layer without a TOC digest.
	u := newEnv(t, envOptions{reg: reg, manager: lfs.ManagerOptions{AllowUnverified: true}})
	dir, _ = u.mount(t, missing)
	compareTree(t, dir, fx.want, &fixture.DiffOptions{AllowExtra: fixture.Landmarks})
}
