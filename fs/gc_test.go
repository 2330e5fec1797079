package fs_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
)

// SweepLayers removes the saved metadata of layers that are not kept and
// not mounted, and nothing else.
func TestSweepLayers(t *testing.T) {
	e := newEnv(t, envOptions{})
	var srcs []digest.Digest
	dirs := map[digest.Digest]string{}
	for i, name := range []string{"kept", "mounted", "unused"} {
		fx := newFixture(t, []fixture.Entry{fixture.Reg("f", 0o644, fixture.Random(int64(120+i), 1000))})
		src := e.push(t, name, oursGzip.build(t, fx.tar, 64<<10, nil))
		dir, _ := e.mount(t, src)
		srcs = append(srcs, src.Digest)
		dirs[src.Digest] = dir
	}
	kept, mounted, unused := srcs[0], srcs[1], srcs[2]
	unmount(t, e.mgr, dirs[kept])
	unmount(t, e.mgr, dirs[unused])
	foreign := filepath.Join(e.root, "layers", "not-a-layer")
	if err := os.Mkdir(foreign, 0o700); err != nil {
		t.Fatal(err)
	}

	saved := func(d digest.Digest) bool {
		_, err := os.Stat(filepath.Join(e.root, "layers", d.Algorithm().String()+"-"+d.Encoded(), "toc.json"))
		return err == nil
	}
	for _, d := range srcs {
		if !saved(d) {
			t.Fatalf("layer %s not saved", d)
		}
	}
	n, err := e.mgr.SweepLayers(func(d digest.Digest) bool { return d == kept })
	if err != nil || n != 1 {
		t.Fatalf("SweepLayers: removed %d, %v; want 1", n, err)
	}
	if !saved(kept) || !saved(mounted) || saved(unused) {
		t.Errorf("after the sweep: kept %v, mounted %v, unused %v; want true, true, false", saved(kept), saved(mounted), saved(unused))
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("sweep removed a directory that is not a layer's: %v", err)
	}
	// A swept layer mounts again, from the registry.
	dir, _ := e.mount(t, e.push(t, "unused", oursGzip.build(t, newFixture(t, []fixture.Entry{fixture.Reg("f", 0o644, fixture.Random(122, 1000))}).tar, 64<<10, nil)))
	mustRead(t, filepath.Join(dir, "f"), fixture.Random(122, 1000))
}
