package fs_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// A layer with every kind of entry, converted by our builder and by
// upstream's (gzip and zstd:chunked), served by a real registry and
// mounted through the Manager, shows exactly what its tar says.
func TestMountMatchesTar(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	type tc struct {
		conv      converter
		chunkSize int
	}
	var cases []tc
	for _, c := range converters {
		cases = append(cases, tc{c, 4096})
	}
	cases = append(cases, tc{oursGzip, 1000}, tc{upstreamZstd, 1000})
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s/chunk=%d", c.conv.name, c.chunkSize), func(t *testing.T) {
			t.Parallel()
			// A store per case: the chunks are the same in every case.
			e := newEnv(t, envOptions{reg: reg})
			fx := newFixture(t, fixture.RichLayer(c.chunkSize))
			b := c.conv.build(t, fx.tar, c.chunkSize, nil)
			src := e.push(t, "rich", b)
			dir, m := e.mount(t, src)
			compareTree(t, dir, fx.want, &fixture.DiffOptions{MtimeRound: c.conv.mtime, AllowExtra: fixture.Landmarks})
			checkReads(t, dir, fx.want, c.chunkSize)
			checkReadOnly(t, dir)
			if st := m.Layer().Stats(); st.VerifyFailures != 0 || st.Requests == 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// checkReads reads multi-chunk files at and across chunk boundaries with
// O_DIRECT (so each read reaches the file system with its own offset and
// size), and through mmap.
func checkReads(t *testing.T, dir string, want fixture.Tree, cs int) {
	t.Helper()
	rng := rand.New(rand.NewSource(1))
	for _, p := range want.Files() {
		if len(want[p].Data) > cs {
			checkFileReads(t, filepath.Join(dir, p), want[p].Data, cs, rng)
		}
	}
}

func checkFileReads(t *testing.T, path string, data []byte, cs int, rng *rand.Rand) {
	t.Helper()
	size := len(data)
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("open %s O_DIRECT: %v", path, err)
	}
	defer f.Close()
	offs := []int{0, 1, cs - 1, cs, cs + 1, 2*cs - 3, size - cs, size - 1, size, size + 1}
	for range 8 {
		offs = append(offs, rng.Intn(size))
	}
	for _, off := range offs {
		if off < 0 {
			continue
		}
		for _, l := range []int{1, 7, cs, cs + 2, 3*cs + 5, 128 << 10} {
			buf := make([]byte, l)
			k, err := f.ReadAt(buf, int64(off))
			wantN := max(0, min(l, size-off))
			if k != wantN || (k < l) != (err != nil) {
				t.Errorf("%s: pread(%d, %d) = %d, %v; want %d", path, off, l, k, err, wantN)
				return
			}
			if k > 0 && !bytes.Equal(buf[:k], data[off:off+k]) {
				t.Errorf("%s: pread(%d, %d) returned wrong bytes", path, off, l)
				return
			}
		}
	}

	g, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	m, err := unix.Mmap(int(g.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap %s: %v", path, err)
	}
	defer unix.Munmap(m)
	if !bytes.Equal(m, data) {
		t.Errorf("%s: mmap shows wrong bytes", path)
	}
}

// checkReadOnly checks that nothing can be changed.
func checkReadOnly(t *testing.T, dir string) {
	t.Helper()
	p := filepath.Join(dir, fixture.RichSmall)
	for _, flag := range []int{os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND} {
		if f, err := os.OpenFile(p, flag, 0); !errors.Is(err, syscall.EROFS) {
			if f != nil {
				f.Close()
			}
			t.Errorf("open %s with flags %#x: %v, want EROFS", p, flag, err)
		}
	}
	checks := map[string]error{
		"create":   os.WriteFile(filepath.Join(dir, "new"), nil, 0o644),
		"mkdir":    os.Mkdir(filepath.Join(dir, "newdir"), 0o755),
		"remove":   os.Remove(p),
		"rename":   os.Rename(p, p+".x"),
		"chmod":    os.Chmod(p, 0o600),
		"setxattr": unix.Setxattr(p, "user.x", []byte("y"), 0),
		"symlink":  os.Symlink("x", filepath.Join(dir, "sym")),
	}
	for op, err := range checks {
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", op, err)
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Flags&unix.ST_RDONLY == 0 || st.Blocks == 0 || st.Files == 0 {
		t.Errorf("statfs: flags %#x blocks %d files %d", st.Flags, st.Blocks, st.Files)
	}
	// Reading a directory or a device is not reading a file.
	if _, err := os.ReadFile(filepath.Join(dir, "dev")); !errors.Is(err, syscall.EISDIR) {
		t.Errorf("read dir: %v, want EISDIR", err)
	}
	names, err := os.ReadDir(filepath.Join(dir, "many"))
	if err != nil || len(names) != 300 || !slices.IsSortedFunc(names, func(a, b os.DirEntry) int {
		return bytes.Compare([]byte(a.Name()), []byte(b.Name()))
	}) {
		t.Errorf("readdir many: %d entries, %v", len(names), err)
	}
}
