package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

type testEntry struct {
	d    digest.Digest
	data []byte
}

// hammer runs workers goroutines doing ops random operations each on ents,
// skewed towards low indexes so that some entries are hot. Every byte served
// is checked; the only acceptable failures are misses.
func hammer(t *testing.T, s *Store, ents []testEntry, workers, ops int, addPercent int) {
	t.Helper()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 42))
			p := make([]byte, 8<<10)
			for range ops {
				e := ents[r.IntN(r.IntN(len(ents))+1)]
				switch op := r.IntN(100); {
				case op < addPercent:
					if err := s.Add(e.d, e.data); err != nil {
						t.Errorf("Add: %v", err)
						return
					}
				case op < addPercent+(100-addPercent)*6/10:
					off := r.Int64N(int64(len(e.data)) + 10)
					n, err := s.ReadAt(e.d, p[:r.IntN(len(p))+1], off)
					if err != nil && err != io.EOF && !errors.Is(err, ErrNotFound) {
						t.Errorf("ReadAt: %v", err)
						return
					}
					if n > 0 && !bytes.Equal(p[:n], e.data[off:off+int64(n)]) {
						t.Errorf("ReadAt(%s, off %d) served wrong bytes", e.d, off)
						return
					}
				case op < addPercent+(100-addPercent)*8/10:
					got, err := s.Get(e.d)
					if err != nil && !errors.Is(err, ErrNotFound) {
						t.Errorf("Get: %v", err)
						return
					}
					if err == nil && !bytes.Equal(got, e.data) {
						t.Errorf("Get(%s) served wrong bytes", e.d)
						return
					}
				case op < addPercent+(100-addPercent)*9/10:
					s.Has(e.d)
				default:
					f, err := s.OpenFile(e.d)
					if errors.Is(err, ErrNotFound) {
						continue
					}
					if err != nil {
						t.Errorf("OpenFile: %v", err)
						return
					}
					got, err := io.ReadAll(f)
					f.Close()
					if err != nil || !bytes.Equal(got, e.data) {
						t.Errorf("OpenFile(%s) served wrong bytes (%v)", e.d, err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
}

// checkAccounting compares the disk tier's books with the files on disk:
// entry files are charged in whole blocks, packs by their bytes (live and
// dead records alike).
func checkAccounting(t *testing.T, s *Store, dir string) {
	t.Helper()
	s.pk.wg.Wait() // compaction settles the packs' books
	st := s.Stats()
	var files, charged int64
	s.pk.mu.Lock()
	for _, p := range s.pk.all {
		p.mu.Lock()
		files += int64(len(p.live))
		p.mu.Unlock()
	}
	s.pk.mu.Unlock()
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*"+packExt))
	for _, p := range packs {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		charged += fi.Size() - packHeader
	}
	err := filepath.WalkDir(filepath.Join(dir, "sha256"), func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) && path == filepath.Join(dir, "sha256") {
			return nil
		}
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		files++
		charged += diskCharge(fi.Size())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if dead := s.pk.dead.Load(); dead < 0 {
		t.Errorf("negative dead bytes %d", dead)
	}
	if st.Disk.Entries != files || st.Disk.Bytes != charged {
		t.Errorf("index has %d entries, %d bytes; disk has %d files, %d bytes", st.Disk.Entries, st.Disk.Bytes, files, charged)
	}
	if st.Disk.Bytes > st.Disk.Limit || st.Memory.Bytes > st.Memory.Limit {
		t.Errorf("over limit: %+v", st)
	}
	if names := dirEntries(t, filepath.Join(dir, "tmp")); len(names) != 0 {
		t.Errorf("debris in tmp: %v", names)
	}
}

func TestConcurrencyHammer(t *testing.T) {
	for _, packed := range []bool{false, true} {
		t.Run(fmt.Sprint("packed=", packed), func(t *testing.T) { testConcurrencyHammer(t, packed) })
	}
}

func testConcurrencyHammer(t *testing.T, packed bool) {
	dir := t.TempDir()
	ents := make([]testEntry, 96)
	for i := range ents {
		ents[i].d, ents[i].data = entry(i, 1+(i*7919)%(24<<10))
	}
	// Limits far below the working set, so both tiers and the descriptor
	// cache evict all the time.
	opts := Options{Dir: dir, MaxDiskBytes: 40 * blockSize, MaxMemoryBytes: 256 << 10, MaxOpenFiles: 4}
	if packed {
		// Small packs, so that they fill, seal and get compacted.
		opts.PackMaxEntry, opts.PackSize = DefaultPackMaxEntry, 32<<10
	}
	workers, ops := 32, 1500
	if testing.Short() {
		ops = 300
	}

	s := open(t, opts)
	hammer(t, s, ents, workers, ops, 30)
	checkAccounting(t, s, dir)
	st := s.Stats()
	t.Logf("phase 1: %+v", st)
	if st.Corrupt != 0 || st.Lost != 0 || st.WriteErrors != 0 || st.Memory.Evictions == 0 || st.Disk.Evictions == 0 {
		t.Fatalf("stats %+v", st)
	}
	s.Close()

	// Corrupt one entry behind the store's back, then hammer a restarted
	// store whose entries are all unverified: many first readers of the
	// same entry at once, and the corrupt one must never be served.
	var corrupted digest.Digest
	if packed {
		corrupted = corruptFirstRecord(t, dir)
	}
	for _, e := range ents {
		if packed {
			break
		}
		if b, err := os.ReadFile(pathOf(dir, e.d)); err == nil && len(b) > 0 {
			b[0] ^= 1
			if err := os.WriteFile(pathOf(dir, e.d), b, 0o600); err != nil {
				t.Fatal(err)
			}
			corrupted = e.d
			break
		}
	}
	if corrupted == "" {
		t.Fatal("nothing on disk after phase 1")
	}
	s = open(t, opts)
	hammer(t, s, ents, workers, ops, 5)
	checkAccounting(t, s, dir)
	st = s.Stats()
	t.Logf("phase 2: %+v", st)
	if st.Corrupt > 1 || st.Lost != 0 || st.Verified == 0 {
		t.Fatalf("stats %+v", st)
	}
}

// corruptFirstRecord flips a byte of the first record of a pack under
// dir and returns the record's digest.
func corruptFirstRecord(t *testing.T, dir string) digest.Digest {
	t.Helper()
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*"+packExt))
	for _, path := range packs {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		key, size, ok := decodeRecHeader(b[packHeader:])
		if !ok || size == 0 {
			continue
		}
		b[packHeader+recHeader] ^= 1
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return digest.Digest(key)
	}
	return ""
}

// Many goroutines adding the same new digest write it once.
func TestConcurrentAddSameDigest(t *testing.T) {
	t.Run("file", func(t *testing.T) { testConcurrentAddSameDigest(t, -1, 1<<20) })
	t.Run("packed", func(t *testing.T) { testConcurrentAddSameDigest(t, DefaultPackMaxEntry, recHeader+1<<20) })
}

func testConcurrentAddSameDigest(t *testing.T, packMax, charge int64) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: packMax})
	d, data := entry(1, 1<<20)
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			if err := s.Add(d, data); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	checkContent(t, s, d, data)
	if st := s.Stats(); st.Disk.Entries != 1 || st.Disk.Bytes != charge {
		t.Fatalf("stats %+v", st)
	}
	checkAccounting(t, s, dir)
}

// Open on a large cache reads only directory entries and inode metadata.
func TestOpenLargeCache(t *testing.T) {
	if testing.Short() {
		t.Skip("creates 100k files")
	}
	dir := t.TempDir()
	const n = 100_000
	var wg sync.WaitGroup
	errs := make(chan error, 256)
	for prefix := range 256 {
		wg.Go(func() {
			sub := filepath.Join(dir, "sha256", hex2(prefix))
			if err := os.MkdirAll(sub, 0o700); err != nil {
				errs <- err
				return
			}
			for i := prefix; i < n; i += 256 {
				d := digest.FromString(strconv.Itoa(i))
				name := hex2(prefix) + d.Encoded()[2:]
				if err := os.WriteFile(filepath.Join(sub, name), []byte("x"), 0o600); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Drop nothing from the page cache (that needs root and a quiet
	// machine); this measures the warm-cache case the daemon restart sees.
	start := time.Now()
	s := open(t, Options{Dir: dir, MaxDiskBytes: 300_000 * blockSize})
	elapsed := time.Since(start)
	if st := s.Stats(); st.Disk.Entries != n {
		t.Fatalf("indexed %d entries, want %d", st.Disk.Entries, n)
	}
	t.Logf("Open indexed %d entries in %v", n, elapsed)
	// Open must index by name and size only: no content is hashed until
	// an entry is read (its speed is BenchmarkOpen's business).
	if v := s.Stats().Verified; v != 0 {
		t.Errorf("Open hashed %d entries, want 0", v)
	}
	s.Close()

	// Enforcing a lower limit at Open evicts the oldest entries.
	start = time.Now()
	s = open(t, Options{Dir: dir, MaxDiskBytes: 50_000 * blockSize})
	t.Logf("Open evicting half took %v", time.Since(start))
	if st := s.Stats(); st.Disk.Entries != 50_000 || st.Disk.Evictions != 50_000 {
		t.Fatalf("stats %+v", st)
	}
}

func hex2(i int) string {
	const digits = "0123456789abcdef"
	return string([]byte{digits[i>>4], digits[i&15]})
}
