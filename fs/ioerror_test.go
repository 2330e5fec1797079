package fs_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/faultfs"
	"github.com/lazypull/lazypull/internal/fixture"
)

// A cached chunk whose file fails to read with an I/O error (a real EIO,
// from a FUSE file standing in for a failing disk) is dropped from the
// cache and fetched again: the read returns the right bytes, well within
// the fetch timeout, instead of finding the chunk still listed, failing to
// read it, and trying again forever.
func TestCachedChunkIOErrorRefetches(t *testing.T) {
	const fetchTimeout = 3 * time.Second
	opts := envOptions{filePerChunk: true, manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{FetchTimeout: fetchTimeout, ReadAhead: -1}}}
	data := fixture.Random(90, 50000)
	fx := newFixture(t, []fixture.Entry{fixture.Reg("f", 0o644, data)})

	// A first daemon caches the file's one chunk on disk.
	e1 := newEnv(t, opts)
	src := e1.push(t, "eio", oursGzip.build(t, fx.tar, 64<<10, nil))
	dir1, _ := e1.mount(t, src)
	mustRead(t, filepath.Join(dir1, "f"), data)
	unmount(t, e1.mgr, dir1)
	e1.store.Close()

	// A restarted daemon on the same cache directory; then the disk under
	// the entry fails, so its first read (the verification) gets EIO.
	o2 := opts
	o2.reg, o2.cacheDir = e1.reg, e1.cacheDir
	e2 := newEnv(t, o2)
	d := digest.FromBytes(data)
	p := filepath.Join(e1.cacheDir, "sha256", d.Encoded()[:2], d.Encoded())
	if !e2.store.Has(d) {
		t.Fatal("chunk not cached on disk")
	}
	os.Remove(p)
	if err := os.Symlink(faultfs.EIOFile(t, int64(len(data))), p); err != nil {
		t.Fatal(err)
	}
	dir2, m := e2.mount(t, src)
	done := make(chan struct{})
	var got []byte
	var err error
	go func() {
		defer close(done)
		got, err = readFile(t, filepath.Join(dir2, "f"))
	}()
	select {
	case <-done:
	case <-time.After(3 * fetchTimeout): // a liveness bound, not a speed assertion
		t.Fatalf("read of a chunk whose cache entry fails with EIO did not return within %v", 3*fetchTimeout)
	}
	if err != nil || string(got) != string(data) {
		t.Fatalf("read: %d bytes, %v; want the file's %d bytes", len(got), err, len(data))
	}
	if st := e2.store.Stats(); st.Corrupt != 1 {
		t.Errorf("cache stats %+v: want the failing entry discarded", st)
	}
	if st := m.Layer().Stats(); st.Requests == 0 {
		t.Errorf("layer stats %+v: want the chunk fetched again", st)
	}
	if !e2.store.Has(d) {
		t.Error("chunk fetched again but not cached again")
	}
}
