package cache

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/faultfs"
)

func packFiles(t testing.TB, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "packs", "*"+packExt))
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func fileEntries(t testing.TB, dir string) int {
	t.Helper()
	n := 0
	filepath.WalkDir(filepath.Join(dir, "sha256"), func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			n++
		}
		return nil
	})
	return n
}

// addEntries adds count entries numbered from first, of sizes cycling
// through sizes, and returns them.
func addEntries(t testing.TB, s *Store, first, count int, sizes ...int) []testEntry {
	t.Helper()
	var out []testEntry
	for i := first; i < first+count; i++ {
		d, data := entry(i, sizes[i%len(sizes)])
		mustAdd(t, s, d, data)
		out = append(out, testEntry{d, data})
	}
	return out
}

// Small entries go to one pack file, large ones to files of their own.
func TestPackedLayout(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: 64 << 10})
	small := addEntries(t, s, 0, 100, 1, 4096, 10_000, 64<<10)
	big, bdata := entry(1000, 64<<10+1)
	mustAdd(t, s, big, bdata)
	if n := fileEntries(t, dir); n != 1 {
		t.Fatalf("%d entry files, want 1 (the large entry)", n)
	}
	if !exists(pathOf(dir, big)) {
		t.Fatal("large entry has no file")
	}
	if p := packFiles(t, dir); len(p) != 1 {
		t.Fatalf("pack files %v, want one", p)
	}
	var want int64 = diskCharge(64<<10 + 1)
	for _, e := range small {
		want += recHeader + int64(len(e.data))
		checkContent(t, s, e.d, e.data)
	}
	if st := s.Stats(); st.Disk.Entries != 101 || st.Disk.Bytes != want {
		t.Fatalf("stats %+v, want 101 entries, %d bytes", st, want)
	}
	checkAccounting(t, s, dir)
}

// A pack fills, is sealed with an index file, and the next one starts.
// After a restart every entry is found (from the index files, or, for a
// pack without one as after a crash, from its record headers) and hashed
// on its first read.
func TestPackedRestart(t *testing.T) {
	for _, crash := range []bool{false, true} {
		t.Run(fmt.Sprint("crash=", crash), func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{Dir: dir, MaxMemoryBytes: -1, PackSize: 64 << 10, PackMaxEntry: DefaultPackMaxEntry}
			s := open(t, opts)
			ents := addEntries(t, s, 0, 60, 10, 3000, 9000)
			s.Close()
			packs := packFiles(t, dir)
			if len(packs) < 3 {
				t.Fatalf("%d packs, want several", len(packs))
			}
			for _, p := range packs {
				idx := strings.TrimSuffix(p, packExt) + idxExt
				if !exists(idx) {
					t.Fatalf("no index file for %s", p)
				}
				if crash {
					os.Remove(idx)
				}
			}
			// Packs stay readable with packing turned off.
			opts.PackMaxEntry = 0
			s = open(t, opts)
			if st := s.Stats(); st.Disk.Entries != 60 || st.Verified != 0 {
				t.Fatalf("after restart: %+v", st)
			}
			for _, e := range ents {
				checkContent(t, s, e.d, e.data)
			}
			if st := s.Stats(); st.Verified != 60 || st.Corrupt != 0 {
				t.Fatalf("after reading: %+v", st)
			}
			for _, p := range packs {
				if !exists(strings.TrimSuffix(p, packExt) + idxExt) {
					t.Fatalf("index of %s not rebuilt", p)
				}
			}
			checkAccounting(t, s, dir)
		})
	}
}

// A pack whose last record was torn (cut short, or followed by garbage)
// lists the records before it; the torn one is a miss, never wrong bytes.
// A record whose bytes were altered is discarded on its first read.
func TestPackedTornAndCorrupt(t *testing.T) {
	for _, tc := range []struct {
		name string
		do   func(t *testing.T, pack string, size int64)
	}{
		{"cut-in-data", func(t *testing.T, pack string, size int64) { os.Truncate(pack, size-100) }},
		{"cut-in-header", func(t *testing.T, pack string, size int64) { os.Truncate(pack, size-5000-40) }},
		{"garbage-after", func(t *testing.T, pack string, size int64) {
			f, _ := os.OpenFile(pack, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(bytes.Repeat([]byte("LZR1 garbage"), 100))
			f.Close()
		}},
		{"zeros-after", func(t *testing.T, pack string, size int64) { os.Truncate(pack, size+1<<20) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
			ents := addEntries(t, s, 0, 10, 5000)
			s.Close()
			pack := packFiles(t, dir)[0]
			os.Remove(strings.TrimSuffix(pack, packExt) + idxExt) // as after a crash
			fi, _ := os.Stat(pack)
			tc.do(t, pack, fi.Size())
			s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
			torn := strings.HasPrefix(tc.name, "cut")
			for i, e := range ents {
				if torn && i == len(ents)-1 {
					if s.Has(e.d) {
						t.Fatal("torn record listed")
					}
					_, err := s.Get(e.d)
					wantMiss(t, err)
					continue
				}
				checkContent(t, s, e.d, e.data)
			}
			checkAccounting(t, s, dir)
		})
	}

	t.Run("flipped-byte", func(t *testing.T) {
		dir := t.TempDir()
		s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
		ents := addEntries(t, s, 0, 5, 5000)
		s.Close()
		bad := corruptFirstRecord(t, dir)
		if bad != ents[0].d {
			t.Fatalf("corrupted %s, want the first entry", bad)
		}
		s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
		_, err := s.ReadAt(bad, make([]byte, 10), 0)
		wantMiss(t, err)
		if s.Has(bad) || s.Stats().Corrupt != 1 {
			t.Fatalf("corrupt record kept: %+v", s.Stats())
		}
		for _, e := range ents[1:] {
			checkContent(t, s, e.d, e.data)
		}
		mustAdd(t, s, ents[0].d, ents[0].data) // fetched again
		checkContent(t, s, ents[0].d, ents[0].data)
		s.Close()
		// After another restart the new copy wins over the corrupt one.
		s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
		checkContent(t, s, ents[0].d, ents[0].data)
		if st := s.Stats(); st.Corrupt != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// An index file that lies (records at the wrong places, with a valid
// checksum) serves nothing wrong: the bytes are hashed on first read. A
// damaged index file is ignored and the pack scanned.
func TestPackedLyingOrDamagedIndex(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
	ents := addEntries(t, s, 0, 4, 5000)
	s.Close()
	pack := packFiles(t, dir)[0]
	idx := strings.TrimSuffix(pack, packExt) + idxExt
	fi, _ := os.Stat(pack)
	rec := int64(recHeader + 5000)
	// Entry 0 claimed at entry 1's record, and the other way round.
	lie := []idxRec{
		{key: string(ents[0].d), size: 5000, off: packHeader + rec},
		{key: string(ents[1].d), size: 5000, off: packHeader},
		{key: string(ents[2].d), size: 5000, off: packHeader + 2*rec},
		{key: string(ents[3].d), size: 5000, off: packHeader + 3*rec},
	}
	if err := writeIdx(idx, lie, fi.Size()); err != nil {
		t.Fatal(err)
	}
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
	for _, e := range ents[:2] {
		_, err := s.Get(e.d)
		wantMiss(t, err)
	}
	for _, e := range ents[2:] {
		checkContent(t, s, e.d, e.data)
	}
	if st := s.Stats(); st.Corrupt != 2 {
		t.Fatalf("stats %+v", st)
	}
	s.Close()

	// A damaged index: the pack is scanned again, every record found.
	b, _ := os.ReadFile(idx)
	b[len(b)/2] ^= 0xff
	os.WriteFile(idx, b, 0o600)
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
	for _, e := range ents {
		checkContent(t, s, e.d, e.data)
	}
}

// The disk limit holds for packs: evicted records are dead bytes charged
// against it until their pack is compacted (live records copied to the
// active pack, the old pack deleted) or empties. Recently used entries
// stay.
func TestPackedEvictionAndCompaction(t *testing.T) {
	dir := t.TempDir()
	const limit = 256 << 10
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, MaxDiskBytes: limit, PackSize: 64 << 10, PackMaxEntry: DefaultPackMaxEntry})
	hot, hdata := entry(100_000, 4000)
	mustAdd(t, s, hot, hdata)
	var ents []testEntry
	for i := range 400 {
		ents = append(ents, addEntries(t, s, i, 1, 1000, 4000, 7000)...)
		if _, err := s.ReadAt(hot, make([]byte, 1), 0); err != nil {
			t.Fatalf("hot entry evicted after %d adds: %v", i, err)
		}
		var used int64
		for _, p := range packFiles(t, dir) {
			if fi, err := os.Stat(p); err == nil {
				used += fi.Size()
			}
		}
		// Bounded by the limit, plus the packs waiting for compaction
		// (Adds help compact beyond maxQueuedPacks of them, and one
		// more may be in the background compactor's hands), plus the
		// packs' headers.
		if used > limit+(maxQueuedPacks+1)*64<<10+1<<10 {
			t.Fatalf("packs hold %d bytes after %d adds, limit %d", used, i, limit)
		}
	}
	s.pk.wg.Wait()
	st := s.Stats()
	if st.Disk.Evictions == 0 || st.Disk.Bytes > limit {
		t.Fatalf("stats %+v", st)
	}
	// Evictions do not cascade: dead records are at most about as many
	// bytes as live ones, so at least about half the limit stays live.
	if live := s.disk.bytes.Load(); live < limit/2-64<<10 {
		t.Fatalf("only %d bytes live under a limit of %d: %+v", live, limit, st)
	}
	// Packs were deleted along the way: far fewer than were written.
	if n, next := len(packFiles(t, dir)), s.pk.nextID; uint64(n)*2 > next {
		t.Fatalf("%d packs left of %d written", n, next)
	}
	for _, e := range ents[len(ents)-10:] {
		checkContent(t, s, e.d, e.data)
	}
	kept := 0
	for _, e := range ents {
		if s.Has(e.d) {
			kept++
			checkContent(t, s, e.d, e.data)
		}
	}
	t.Logf("kept %d of %d entries; %+v", kept, len(ents), st)
	checkAccounting(t, s, dir)
	s.Close()

	// A lower limit at Open evicts the oldest entries; emptied packs go.
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, MaxDiskBytes: limit / 4, PackSize: 64 << 10, PackMaxEntry: DefaultPackMaxEntry})
	s.pk.wg.Wait()
	if st := s.Stats(); st.Disk.Bytes > limit/4 || st.Disk.Entries == 0 {
		t.Fatalf("after reopening with a lower limit: %+v", st)
	}
	checkAccounting(t, s, dir)
	for _, e := range ents {
		if s.Has(e.d) {
			checkContent(t, s, e.d, e.data)
		}
	}
}

// OpenFile gives a packed entry a file of its own (FUSE passthrough needs
// one); the entry stays cached and is served from the file from then on,
// after a restart too.
func TestPackedOpenFilePromotes(t *testing.T) {
	for _, restart := range []bool{false, true} {
		t.Run(fmt.Sprint("restart=", restart), func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, Options{Dir: dir, PackMaxEntry: DefaultPackMaxEntry})
			d, data := entry(1, 5000)
			other, odata := entry(2, 5000)
			mustAdd(t, s, d, data)
			mustAdd(t, s, other, odata)
			if restart {
				s.Close()
				s = open(t, Options{Dir: dir, PackMaxEntry: DefaultPackMaxEntry})
			}
			f, err := s.OpenFile(d)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(f)
			f.Close()
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("OpenFile content: %v", err)
			}
			if !exists(pathOf(dir, d)) {
				t.Fatal("no entry file after OpenFile")
			}
			if restart && s.Stats().Verified == 0 {
				t.Fatal("packed entry handed out unverified")
			}
			checkContent(t, s, d, data)
			checkContent(t, s, other, odata)
			checkAccounting(t, s, dir)
			s.Close()
			s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
			if st := s.Stats(); st.Disk.Entries != 2 {
				t.Fatalf("after restart: %+v", st)
			}
			checkContent(t, s, d, data)
			checkAccounting(t, s, dir)
		})
	}
}

// A pack that fails to read with a real EIO: each entry read from it is
// discarded and reported as a miss saying EIO, and can be added again.
func TestPackedIOErrorDiscards(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry}
	s := open(t, opts)
	ents := addEntries(t, s, 0, 3, 5000)
	s.Close()
	pack := packFiles(t, dir)[0]
	fi, _ := os.Stat(pack)
	if err := os.Remove(pack); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(faultfs.EIOFile(t, fi.Size()), pack); err != nil {
		t.Fatal(err)
	}
	s = open(t, opts)
	if st := s.Stats(); st.Disk.Entries != 3 {
		t.Fatalf("entries of the failing pack not listed from its index: %+v", st)
	}
	for _, e := range ents {
		_, err := s.ReadAt(e.d, make([]byte, 10), 0)
		wantMiss(t, err)
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("error %v does not say EIO", err)
		}
		if s.Has(e.d) {
			t.Fatal("entry that failed with EIO still listed")
		}
	}
	if st := s.Stats(); st.Corrupt != 3 || st.Disk.Entries != 0 {
		t.Errorf("stats %+v", st)
	}
	for _, e := range ents {
		mustAdd(t, s, e.d, e.data)
		checkContent(t, s, e.d, e.data)
	}
}

// A full disk fails the Add with ENOSPC (resource exhausted), leaves the
// pack as it was (no partial record) and keeps serving what is cached;
// a smaller entry that fits is stored afterwards.
func TestPackedDiskFull(t *testing.T) {
	dir := mountTmpfs(t, "256k")
	s := open(t, Options{Dir: dir, MaxDiskBytes: -1, MaxMemoryBytes: -1, PackMaxEntry: 1 << 20})
	first := addEntries(t, s, 0, 4, 20_000)
	pack := packFiles(t, dir)[0]
	before, _ := os.Stat(pack)
	big, bdata := entry(100, 1<<20)
	err := s.Add(big, bdata)
	if !errors.Is(err, syscall.ENOSPC) || !errdefs.IsResourceExhausted(err) {
		t.Fatalf("Add on a full disk: %v, want ENOSPC (resource exhausted)", err)
	}
	t.Logf("error: %v", err)
	after, _ := os.Stat(pack)
	if after.Size() != before.Size() {
		t.Fatalf("pack grew from %d to %d bytes by a failed Add", before.Size(), after.Size())
	}
	if s.Has(big) {
		t.Fatal("failed Add listed")
	}
	for _, e := range first {
		checkContent(t, s, e.d, e.data)
	}
	if st := s.Stats(); st.WriteErrors != 1 || st.Disk.Entries != 4 {
		t.Fatalf("stats %+v", st)
	}
	more := addEntries(t, s, 200, 1, 5000)
	s.Close()
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
	for _, e := range append(first, more...) {
		checkContent(t, s, e.d, e.data)
	}
}

const crashEnv = "LAZYPULL_CACHE_CRASH_DIR"

// crashChild is the process TestPackedKilledWriter kills: it adds entries
// for ever, reporting its progress.
func crashChild(dir string) {
	s, err := Open(Options{Dir: dir, MaxMemoryBytes: -1, PackSize: 256 << 10, PackMaxEntry: DefaultPackMaxEntry})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	for i := 0; ; i++ {
		d, data := entry(i, 1+(i*7919)%(48<<10))
		if err := s.Add(d, data); err != nil {
			fmt.Println("add:", err)
			os.Exit(1)
		}
		if i%100 == 0 {
			fmt.Println(i)
		}
	}
}

// A writer killed with SIGKILL mid-append leaves packs without index
// files and possibly a torn record: the next store lists what is intact
// and serves only bytes that match their digests.
func TestPackedKilledWriter(t *testing.T) {
	if dir := os.Getenv(crashEnv); dir != "" {
		crashChild(dir)
		return
	}
	dir := t.TempDir()
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestPackedKilledWriter$")
		cmd.Env = append(os.Environ(), crashEnv+"="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		for sc.Scan() && sc.Text() != fmt.Sprint(1000+round*500) {
			if strings.Contains(sc.Text(), ":") {
				t.Fatalf("child: %s", sc.Text())
			}
		}
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()

		s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
		listed, served := 0, 0
		for i := range 200_000 {
			d, data := entry(i, 1+(i*7919)%(48<<10))
			if !s.Has(d) {
				if i > 1000+round*500 {
					break
				}
				continue
			}
			listed++
			got, err := s.Get(d)
			if errors.Is(err, ErrNotFound) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("entry %d served wrong bytes after a kill", i)
			}
			served++
		}
		st := s.Stats()
		t.Logf("round %d: %d listed, %d served; %+v", round, listed, served, st)
		if served < 1000 {
			t.Fatalf("only %d entries served after the kill", served)
		}
		s.Close()
	}
}

// Record headers and index entries round-trip, and garbage is refused.
func TestRecordHeader(t *testing.T) {
	for _, d := range []digest.Digest{digest.FromString("a"), digest.SHA384.FromString("b"), digest.SHA512.FromString("c")} {
		var h [recHeader]byte
		if err := encodeRecHeader(&h, string(d), 12345); err != nil {
			t.Fatal(err)
		}
		key, size, ok := decodeRecHeader(h[:])
		if !ok || key != string(d) || size != 12345 {
			t.Fatalf("round trip of %s: %s %d %v", d, key, size, ok)
		}
		for i := range recHeader {
			b := h
			b[i] ^= 0x10
			if key, size, ok := decodeRecHeader(b[:]); ok && (key != string(d) || size != 12345) {
				t.Fatalf("byte %d flipped: decoded as %s %d", i, key, size)
			}
		}
	}
	var h [recHeader]byte
	if _, _, ok := decodeRecHeader(h[:]); ok {
		t.Fatal("zeros decoded as a record")
	}
	binary.LittleEndian.PutUint64(h[8:], 1<<63)
	if _, _, ok := decodeRecHeader(h[:]); ok {
		t.Fatal("garbage decoded as a record")
	}
}

// FuzzPackScan feeds arbitrary pack and index contents to Open: it must
// not panic, and whatever it lists must never be served unless it hashes
// to its digest.
func FuzzPackScan(f *testing.F) {
	var h [recHeader]byte
	d := digest.FromString("x")
	encodeRecHeader(&h, string(d), 1)
	f.Add(append(append([]byte(packMagic), h[:]...), 'x'), []byte(nil))
	f.Add([]byte(packMagic+"LZR1"), []byte(idxMagic+"\x00\x00"))
	f.Fuzz(func(t *testing.T, pack, idx []byte) {
		dir := t.TempDir()
		os.MkdirAll(filepath.Join(dir, "packs"), 0o700)
		os.WriteFile(filepath.Join(dir, "packs", packName(1)), pack, 0o600)
		if idx != nil {
			os.WriteFile(filepath.Join(dir, "packs", "0000000000000001"+idxExt), idx, 0o600)
		}
		s, err := Open(Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		for i := range numShards {
			sh := &s.disk.shards[i]
			sh.mu.RLock()
			var keys []string
			for k := range sh.m {
				keys = append(keys, k)
			}
			sh.mu.RUnlock()
			for _, k := range keys {
				got, err := s.Get(digest.Digest(k))
				if err == nil && digest.Digest(k).Algorithm().FromBytes(got) != digest.Digest(k) {
					t.Fatalf("served bytes not matching %s", k)
				}
			}
		}
	})
}

// Packs on a read-only file system are served; Adds fail with EROFS, and
// OpenFile, which would need to write a file, fails without losing the
// entry.
func TestPackedReadOnly(t *testing.T) {
	dir := mountTmpfs(t, "4m")
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
	ents := addEntries(t, s, 0, 3, 5000)
	s.Close()
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("cannot remount read-only: %v", err)
	}
	s = open(t, Options{Dir: dir, MaxMemoryBytes: -1, PackMaxEntry: DefaultPackMaxEntry})
	for _, e := range ents {
		checkContent(t, s, e.d, e.data)
	}
	if _, err := s.OpenFile(ents[0].d); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("OpenFile of a packed entry on a read-only disk: %v, want EROFS", err)
	}
	checkContent(t, s, ents[0].d, ents[0].data)
	d, data := entry(10, 5000)
	if err := s.Add(d, data); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("Add on a read-only disk: %v, want EROFS", err)
	}
	if s.Has(d) {
		t.Fatal("failed Add listed")
	}
}
