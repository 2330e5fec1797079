package fs_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
)

// A ReadLog records, per image, each file the first time it is opened or
// read, in order: not stats or listings, not repeated reads, hardlinked
// names as the file's first name. The log is what a prioritized build
// takes, and it prefetches those files.
func TestReadLog(t *testing.T) {
	logDir := t.TempDir()
	rl, err := lfs.NewReadLog(logDir)
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Recorder: rl}})
	fx := newFixture(t, fetchLayer())
	src := e.push(t, "record", oursGzip.build(t, fx.tar, fetchChunk, nil))
	dir, _ := e.mount(t, src)
	for _, p := range []string{"etc/conf", "app/start", "app/lib/big.1", "etc/conf", "app/lib/big"} {
		mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
	}
	if _, err := os.Stat(filepath.Join(dir, "app/other")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadDir(filepath.Join(dir, "rest")); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(logDir, lfs.RecordFileName(src.Ref)))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Fields(string(b))
	want := []string{"etc/conf", "app/start", "app/lib/big"}
	if !slices.Equal(got, want) {
		t.Fatalf("read log %q, want %q", got, want)
	}

	// Built with the log as its prioritized files, the layer prefetches
	// exactly those.
	p := newEnv(t, envOptions{manager: lfs.ManagerOptions{Fetch: lfs.FetchOptions{Prefetch: true}}})
	psrc := p.push(t, "recorded", oursGzip.build(t, fx.tar, fetchChunk, got))
	_, m := p.mount(t, psrc)
	m.Layer().WaitFetching()
	for _, f := range want {
		for _, d := range chunkDigests(t, m.Layer(), f) {
			if !p.store.Has(d) {
				t.Errorf("%s: not prefetched", f)
			}
		}
	}
	for _, d := range chunkDigests(t, m.Layer(), "app/other") {
		if p.store.Has(d) {
			t.Error("app/other prefetched")
		}
	}
}

// chunkLog is a layer Recorder collecting chunk reads.
type chunkLog struct {
	mu     sync.Mutex
	chunks []int64
}

func (c *chunkLog) FirstRead(digest.Digest, string) {}

func (c *chunkLog) ChunkRead(_ digest.Digest, ch estargz.Chunk) {
	c.mu.Lock()
	c.chunks = append(c.chunks, ch.Offset)
	c.mu.Unlock()
}

func (c *chunkLog) list() []int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.chunks)
}

// A layer Recorder keeps passthrough on, so a file already cached when it
// is opened is read by the kernel: its open is what the recorder learns.
func TestRecorderSeesPassthroughOpens(t *testing.T) {
	fx := newFixture(t, []fixture.Entry{
		fixture.Reg("single", 0o644, fixture.Random(90, 10000)),
		fixture.Reg("other", 0o644, fixture.Random(91, 3000)),
	})
	b := oursGzip.build(t, fx.tar, 64<<10, nil)
	rec := &chunkLog{}
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{
		Mount: lfs.MountOptions{Passthrough: true},
		Layer: lfs.LayerOptions{Recorder: rec},
	}})
	src := e.push(t, "ptrecord", b)
	dir, m := e.mount(t, src)
	mustRead(t, filepath.Join(dir, "single"), fx.want["single"].Data)
	off := chunkOffsets(t, m.Layer(), "single")
	if got := rec.list(); !slices.Equal(got, off) {
		t.Fatalf("first read through FUSE recorded %v, want %v", got, off)
	}
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	// Mounted again: "single" is cached, so its open is passthrough and
	// no READ reaches the daemon; the open is recorded.
	dir2, m2 := e.mount(t, src)
	mustRead(t, filepath.Join(dir2, "single"), fx.want["single"].Data)
	mustRead(t, filepath.Join(dir2, "other"), fx.want["other"].Data)
	want := append(slices.Clone(off), off...)
	want = append(want, chunkOffsets(t, m2.Layer(), "other")...)
	if got := rec.list(); !slices.Equal(got, want) {
		t.Fatalf("recorded %v, want %v", got, want)
	}
}

// chunkOffsets are the compressed offsets of file p's chunks.
func chunkOffsets(t *testing.T, l *lfs.Layer, p string) []int64 {
	t.Helper()
	n, ok := l.Index().Lookup(p)
	if !ok {
		t.Fatalf("%s not in the layer", p)
	}
	var out []int64
	for _, c := range n.Chunks {
		out = append(out, c.Offset)
	}
	return out
}
