package fs_test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// After a restart (a new Manager and store on the same Root and cache
// directory) a layer mounts without its registry; what was read before
// reads again, the rest fails with EIO instead of hanging.
func TestOfflineRemount(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	cacheDir, root := t.TempDir(), t.TempDir()
	fx := newFixture(t, fixture.RichLayer(4096))
	read := []string{fixture.RichSmall, fixture.RichMulti, "xattrs/file", "many/file-007-" + strings.Repeat("x", 40)}
	uncached := []string{fixture.RichText, fixture.RichLarge}

	first := newEnv(t, envOptions{reg: reg, cacheDir: cacheDir, root: root,
		manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{ReadAhead: -1}}})
	src := first.push(t, "offline", oursZstd.build(t, fx.tar, 4096, nil))
	dir, _ := first.mount(t, src)
	for _, p := range read {
		mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
	}
	// Part of a file: its first chunk only.
	f, err := os.OpenFile(filepath.Join(dir, fixture.RichLarge), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := first.mgr.Close(); err != nil {
		t.Fatal(err)
	}
	first.store.Close()
	reg.Stop()

	fast := func(o *remote.Options) { o.Retries, o.RequestTimeout = 1, time.Second }
	timeout := 3 * time.Second
	for _, tc := range []struct {
		name     string
		registry bool
	}{{"registry down", true}, {"no registry", false}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, envOptions{reg: reg, cacheDir: cacheDir, root: root, client: fast,
				manager: lfs.ManagerOptions{Layer: lfs.LayerOptions{FetchTimeout: timeout}}})
			mgr := e.mgr
			if !tc.registry {
				o := e.opts
				o.Registry = nil
				var err error
				if mgr, err = lfs.NewManager(o); err != nil {
					t.Fatal(err)
				}
				defer mgr.Close()
			}
			dir := filepath.Join(t.TempDir(), "mnt")
			m, err := mgr.Mount(t.Context(), dir, src)
			if err != nil {
				t.Fatalf("Mount without the registry: %v", err)
			}
			defer func() {
				if err := mgr.Unmount(t.Context(), dir); err != nil {
					t.Error(err)
				}
			}()
			// Metadata is all there.
			got, err := fixture.Walk(dir, fixture.WalkOptions{NoContent: true})
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range fixture.Diff(fx.want, got, &fixture.DiffOptions{AllowExtra: fixture.Landmarks}) {
				t.Error(d)
			}
			for _, p := range append(read, fixture.RichMultiLinks...) {
				mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
			}
			f, err := os.OpenFile(filepath.Join(dir, fixture.RichLarge), os.O_RDONLY|syscall.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil {
				t.Errorf("reading the cached first chunk of %s: %v", fixture.RichLarge, err)
			}
			for _, p := range uncached {
				t0 := time.Now()
				wantEIO(t, filepath.Join(dir, p), fx.want[p].Data)
				if d := time.Since(t0); d > timeout+2500*time.Millisecond {
					t.Errorf("%s: failing read took %v, want < FetchTimeout + 2.5s", p, d)
				}
			}
			if st := m.Layer().Stats(); st.CacheHits == 0 || st.VerifyFailures != 0 || st.FetchedBytes != 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}
