package cache

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

func TestMain(m *testing.M) {
	// Discarded entries are logged as warnings; tests provoke many.
	flag.Parse()
	if !testing.Verbose() {
		log.SetLevel("error")
	}
	os.Exit(m.Run())
}

// entry returns deterministic content number i of size bytes and its digest.
func entry(i, size int) (digest.Digest, []byte) {
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(i), uint64(size)))
	for j := range data {
		data[j] = byte(r.Uint32())
	}
	return digest.FromBytes(data), data
}

func open(t testing.TB, opts Options) *Store {
	t.Helper()
	s, err := Open(opts)
	if err != nil {
		t.Fatalf("Open(%+v): %v", opts, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustAdd(t testing.TB, s *Store, d digest.Digest, data []byte) {
	t.Helper()
	if err := s.Add(d, data); err != nil {
		t.Fatalf("Add(%s): %v", d, err)
	}
}

func pathOf(dir string, d digest.Digest) string {
	return filepath.Join(dir, d.Algorithm().String(), d.Encoded()[:2], d.Encoded())
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func dirEntries(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func wantMiss(t testing.TB, err error) {
	t.Helper()
	if !errors.Is(err, ErrNotFound) || !errdefs.IsNotFound(err) {
		t.Fatalf("got error %v, want ErrNotFound", err)
	}
}

// checkContent verifies Get, Has and ReadAt (with several offsets, including
// past the end) against want.
func checkContent(t testing.TB, s *Store, d digest.Digest, want []byte) {
	t.Helper()
	if !s.Has(d) {
		t.Fatalf("Has(%s) = false", d)
	}
	got, err := s.Get(d)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Get returned %d bytes, differing from the %d added", len(got), len(want))
	}
	size := int64(len(want))
	for _, tc := range []struct {
		off int64
		n   int
	}{
		{0, len(want)}, {0, 1}, {1, 10}, {size / 2, int(size / 4)},
		{size - 1, 1}, {size - 3, 10}, {0, len(want) + 5}, {size, 1}, {size + 100, 7}, {0, 0},
	} {
		if tc.off < 0 {
			continue
		}
		p := make([]byte, tc.n)
		n, err := s.ReadAt(d, p, tc.off)
		wantN := max(0, min(int64(tc.n), size-tc.off))
		if int64(n) != wantN {
			t.Fatalf("ReadAt(off %d, len %d) = %d, want %d (err %v)", tc.off, tc.n, n, wantN, err)
		}
		if wantN < int64(tc.n) || tc.off >= size {
			if err != io.EOF {
				t.Fatalf("ReadAt(off %d, len %d) err = %v, want io.EOF", tc.off, tc.n, err)
			}
		} else if err != nil {
			t.Fatalf("ReadAt(off %d, len %d): %v", tc.off, tc.n, err)
		}
		if n > 0 && !bytes.Equal(p[:n], want[tc.off:tc.off+int64(n)]) {
			t.Fatalf("ReadAt(off %d, len %d) returned wrong bytes", tc.off, tc.n)
		}
	}
}

func TestAddGetReadAt(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts func(dir string) Options
	}{
		{"memory", func(string) Options { return Options{} }},
		{"disk", func(dir string) Options { return Options{Dir: dir, MaxMemoryBytes: -1} }},
		{"disk-no-fd-cache", func(dir string) Options {
			return Options{Dir: dir, MaxMemoryBytes: -1, MaxOpenFiles: -1}
		}},
		{"both", func(dir string) Options { return Options{Dir: dir} }},
		{"packed", func(dir string) Options {
			return Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry}
		}},
		{"packed-both", func(dir string) Options { return Options{Dir: dir, PackMaxEntry: DefaultPackMaxEntry} }},
		{"packed-small-packs", func(dir string) Options {
			return Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry, PackSize: 8 << 10}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, tc.opts(dir))
			for i, size := range []int{1, 100, 4096, 4097, 300 << 10} {
				d, data := entry(i, size)
				if s.Has(d) {
					t.Fatalf("Has before Add")
				}
				_, err := s.ReadAt(d, make([]byte, 1), 0)
				wantMiss(t, err)
				_, err = s.Get(d)
				wantMiss(t, err)
				mustAdd(t, s, d, data)
				mustAdd(t, s, d, data) // idempotent
				data[0]++              // Add copied the caller's buffer
				data[0]--
				checkContent(t, s, d, data)
			}
			// The empty entry.
			empty := digest.FromBytes(nil)
			mustAdd(t, s, empty, nil)
			checkContent(t, s, empty, nil)
			if n, err := s.ReadAt(empty, make([]byte, 4), 0); n != 0 || err != io.EOF {
				t.Fatalf("ReadAt(empty) = %d, %v", n, err)
			}

			d, _ := entry(1, 100)
			if _, err := s.ReadAt(d, make([]byte, 1), -1); err == nil || errors.Is(err, ErrNotFound) {
				t.Fatalf("negative offset: %v", err)
			}
			st := s.Stats()
			if tc.name == "memory" && (st.Memory.Hits == 0 || st.Memory.Misses == 0 || st.Disk != (TierStats{})) {
				t.Fatalf("stats %+v", st)
			}
			if tc.name != "memory" && (st.Disk.Entries != 6 || st.Disk.Misses == 0 || (!strings.HasSuffix(tc.name, "both")) != (st.Disk.Hits > 0)) {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func TestAddCopiesData(t *testing.T) {
	s := open(t, Options{})
	d, data := entry(1, 1000)
	want := bytes.Clone(data)
	mustAdd(t, s, d, data)
	clear(data)
	checkContent(t, s, d, want)
}

func TestAddInvalidDigest(t *testing.T) {
	s := open(t, Options{Dir: t.TempDir()})
	for _, d := range []digest.Digest{"", "sha256:abc", "md5:00", "sha256:../../../../etc/passwd", digest.Digest("sha256:" + strings.Repeat("G", 64))} {
		if err := s.Add(d, []byte("x")); err == nil {
			t.Errorf("Add(%q) succeeded", d)
		}
		_, err := s.ReadAt(d, make([]byte, 1), 0)
		wantMiss(t, err)
	}
}

func TestOtherAlgorithms(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1})
	data := []byte("hello, sha512")
	d := digest.SHA512.FromBytes(data)
	mustAdd(t, s, d, data)
	if !exists(pathOf(dir, d)) {
		t.Fatalf("no file at %s", pathOf(dir, d))
	}
	s.Close()
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1})
	checkContent(t, s, d, data)
	if st := s.Stats(); st.Verified != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestMemoryOnlyLimits(t *testing.T) {
	s := open(t, Options{MaxMemoryBytes: 8 << 10})
	d, data := entry(1, 1<<10+1) // more than an eighth
	if err := s.Add(d, data); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Add of oversized entry: %v", err)
	}
	if s.Has(d) {
		t.Fatal("oversized entry cached")
	}
	if _, err := Open(Options{MaxMemoryBytes: -1}); err == nil {
		t.Fatal("Open with no tier succeeded")
	}
}

func TestMemoryLRU(t *testing.T) {
	const size = 1 << 10
	s := open(t, Options{MaxMemoryBytes: 8 * size})
	var ds []digest.Digest
	for i := range 8 {
		d, data := entry(i, size)
		mustAdd(t, s, d, data)
		ds = append(ds, d)
	}
	// 0 becomes the most recently used; 1 is now the oldest.
	if _, err := s.ReadAt(ds[0], make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ds[2]); err != nil {
		t.Fatal(err)
	}
	for i := 8; i < 10; i++ {
		d, data := entry(i, size)
		mustAdd(t, s, d, data)
		ds = append(ds, d)
	}
	for i, d := range ds {
		if want := i != 1 && i != 3; s.Has(d) != want {
			t.Errorf("entry %d: Has = %v, want %v", i, !want, want)
		}
	}
	st := s.Stats().Memory
	if st.Evictions != 2 || st.Entries != 8 || st.Bytes != 8*size || st.Limit != 8*size {
		t.Fatalf("memory stats %+v", st)
	}
}

func TestDiskLRU(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, MaxDiskBytes: 4 * blockSize})
	var ds []digest.Digest
	var datas [][]byte
	for i := range 4 {
		d, data := entry(i, blockSize-i) // each charged one block
		mustAdd(t, s, d, data)
		ds = append(ds, d)
		datas = append(datas, data)
	}
	if _, err := s.ReadAt(ds[0], make([]byte, 10), 5); err != nil {
		t.Fatal(err)
	}
	mustAdd(t, s, ds[1], datas[1]) // re-adding an entry also counts as a use
	for i := 4; i < 6; i++ {
		d, data := entry(i, 10)
		mustAdd(t, s, d, data)
		ds = append(ds, d)
	}
	for i, d := range ds {
		want := i != 2 && i != 3
		if s.Has(d) != want || exists(pathOf(dir, d)) != want {
			t.Errorf("entry %d: Has = %v, file exists = %v, want %v", i, s.Has(d), exists(pathOf(dir, d)), want)
		}
	}
	st := s.Stats().Disk
	if st.Evictions != 2 || st.Entries != 4 || st.Bytes != 4*blockSize {
		t.Fatalf("disk stats %+v", st)
	}

	// An entry larger than the whole tier is refused, not stored-and-evicted.
	d, data := entry(100, 4*blockSize+1)
	if err := s.Add(d, data); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Add of oversized entry: %v", err)
	}
	if exists(pathOf(dir, d)) || len(dirEntries(t, filepath.Join(dir, "tmp"))) != 0 {
		t.Fatal("oversized entry left a file")
	}
}

// Memory hits keep the disk copy young, so that an entry that is hot in
// memory is not the first to go from disk.
func TestMemoryHitsRefreshDiskLRU(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxDiskBytes: 2 * blockSize})
	a, adata := entry(1, 100)
	b, bdata := entry(2, 100)
	c, cdata := entry(3, 100)
	mustAdd(t, s, a, adata)
	mustAdd(t, s, b, bdata)
	if _, err := s.ReadAt(a, make([]byte, 1), 0); err != nil { // a memory hit
		t.Fatal(err)
	}
	mustAdd(t, s, c, cdata)
	if !exists(pathOf(dir, a)) || exists(pathOf(dir, b)) {
		t.Fatalf("a on disk: %v (want true), b on disk: %v (want false)", exists(pathOf(dir, a)), exists(pathOf(dir, b)))
	}
}

func TestRestartPersistence(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir})
	want := map[digest.Digest][]byte{}
	for i := range 20 {
		d, data := entry(i, 1+i*1000)
		mustAdd(t, s, d, data)
		want[d] = data
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
	if err := s.Add(digest.FromString("x"), []byte("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Add after Close: %v", err)
	}

	s = open(t, Options{Dir: dir})
	st := s.Stats()
	if st.Disk.Entries != 20 || st.Memory.Entries != 0 {
		t.Fatalf("after reopen: %+v", st)
	}
	for d, data := range want {
		if !exists(pathOf(dir, d)) {
			t.Fatalf("%s not at %s", d, pathOf(dir, d))
		}
		checkContent(t, s, d, data)
	}
	st = s.Stats()
	if st.Verified != 20 || st.Corrupt != 0 || st.Memory.Entries != 20 {
		t.Fatalf("after reading all: %+v", st)
	}
}

// setTimes gives the files of ds increasing access and modification times,
// hours apart. The access time is a second after the modification time, so
// that a relatime mount does not update it on read by itself.
func setTimes(t *testing.T, dir string, ds ...digest.Digest) {
	t.Helper()
	base := time.Now().Add(-time.Duration(len(ds)+1) * time.Hour)
	for i, d := range ds {
		tm := base.Add(time.Duration(i) * time.Hour)
		if err := os.Chtimes(pathOf(dir, d), tm.Add(time.Second), tm); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRestartLRUOrderAndLimit(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir})
	var ds []digest.Digest
	for i := range 5 {
		d, data := entry(i, 100)
		mustAdd(t, s, d, data)
		ds = append(ds, d)
	}
	s.Close()
	// Oldest to newest: 3 1 4 0 2.
	setTimes(t, dir, ds[3], ds[1], ds[4], ds[0], ds[2])
	s = open(t, Options{Dir: dir, MaxDiskBytes: 3 * blockSize})
	for i, d := range ds {
		want := i != 3 && i != 1
		if s.Has(d) != want || exists(pathOf(dir, d)) != want {
			t.Errorf("entry %d: Has = %v, file exists = %v, want %v", i, s.Has(d), exists(pathOf(dir, d)), want)
		}
	}
	if st := s.Stats().Disk; st.Evictions != 2 || st.Entries != 3 {
		t.Fatalf("disk stats %+v", st)
	}
	// The remaining order continues: 4 is the oldest.
	d, data := entry(10, 100)
	mustAdd(t, s, d, data)
	if s.Has(ds[4]) || !s.Has(ds[0]) {
		t.Fatal("wrong entry evicted after restart")
	}
}

// A used entry's access time is written back, so a restart remembers it.
func TestAccessTimePersisted(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1})
	var ds []digest.Digest
	for i := range 3 {
		d, data := entry(i, 100)
		mustAdd(t, s, d, data)
		ds = append(ds, d)
	}
	s.Close()
	setTimes(t, dir, ds[0], ds[1], ds[2]) // 0 is the oldest, by hours
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1})
	if _, err := s.ReadAt(ds[0], make([]byte, 1), 0); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, MaxDiskBytes: 2 * blockSize})
	if !s.Has(ds[0]) || s.Has(ds[1]) {
		t.Fatalf("after restart: entry 0 kept = %v (want true), entry 1 kept = %v (want false)", s.Has(ds[0]), s.Has(ds[1]))
	}
}

func corruptions() []struct {
	name string
	do   func(path string) error
} {
	return []struct {
		name string
		do   func(path string) error
	}{
		{"flip", func(path string) error {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			b[len(b)/2] ^= 0x40
			return os.WriteFile(path, b, 0o600)
		}},
		{"truncate", func(path string) error { return os.Truncate(path, 1000) }},
		{"truncate-empty", func(path string) error { return os.Truncate(path, 0) }},
		{"extend", func(path string) error {
			f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.Write([]byte("trailing garbage"))
			return err
		}},
	}
}

// Entries corrupted while the daemon was down are discarded on first read.
func TestCorruptAtRestart(t *testing.T) {
	for _, c := range corruptions() {
		for _, read := range []string{"ReadAt", "Get", "OpenFile"} {
			t.Run(c.name+"/"+read, func(t *testing.T) {
				dir := t.TempDir()
				s := open(t, Options{Dir: dir})
				d, data := entry(1, 64<<10)
				good, gdata := entry(2, 64<<10)
				mustAdd(t, s, d, data)
				mustAdd(t, s, good, gdata)
				s.Close()
				if err := c.do(pathOf(dir, d)); err != nil {
					t.Fatal(err)
				}
				s = open(t, Options{Dir: dir})
				var err error
				switch read {
				case "ReadAt":
					_, err = s.ReadAt(d, make([]byte, 10), 0)
				case "Get":
					_, err = s.Get(d)
				case "OpenFile":
					var f *os.File
					if f, err = s.OpenFile(d); err == nil {
						f.Close()
					}
				}
				wantMiss(t, err)
				if s.Has(d) || exists(pathOf(dir, d)) {
					t.Fatal("corrupt entry kept")
				}
				st := s.Stats()
				if st.Corrupt != 1 || st.Disk.Entries != 1 {
					t.Fatalf("stats %+v", st)
				}
				checkContent(t, s, good, gdata)
				// It can be added again.
				mustAdd(t, s, d, data)
				checkContent(t, s, d, data)
			})
		}
	}
}

// Entries truncated or deleted while the store runs are discarded too, even
// once verified and with a cached descriptor.
func TestTruncatedWhileRunning(t *testing.T) {
	for _, warm := range []bool{false, true} {
		t.Run(fmt.Sprint("fd-cached=", warm), func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, Options{Dir: dir, MaxMemoryBytes: -1})
			d, data := entry(1, 64<<10)
			mustAdd(t, s, d, data)
			if warm {
				if _, err := s.ReadAt(d, make([]byte, 10), 0); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Truncate(pathOf(dir, d), 1000); err != nil {
				t.Fatal(err)
			}
			_, err := s.ReadAt(d, make([]byte, 10), 2000)
			wantMiss(t, err)
			if st := s.Stats(); st.Corrupt != 1 || s.Has(d) {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func TestDeletedBehindOurBack(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1})
	d, data := entry(1, 1000)
	mustAdd(t, s, d, data)
	if err := os.Remove(pathOf(dir, d)); err != nil {
		t.Fatal(err)
	}
	_, err := s.ReadAt(d, make([]byte, 10), 0)
	wantMiss(t, err)
	if st := s.Stats(); st.Lost != 1 || st.Disk.Entries != 0 || st.Disk.Bytes != 0 {
		t.Fatalf("stats %+v", st)
	}
	// Whole fan-out and tmp directories removed: Add recreates them.
	if err := os.RemoveAll(filepath.Join(dir, "sha256")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "tmp")); err != nil {
		t.Fatal(err)
	}
	mustAdd(t, s, d, data)
	checkContent(t, s, d, data)
}

func TestOpenCleansAndIgnores(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir})
	d, data := entry(1, 1000)
	mustAdd(t, s, d, data)
	s.Close()

	tmp := filepath.Join(dir, "tmp")
	os.WriteFile(filepath.Join(tmp, "0123456789abcdef-123"), []byte("half a chunk"), 0o600)
	os.MkdirAll(filepath.Join(tmp, "nested", "deeper"), 0o700)
	// Foreign files are left alone and not indexed.
	foreign := []string{
		filepath.Join(dir, "sha256", "zz", "notes.txt"),
		filepath.Join(dir, "sha256", d.Encoded()[:2], "README"),
		filepath.Join(dir, "sha256", "00", strings.Repeat("1", 64)), // wrong prefix
	}
	for _, f := range foreign {
		os.MkdirAll(filepath.Dir(f), 0o700)
		if err := os.WriteFile(f, []byte("foreign"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// An empty file that should not be empty is discarded at Open.
	e, _ := entry(2, 10)
	os.MkdirAll(filepath.Dir(pathOf(dir, e)), 0o700)
	if err := os.WriteFile(pathOf(dir, e), nil, 0o600); err != nil {
		t.Fatal(err)
	}

	s = open(t, Options{Dir: dir})
	if names := dirEntries(t, tmp); len(names) != 0 {
		t.Fatalf("tmp not cleaned: %v", names)
	}
	for _, f := range foreign {
		if !exists(f) {
			t.Errorf("foreign file %s removed", f)
		}
	}
	if exists(pathOf(dir, e)) || s.Has(e) {
		t.Error("empty entry kept")
	}
	if st := s.Stats(); st.Disk.Entries != 1 || st.Corrupt != 1 {
		t.Fatalf("stats %+v", st)
	}
	checkContent(t, s, d, data)
}

func TestLocked(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir})
	if _, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	s.Close()
	s2 := open(t, Options{Dir: dir})
	s2.Close()
}

func TestClosed(t *testing.T) {
	s := open(t, Options{Dir: t.TempDir()})
	d, data := entry(1, 10)
	mustAdd(t, s, d, data)
	s.Close()
	if _, err := s.ReadAt(d, make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	if _, err := s.Get(d); !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	if _, err := s.OpenFile(d); !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	if s.Has(d) {
		t.Fatal("Has after Close")
	}
}

func TestOpenFileSurvivesEviction(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxDiskBytes: 2 * blockSize})
	d, data := entry(1, 3000)
	mustAdd(t, s, d, data)
	f, err := s.OpenFile(d)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 2; i < 5; i++ { // push d out
		e, edata := entry(i, 3000)
		mustAdd(t, s, e, edata)
	}
	if exists(pathOf(dir, d)) {
		t.Fatal("entry not evicted")
	}
	if _, err := s.OpenFile(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenFile of evicted entry: %v", err)
	}
	got, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reading the evicted entry's open file: %v", err)
	}
	// Memory-only entries have no file.
	m := open(t, Options{})
	mustAdd(t, m, d, data)
	if _, err := m.OpenFile(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("OpenFile on memory-only store: %v", err)
	}
}

func TestMemoryHitDoesNotAllocate(t *testing.T) {
	s := open(t, Options{Dir: t.TempDir()})
	d, data := entry(1, 64<<10)
	mustAdd(t, s, d, data)
	p := make([]byte, 4096)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := s.ReadAt(d, p, 100); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("memory hit allocates %v times", allocs)
	}
	allocs = testing.AllocsPerRun(1000, func() {
		if _, err := s.Get(d); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("memory Get allocates %v times", allocs)
	}
}

// mountTmpfs mounts a fresh tmpfs of the given size, or skips the test when
// that is not possible (not root, no mount permission).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		t.Skipf("cannot mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestDiskFull(t *testing.T) {
	dir := mountTmpfs(t, "256k")
	s := open(t, Options{Dir: dir, MaxDiskBytes: -1, MaxMemoryBytes: 16 << 20})
	small, sdata := entry(1, 5000)
	mustAdd(t, s, small, sdata)

	big, bdata := entry(2, 1<<20)
	err := s.Add(big, bdata)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Add on a full disk: %v, want ENOSPC", err)
	}
	if msg := err.Error(); !strings.Contains(msg, string(big)) || !strings.Contains(msg, "no space left on device") {
		t.Errorf("unclear error: %s", msg)
	}
	t.Logf("error: %v", err)
	if names := dirEntries(t, filepath.Join(dir, "tmp")); len(names) != 0 {
		t.Fatalf("debris in tmp: %v", names)
	}
	if exists(pathOf(dir, big)) {
		t.Fatal("partial entry in place")
	}
	// The memory tier kept it; the disk tier keeps serving what it has.
	checkContent(t, s, big, bdata)
	f, err := s.OpenFile(small)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if st := s.Stats(); st.WriteErrors != 1 || st.Disk.Entries != 1 {
		t.Fatalf("stats %+v", st)
	}
	// Space freed by the failed write is usable again.
	e, edata := entry(3, 5000)
	mustAdd(t, s, e, edata)
	if !exists(pathOf(dir, e)) {
		t.Fatal("entry not stored after ENOSPC")
	}
}

func TestReadOnly(t *testing.T) {
	dir := mountTmpfs(t, "4m")
	s := open(t, Options{Dir: dir})
	a, adata := entry(1, 5000)
	mustAdd(t, s, a, adata)
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Skipf("cannot remount read-only: %v", err)
	}
	b, bdata := entry(2, 5000)
	err := s.Add(b, bdata)
	if !errors.Is(err, syscall.EROFS) {
		t.Fatalf("Add on a read-only disk: %v, want EROFS", err)
	}
	t.Logf("error: %v", err)
	checkContent(t, s, b, bdata) // from memory
	s.Close()

	// An existing cache on a read-only file system opens and serves.
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1})
	checkContent(t, s, a, adata)
	if err := s.Add(b, bdata); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("Add on a read-only disk: %v, want EROFS", err)
	}
	if s.Has(b) {
		t.Fatal("failed Add reported as cached")
	}
}

func TestAddFromStreamsAndVerifies(t *testing.T) {
	s, err := Open(Options{Dir: t.TempDir(), MaxMemoryBytes: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := bytes.Repeat([]byte("whole file "), 100000)
	d := digest.FromBytes(data)
	if err := s.AddFrom(d, int64(len(data)), bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(d)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Get after AddFrom: %v", err)
	}
	f, err := s.OpenFile(d)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()

	// Bytes that do not hash to the digest are refused and leave nothing.
	bad := digest.FromString("something else")
	if err := s.AddFrom(bad, int64(len(data)), bytes.NewReader(data)); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("AddFrom of mismatching content: %v", err)
	}
	if s.Has(bad) {
		t.Fatal("mismatching content was stored")
	}
	// So is a stream shorter or longer than declared.
	short := digest.FromBytes(data[:10])
	if err := s.AddFrom(short, 5, bytes.NewReader(data[:10])); err == nil {
		t.Fatal("AddFrom accepted more bytes than declared")
	}
	if ents, _ := os.ReadDir(filepath.Join(s.dir, "tmp")); len(ents) != 0 {
		t.Fatalf("temporary files left behind: %v", ents)
	}
}
