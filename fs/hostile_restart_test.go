package fs_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/forge"
)

// A layer saved under Root by a daemon with looser limits (or an older
// version) whose TOC the current limits refuse: after a restart, its saved
// TOC is parsed again with the same limits as a fresh one, so mounting it
// fails with an error naming the entry, and the manager comes up and
// mounts other layers as before.
func TestRestartWithSavedHostileLayer(t *testing.T) {
	zeros := fixture.Random(110, 1000)
	fx := newFixture(t, []fixture.Entry{
		fixture.Reg("zeros", 0o644, zeros),
		fixture.Reg("ok", 0o644, fixture.Random(111, 1000)),
	})
	honest := oursGzip.build(t, fx.tar, 64<<10, nil)
	// The TOC claims zeros is one 4 GiB chunk (with the true digest of
	// 4 GiB of zeros): decoding it would hold 4 GiB.
	forged, toc, err := forge.RewriteTOC(honest.data, func(toc *estargz.TOC) error {
		for _, e := range toc.Entries {
			if e.Name == "zeros" {
				e.Size = 4 << 30
				e.ChunkDigest = "sha256:8479e43911dc45e89f934fe48d01297e16f51d17aa561d4d1c216b1ae0fcddca"
				e.Digest = e.ChunkDigest
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// The old daemon, with a chunk limit of 8 GiB, saved it.
	loose := newEnv(t, envOptions{manager: lfs.ManagerOptions{Limits: estargz.Limits{MaxChunkSize: 8 << 30}}})
	hostile := loose.push(t, "hostile", blob{data: forged, tocDigest: toc, comp: honest.comp})
	good := loose.push(t, "honest", honest)
	for _, src := range []lfs.LayerSource{hostile, good} {
		dir, _ := loose.mount(t, src)
		unmount(t, loose.mgr, dir)
	}
	saved, _ := filepath.Glob(filepath.Join(loose.root, "layers", "*", "toc.json"))
	if len(saved) != 2 {
		t.Fatalf("saved TOCs: %v", saved)
	}
	loose.mgr.Close()
	loose.store.Close()

	// The restarted daemon, with the default limits, on the same root.
	e := newEnv(t, envOptions{reg: loose.reg, root: loose.root, cacheDir: loose.cacheDir})
	_, err = e.mgr.Mount(context.Background(), filepath.Join(t.TempDir(), "mnt"), hostile)
	var fe *estargz.Error
	if !errors.As(err, &fe) || !errors.Is(err, estargz.ErrTOCTooLarge) || !strings.Contains(err.Error(), `"zeros"`) {
		t.Fatalf("mounting the saved hostile layer: %v; want the chunk limit error naming the entry", err)
	}
	t.Log(err)
	dir, _ := e.mount(t, good)
	mustRead(t, filepath.Join(dir, "ok"), fx.want["ok"].Data)
	if _, err := os.Stat(filepath.Join(dir, "zeros")); err != nil {
		t.Errorf("honest layer: %v", err)
	}
}
