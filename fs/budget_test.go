package fs_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
)

// bigTOCLayer builds a layer of n empty files with long names (a large
// TOC for little data) plus one small file, distinct per seed.
func bigTOCLayer(t testing.TB, seed int64, n int) (layerFixture, blob) {
	t.Helper()
	long := strings.Repeat("n", 200)
	entries := []fixture.Entry{fixture.Dir("d", 0o755), fixture.Reg("data", 0o644, fixture.Random(seed, 4096))}
	for i := range n {
		entries = append(entries, fixture.Reg(fmt.Sprintf("d/%s%08d", long, i), 0o644, nil))
	}
	fx := newFixture(t, entries)
	return fx, oursGzip.build(t, fx.tar, 64<<10, nil)
}

// Layers whose indexes together exceed the memory budget: the first ones
// mount, the next fails with ErrResourceExhausted naming the layer and
// the budget, nothing is left charged for it, and it mounts once another
// layer is unmounted. A restarted manager with a smaller budget refuses
// the saved layer the same way and still mounts a small one.
func TestMemoryBudgetRefusesLayersOverIt(t *testing.T) {
	const limit = 64 << 20
	budget := lfs.NewMemoryBudget(limit)
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Budget: budget}})
	var srcs []lfs.LayerSource
	var fxs []layerFixture
	for i := range 4 {
		fx, b := bigTOCLayer(t, int64(i), 20000)
		fxs = append(fxs, fx)
		srcs = append(srcs, e.push(t, "big"+strconv.Itoa(i), b))
	}
	var dirs []string
	refused := -1
	for i, src := range srcs {
		dir := filepath.Join(t.TempDir(), "mnt")
		_, err := e.mgr.Mount(context.Background(), dir, src)
		if err != nil {
			if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), src.Digest.String()) || !strings.Contains(err.Error(), strconv.Itoa(limit)) {
				t.Fatalf("mount %d: %v; want ErrResourceExhausted naming the layer and the budget", i, err)
			}
			t.Logf("mount %d refused: %v", i, err)
			refused = i
			break
		}
		t.Cleanup(func() { unmount(t, e.mgr, dir) })
		dirs = append(dirs, dir)
		mustRead(t, filepath.Join(dir, "data"), fxs[i].want["data"].Data)
		held, transient := budget.Used()
		t.Logf("after mount %d: held %d, transient %d", i, held, transient)
		if held <= 0 || held > limit*3/4 || held+transient > limit {
			t.Fatalf("after mount %d: held %d, transient %d; want 0 < held <= %d, all within %d", i, held, transient, limit*3/4, limit)
		}
	}
	if refused < 1 {
		t.Fatalf("refused mount %d: want at least one layer mounted and one refused", refused)
	}
	held, _ := budget.Used()
	unmount(t, e.mgr, dirs[0])
	if h, _ := budget.Used(); h >= held {
		t.Fatalf("unmounting a layer left %d held (was %d)", h, held)
	}
	dir, _ := e.mount(t, srcs[refused])
	mustRead(t, filepath.Join(dir, "data"), fxs[refused].want["data"].Data)

	// Restart on the same root with a budget too small for the saved
	// TOC: refused from the saved metadata, no registry needed to say so;
	// a small layer still mounts.
	smallFx := newFixture(t, []fixture.Entry{fixture.Reg("ok", 0o644, fixture.Random(7, 1000))})
	small := e.push(t, "small", oursGzip.build(t, smallFx.tar, 64<<10, nil))
	b2 := lfs.NewMemoryBudget(8 << 20)
	e2 := newEnv(t, envOptions{reg: e.reg, root: e.root, cacheDir: t.TempDir(), manager: lfs.ManagerOptions{Budget: b2}})
	_, err := e2.mgr.Mount(context.Background(), filepath.Join(t.TempDir(), "mnt"), srcs[refused])
	if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "saved TOC") {
		t.Fatalf("restarted with a small budget: %v; want ErrResourceExhausted for the saved TOC", err)
	}
	t.Log(err)
	if h, tr := b2.Used(); h != 0 || tr != 0 {
		t.Fatalf("refused layer left held %d, transient %d", h, tr)
	}
	d2, _ := e2.mount(t, small)
	mustRead(t, filepath.Join(d2, "ok"), smallFx.want["ok"].Data)
}

// Many concurrent uncached reads under a budget smaller than one fetched
// group: fetches wait for each other (one too large runs alone) instead
// of failing, every read gets the right bytes, and nothing stays charged.
func TestMemoryBudgetFetchesWait(t *testing.T) {
	var entries []fixture.Entry
	for i := range 32 {
		entries = append(entries, fixture.Reg(fmt.Sprintf("f%02d", i), 0o644, fixture.Random(int64(100+i), 512<<10)))
	}
	fx := newFixture(t, entries)
	budget := lfs.NewMemoryBudget(1 << 20)
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Budget: budget}})
	src := e.push(t, "files", oursGzip.build(t, fx.tar, 256<<10, nil))
	dir, _ := e.mount(t, src)
	held, _ := budget.Used()
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			name := fmt.Sprintf("f%02d", i)
			got, err := readFile(t, filepath.Join(dir, name))
			if err != nil {
				t.Errorf("%s: %v", name, err)
			} else if string(got) != string(fx.want[name].Data) {
				t.Errorf("%s: wrong bytes", name)
			}
		})
	}
	wg.Wait()
	if h, tr := budget.Used(); h != held || tr != 0 {
		t.Fatalf("after the reads: held %d (was %d), transient %d; want nothing in flight", h, held, tr)
	}
}

// The kernel sends a mount at most maxBackground asynchronous requests
// (its read-ahead): the FUSE connection says so.
func TestMountBoundsBackgroundRequests(t *testing.T) {
	fx := newFixture(t, []fixture.Entry{fixture.Reg("f", 0o644, fixture.Random(1, 1000))})
	e := newEnv(t, envOptions{})
	dir, _ := e.mount(t, e.push(t, "one", oursGzip.build(t, fx.tar, 64<<10, nil)))
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	conn := filepath.Join("/sys/fs/fuse/connections", strconv.Itoa(int(unix.Minor(st.Dev))))
	b, err := os.ReadFile(filepath.Join(conn, "max_background"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != "32" {
		t.Fatalf("%s/max_background = %s, want 32", conn, got)
	}
}
