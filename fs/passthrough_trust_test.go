package fs_test

import (
	"bytes"
	"log"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/forge"
)

// Passthrough serves only verified bytes: a multi-chunk file's backing file
// is a cache entry keyed by the file digest the TOC declares, and such an
// entry is used only once the layer has proven it holds the file's verified
// chunks. Two ways an entry merely found under that digest holds other
// bytes: the cache entry is poisoned (its content is not what its key
// says), or the TOC declares another file's digest (whose honest entry the
// cache holds). Either way the file reads as its chunks, through FUSE.
func TestPassthroughRefusesUnprovenWholeFileEntry(t *testing.T) {
	var logs syncBuffer
	log.SetOutput(&logs)
	t.Cleanup(func() { log.SetOutput(os.Stderr) })

	good := fixture.Random(100, 200000)
	evil := fixture.Random(101, 200000)
	fx := newFixture(t, []fixture.Entry{
		fixture.Reg("multi", 0o644, good),
		fixture.Reg("other", 0o644, fixture.Random(102, 3000)),
	})
	b := oursGzip.build(t, fx.tar, 64<<10, nil)
	opts := lfs.ManagerOptions{Mount: lfs.MountOptions{Passthrough: true, Debug: true}}
	const passthrough = " PASSTHROUGH}"

	// check reads multi until its chunks are cached and an open would
	// assemble or look up its whole-file entry, and checks every read
	// returns its chunks' bytes and none is passthrough.
	check := func(t *testing.T, dir string, base int) {
		t.Helper()
		for range 3 {
			logs.waitClosed(t, base)
			m := logs.mark()
			mustRead(t, filepath.Join(dir, "multi"), good)
			if l := logs.since(m); strings.Contains(l, passthrough) {
				t.Fatalf("multi opened for passthrough from an unproven entry:\n%s", l)
			}
		}
	}

	t.Run("poisoned entry", func(t *testing.T) {
		base := logs.mark()
		e := newEnv(t, envOptions{manager: opts})
		// Add trusts its caller: this stands for any way an entry under
		// the file digest came to hold other bytes.
		if err := e.store.Add(digest.FromBytes(good), evil); err != nil {
			t.Fatal(err)
		}
		dir, _ := e.mount(t, e.push(t, "poisoned", b))
		check(t, dir, base)
	})

	t.Run("declared digest of other content", func(t *testing.T) {
		base := logs.mark()
		e := newEnv(t, envOptions{manager: opts})
		// The cache holds an honest entry for the evil content (another
		// image's file), and the TOC says multi has that digest.
		d := digest.FromBytes(evil)
		if err := e.store.AddFrom(d, int64(len(evil)), bytes.NewReader(evil)); err != nil {
			t.Fatal(err)
		}
		forged, toc, err := forge.DeclareFileDigest(b.data, "multi", d)
		if err != nil {
			t.Fatal(err)
		}
		dir, _ := e.mount(t, e.push(t, "declared", blob{data: forged, tocDigest: toc, comp: b.comp}))
		check(t, dir, base)
	})

	t.Run("honest", func(t *testing.T) {
		// The proof does not get in the way of an honest file: once its
		// chunks are cached it is read by passthrough.
		base := logs.mark()
		e := newEnv(t, envOptions{manager: opts})
		dir, _ := e.mount(t, e.push(t, "honest", b))
		mustRead(t, filepath.Join(dir, "multi"), good)
		logs.waitClosed(t, base)
		mustRead(t, filepath.Join(dir, "multi"), good)
		logs.waitClosed(t, base)
		m := logs.mark()
		mustRead(t, filepath.Join(dir, "multi"), good)
		if l := logs.since(m); !strings.Contains(l, passthrough) {
			t.Errorf("honest multi-chunk file with its chunks cached: want passthrough:\n%s", l)
		}
	})
}
