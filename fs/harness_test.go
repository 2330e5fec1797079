package fs_test

// Test harness: a real registry (remotetest), our registry client, a real
// chunk store and a Manager, with layer blobs built by our builder and by
// upstream's.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/fixture/upstream"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// blob is a built eStargz layer blob.
type blob struct {
	data      []byte
	tocDigest digest.Digest
	comp      estargz.Compression
}

// converter turns a layer tar into an eStargz blob.
type converter struct {
	name string
	// mtime is the precision the converter keeps modification times at.
	mtime time.Duration
	build func(t testing.TB, tarBytes []byte, chunkSize int, prioritized []string) blob
}

var (
	oursGzip     = converter{"ours-gzip", 0, oursBuild(estargz.Gzip)}
	oursZstd     = converter{"ours-zstd", 0, oursBuild(estargz.Zstd)}
	upstreamGzip = converter{"upstream-gzip", time.Second, upstreamBuild(estargz.Gzip)}
	upstreamZstd = converter{"upstream-zstd", time.Second, upstreamBuild(estargz.Zstd)}
	converters   = []converter{oursGzip, oursZstd, upstreamGzip, upstreamZstd}
)

func oursBuild(comp estargz.Compression) func(testing.TB, []byte, int, []string) blob {
	return func(t testing.TB, tarBytes []byte, chunkSize int, prio []string) blob {
		t.Helper()
		var out bytes.Buffer
		res, err := estargz.Build(context.Background(), &out, bytes.NewReader(tarBytes), estargz.BuildOptions{
			Compression: comp, Level: 1, ChunkSize: int64(chunkSize), Prioritized: prio, TempDir: t.TempDir(),
		})
		if err != nil {
			t.Fatalf("estargz.Build: %v", err)
		}
		if len(res.MissingPrioritized) > 0 {
			t.Fatalf("prioritized files missing: %v", res.MissingPrioritized)
		}
		return blob{data: out.Bytes(), tocDigest: res.TOCDigest, comp: comp}
	}
}

func upstreamBuild(comp estargz.Compression) func(testing.TB, []byte, int, []string) blob {
	return func(t testing.TB, tarBytes []byte, chunkSize int, prio []string) blob {
		t.Helper()
		b := upstream.Build(t, tarBytes, upstream.Options{Zstd: comp == estargz.Zstd, Fast: true, ChunkSize: chunkSize, Prioritized: prio})
		return blob{data: b.Data, tocDigest: b.TOCDigest, comp: comp}
	}
}

// env is a registry, a client for it, a chunk store and a Manager.
type env struct {
	reg      *remotetest.Registry
	client   *remote.Registry
	cacheDir string
	root     string
	store    *cache.Store
	mgr      *lfs.Manager
	opts     lfs.ManagerOptions
}

// envOptions tune newEnv.
type envOptions struct {
	reg      *remotetest.Registry // default: a new one
	manager  lfs.ManagerOptions   // Root, Registry and Store are filled in
	client   func(*remote.Options)
	cacheDir string // default: a new temporary directory
	root     string // default: a new temporary directory
	memOnly  bool   // a store without a disk tier
	// filePerChunk keeps every disk entry in a file of its own (the
	// cache library's default) instead of packing small chunks as the
	// daemon does: for tests that reach into entry files.
	filePerChunk bool
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	e := &env{reg: o.reg, cacheDir: o.cacheDir, root: o.root}
	if e.reg == nil {
		e.reg = remotetest.NewRegistry(t)
	}
	e.client = newClient(t, o.client)
	if e.cacheDir == "" {
		e.cacheDir = t.TempDir()
	}
	if e.root == "" {
		e.root = t.TempDir()
	}
	e.store = openStore(t, e.cacheDir, o.memOnly, !o.filePerChunk)
	e.opts = o.manager
	e.opts.Root, e.opts.Registry, e.opts.Store = e.root, e.client, e.store
	if e.opts.Layer.FetchTimeout == 0 {
		e.opts.Layer.FetchTimeout = 20 * time.Second
	}
	mgr, err := lfs.NewManager(e.opts)
	if err != nil {
		t.Fatal(err)
	}
	e.mgr = mgr
	t.Cleanup(func() {
		if err := mgr.Close(); err != nil {
			t.Errorf("Manager.Close: %v", err)
		}
	})
	return e
}

func newClient(t testing.TB, mod func(*remote.Options)) *remote.Registry {
	t.Helper()
	o := remote.Options{
		PlainHTTP:      true,
		HostsDir:       t.TempDir(),
		DockerConfig:   filepath.Join(t.TempDir(), "config.json"),
		RequestTimeout: 10 * time.Second,
		RetryBackoff:   10 * time.Millisecond,
	}
	if mod != nil {
		mod(&o)
	}
	c, err := remote.New(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// openStore opens the chunk cache in dir (none with memOnly), packing
// small chunks as the daemon does when pack is set.
func openStore(t testing.TB, dir string, memOnly, pack bool) *cache.Store {
	t.Helper()
	o := cache.Options{Dir: dir}
	if pack {
		o.PackMaxEntry = cache.DefaultPackMaxEntry
	}
	if memOnly {
		o.Dir = ""
	}
	s, err := cache.Open(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// push uploads b to repo and returns the source to mount it.
func (e *env) push(t testing.TB, repo string, b blob) lfs.LayerSource {
	t.Helper()
	desc := e.reg.PushBlob(t, repo, b.data)
	return lfs.LayerSource{Ref: e.reg.Ref(repo, "latest"), Digest: desc.Digest, Size: desc.Size, TOCDigest: b.tocDigest}
}

// mount mounts src at a new directory, unmounted at the end of the test.
func (e *env) mount(t testing.TB, src lfs.LayerSource) (string, *lfs.Mount) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "mnt")
	m, err := e.mgr.Mount(context.Background(), dir, src)
	if err != nil {
		t.Fatalf("Mount %s: %v", src.Digest, err)
	}
	t.Cleanup(func() { unmount(t, e.mgr, dir) })
	return dir, m
}

func unmount(t testing.TB, mgr *lfs.Manager, dir string) {
	t.Helper()
	if _, ok := mgr.Lookup(dir); !ok {
		return
	}
	closeLeaked(t, dir)
	if err := mgr.Unmount(context.Background(), dir); err != nil {
		t.Errorf("Unmount %s: %v", dir, err)
	}
}

// closeLeaked closes (and reports) files the test left open below dir. A
// file left open on a mount served by this process would be detached
// with the mount and then deadlock the process at exit: closing it sends
// FLUSH to a server that is gone.
func closeLeaked(t testing.TB, dir string) {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fds {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || (target != dir && !strings.HasPrefix(target, dir+"/")) {
			continue
		}
		fd, _ := strconv.Atoi(e.Name())
		t.Errorf("%s left open (fd %d); closing it", target, fd)
		unix.Close(fd)
	}
}

// layerFixture is a layer tar, its entries and the tree a mount must show.
type layerFixture struct {
	tar     []byte
	entries []fixture.Entry
	want    fixture.Tree
}

func newFixture(t testing.TB, entries []fixture.Entry) layerFixture {
	t.Helper()
	tb := fixture.Tar(t, entries)
	read := fixture.Read(t, tb)
	return layerFixture{tar: tb, entries: read, want: fixture.LayerView(read)}
}

// compareTree walks dir and compares it with want.
func compareTree(t testing.TB, dir string, want fixture.Tree, o *fixture.DiffOptions) {
	t.Helper()
	got, err := fixture.Walk(dir, fixture.WalkOptions{})
	if err != nil {
		t.Fatalf("walking %s: %v", dir, err)
	}
	diffs := fixture.Diff(want, got, o)
	for i, d := range diffs {
		if i == 40 {
			t.Errorf("... and %d more differences", len(diffs)-i)
			break
		}
		t.Error(d)
	}
}

// dropPages evicts a file's pages from the page cache, so that the next
// read goes to the file system again.
func dropPages(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatalf("fadvise %s: %v", path, err)
	}
}

// readFile reads a whole file, dropping its cached pages first.
func readFile(t testing.TB, path string) ([]byte, error) {
	t.Helper()
	dropPages(t, path)
	return os.ReadFile(path)
}

// mustRead reads a whole file (from the file system, not the page cache)
// and checks its content.
func mustRead(t testing.TB, path string, want []byte) {
	t.Helper()
	got, err := readFile(t, path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: read %d bytes (%s), want %d bytes (%s)", path, len(got), digest.FromBytes(got), len(want), digest.FromBytes(want))
	}
}

// wantEIO reads a file and checks that the read fails with EIO after
// returning only a correct prefix.
func wantEIO(t testing.TB, path string, want []byte) {
	t.Helper()
	dropPages(t, path)
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading %s: %v after %d bytes, want EIO", path, err, len(got))
	}
	if !bytes.HasPrefix(want, got) {
		t.Fatalf("reading %s returned %d bytes that are not the file's content before failing", path, len(got))
	}
}

// chunkFiles returns the chunk digests of the file at p in layer l.
func chunkDigests(t testing.TB, l *lfs.Layer, p string) []digest.Digest {
	t.Helper()
	n, ok := l.Index().Lookup(p)
	if !ok {
		t.Fatalf("%s not in the layer's index", p)
	}
	var ds []digest.Digest
	for _, c := range n.Chunks {
		ds = append(ds, c.Digest)
	}
	return ds
}

// checkStoreIntact hashes every entry file of the store's disk tier (a
// store opened with filePerChunk: packed chunks are checked by the cache
// package's own tests) and checks
// it against its name.
func checkStoreIntact(t testing.TB, dir string) int {
	t.Helper()
	n := 0
	err := filepath.Walk(filepath.Join(dir, "sha256"), func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if got := digest.FromBytes(b).Encoded(); got != filepath.Base(p) {
			t.Errorf("store entry %s holds bytes with digest %s", p, got)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rangeGETs counts the range requests on blob d.
func rangeGETs(reg *remotetest.Registry, d digest.Digest) int {
	return reg.Count(func(q remotetest.Request) bool {
		return remotetest.RangeGETs(q) && strings.Contains(q.Path, d.String())
	})
}
