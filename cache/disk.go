package cache

import (
	"cmp"
	"container/list"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	_ "crypto/sha256" // register the hashes go-digest verifies with
	_ "crypto/sha512"
)

// algorithms are the digest algorithms the disk tier stores, each under
// <Dir>/<algorithm>/.
var algorithms = []digest.Algorithm{digest.SHA256, digest.SHA384, digest.SHA512}

// blockSize is the unit in which disk usage is charged: a 100-byte chunk
// still occupies a file system block.
const blockSize = 4096

// atimeInterval is how often, at most, a used entry's access time is written
// back to its file, so that the LRU order survives a restart.
const atimeInterval = int64(time.Hour / time.Second)

// diskCharge is the number of bytes an entry of size bytes is charged.
func diskCharge(size int64) int64 {
	return max(blockSize, (size+blockSize-1)&^(blockSize-1))
}

// diskEntry is the value of a disk tier node.
type diskEntry struct {
	size int64 // exact content length, immutable

	// verified is set once the file's content has been hashed in this
	// process, or was written by it.
	verified atomic.Bool
	// removed is set when the entry leaves the index, before its file is
	// unlinked.
	removed atomic.Bool
	// touched is the last access time (unix seconds) written to or read
	// from the file.
	touched atomic.Int64
	// vmu serializes the first-read verification.
	vmu sync.Mutex

	// loc is where a packed entry's record is (see pack.go); nil for an
	// entry with a file of its own. It is set before the node is indexed
	// and only compaction moves it, under lmu; a node never changes kind.
	loc atomic.Pointer[packLoc]
	// lmu serializes moving a packed entry (compaction) with its release.
	lmu sync.Mutex

	// Guarded by fileCache.mu: the cached descriptor and its place in the
	// descriptor LRU list.
	file   *sharedFile
	fdElem *list.Element
}

// openDisk sets up the disk tier under dir.
func (s *Store) openDisk(dir string, limit int64, maxFiles int, packMax, packSize int64) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		// An existing cache on a read-only file system can still be served.
		if fi, serr := os.Stat(dir); serr != nil || !fi.IsDir() {
			return fmt.Errorf("cache: create %s: %w", dir, err)
		}
	}
	lock, err := lockDir(dir)
	if err != nil {
		return err
	}
	s.lock = lock
	s.dir = dir
	s.tmpDir = filepath.Join(dir, "tmp")
	// Leftovers of Adds interrupted by a crash. Nobody else can be writing
	// here: we hold the lock.
	if err := os.RemoveAll(s.tmpDir); err != nil {
		log.L.WithError(err).WithField("path", s.tmpDir).Warn("cannot clean the cache's temporary directory")
	}
	if err := os.Mkdir(s.tmpDir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		log.L.WithError(err).WithField("path", s.tmpDir).Warn("cannot create the cache's temporary directory; disk tier is read-only")
	}

	s.disk = newLRU[*diskEntry](limit)
	s.disk.release = s.releaseDisk
	s.disk.promoted = s.persistUse
	s.files = newFileCache(maxFiles)
	// The packed tier is always read (packs written with packing on stay
	// servable when it is turned off); packMax < 0 only stops new appends.
	s.pk = &packTier{dir: filepath.Join(dir, "packs"), maxEntry: packMax, size: packSize, all: map[uint64]*pack{}}
	s.disk.overhead = &s.pk.dead

	found, err := s.scan()
	if err != nil {
		lock.Close()
		return err
	}
	packed, err := s.scanPacks()
	if err != nil {
		lock.Close()
		return err
	}
	found = dedupeScanned(append(found, packed...))
	// Oldest first, so that the index's LRU order matches the files' times.
	// Packed entries share their pack's time; within a pack, later
	// records are the more recently added.
	slices.SortFunc(found, func(a, b scanned) int {
		if c := cmp.Compare(a.time, b.time); c != 0 || a.loc == nil || b.loc == nil {
			return c
		}
		if c := cmp.Compare(a.loc.p.id, b.loc.p.id); c != 0 {
			return c
		}
		return cmp.Compare(a.loc.off, b.loc.off)
	})
	found = s.evictScanned(found, limit)
	for _, f := range found {
		n := &lruNode[*diskEntry]{key: f.key, size: f.charge(), val: &diskEntry{size: f.size}}
		n.val.touched.Store(f.time / int64(time.Second))
		if f.loc != nil {
			n.val.loc.Store(f.loc)
			f.loc.p.live[n] = n.size // packs are not shared yet: no lock needed
		}
		s.disk.insert(n)
	}
	s.settlePacks()
	s.disk.shrink()
	return nil
}

// dedupeScanned keeps one scanned entry per key: an entry file over a
// packed record (it can back passthrough), a later pack record over an
// earlier one (an entry discarded and added again).
func dedupeScanned(found []scanned) []scanned {
	idx := make(map[string]int, len(found))
	out := found[:0]
	for _, f := range found {
		i, ok := idx[f.key]
		if !ok {
			idx[f.key] = len(out)
			out = append(out, f)
			continue
		}
		if better(f, out[i]) {
			out[i] = f
		}
	}
	return out
}

// better reports whether scanned entry a should be kept over b.
func better(a, b scanned) bool {
	switch {
	case a.loc == nil || b.loc == nil:
		return a.loc == nil && b.loc != nil
	case a.loc.p.id != b.loc.p.id:
		return a.loc.p.id > b.loc.p.id
	default:
		return a.loc.off > b.loc.off
	}
}

// evictScanned enforces the limit on the scanned entries, oldest first,
// before they are indexed: a lowered limit may evict many entries at Open,
// and doing it here costs one unlink each (run in parallel) rather than a
// trip through the index. It returns the entries to keep.
func (s *Store) evictScanned(found []scanned, limit int64) []scanned {
	if limit < 0 {
		return found
	}
	var total int64
	for _, f := range found {
		total += f.charge()
	}
	drop := 0
	for ; total > limit && drop < len(found); drop++ {
		total -= found[drop].charge()
	}
	if drop == 0 {
		return found
	}
	var g errgroup.Group
	g.SetLimit(16)
	for _, f := range found[:drop] {
		if f.loc != nil {
			continue // its record is dead; settlePacks reclaims the space
		}
		g.Go(func() error {
			if err := os.Remove(s.entryPath(f.key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				log.L.WithError(err).WithField("digest", f.key).Warn("cannot remove evicted cache entry")
			}
			return nil
		})
	}
	g.Wait()
	s.disk.evictions.Add(uint64(drop))
	return found[drop:]
}

// lockDir takes an exclusive, non-blocking flock on dir itself, which works
// on read-only file systems too. Two stores on one directory would each
// account for and evict the other's files and delete its temporary files.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("cache: open %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, dir)
		}
		return nil, fmt.Errorf("cache: lock %s: %w", dir, err)
	}
	return f, nil
}

// scanned is an entry found on disk by Open.
type scanned struct {
	key  string
	size int64
	time int64    // max(atime, mtime) in unix nanoseconds (of the pack, for packed entries)
	loc  *packLoc // a packed entry's record; nil for an entry file
}

// charge is what the entry is charged against the disk limit: whole
// blocks for a file, the record's bytes for a packed entry.
func (f scanned) charge() int64 {
	if f.loc != nil {
		return recHeader + f.size
	}
	return diskCharge(f.size)
}

// scan lists the entries on disk from directory entries and lstat alone,
// reading no file contents. The 256 fan-out directories of each algorithm are
// scanned in parallel, which matters when the inodes are not cached.
func (s *Store) scan() ([]scanned, error) {
	var (
		mu    sync.Mutex
		found []scanned
		g     errgroup.Group
	)
	g.SetLimit(16)
	for _, alg := range algorithms {
		algDir := filepath.Join(s.dir, string(alg))
		subs, err := readDirUnsorted(algDir)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("cache: scan %s: %w", algDir, err)
		}
		empty := alg.FromBytes(nil)
		for _, sub := range subs {
			prefix := sub.Name()
			if !sub.IsDir() || len(prefix) != 2 || !isLowerHex(prefix) {
				continue
			}
			g.Go(func() error {
				es := s.scanDir(alg, empty, filepath.Join(algDir, prefix), prefix)
				mu.Lock()
				found = append(found, es...)
				mu.Unlock()
				return nil
			})
		}
	}
	err := g.Wait()
	return found, err
}

// scanDir lists one fan-out directory. Unreadable directories and foreign
// files are skipped (and left alone); empty files other than the empty
// entry are removed as corrupt.
func (s *Store) scanDir(alg digest.Algorithm, empty digest.Digest, dir, prefix string) []scanned {
	f, err := os.Open(dir)
	if err == nil {
		defer f.Close()
	}
	var ents []os.DirEntry
	if err == nil {
		ents, err = f.ReadDir(-1) // unsorted, unlike os.ReadDir
	}
	if err != nil {
		log.L.WithError(err).WithField("path", dir).Warn("skipping unreadable cache directory")
		return nil
	}
	out := make([]scanned, 0, len(ents))
	for _, e := range ents {
		name := e.Name()
		if len(name) != alg.Size()*2 || name[:2] != prefix || !isLowerHex(name) || !e.Type().IsRegular() {
			continue
		}
		size, mtime, ok, err := statEntry(f, name)
		if err != nil || !ok {
			continue // removed meanwhile
		}
		d := digest.NewDigestFromEncoded(alg, name)
		if size == 0 && d != empty {
			s.corrupt.Add(1)
			log.L.WithField("digest", d).Warn("discarding empty cache disk entry")
			os.Remove(filepath.Join(dir, name))
			continue
		}
		out = append(out, scanned{key: string(d), size: size, time: mtime})
	}
	return out
}

func readDirUnsorted(dir string) ([]os.DirEntry, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.ReadDir(-1)
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// entryPath is <Dir>/<algorithm>/<first 2 hex>/<hex> for a validated key.
func (s *Store) entryPath(key string) string {
	i := strings.IndexByte(key, ':')
	hex := key[i+1:]
	return filepath.Join(s.dir, key[:i], hex[:2], hex)
}

// addDisk stores data as d in the disk tier unless it is there already.
func (s *Store) addDisk(d digest.Digest, data []byte) (*lruNode[*diskEntry], error) {
	key := string(d)
	if n, ok := s.disk.peek(key); ok {
		s.disk.touch(n)
		return n, nil
	}
	size := int64(len(data))
	charge := diskCharge(size)
	if size <= s.pk.maxEntry {
		charge = recHeader + size
	}
	if !s.disk.fits(charge) {
		return nil, fmt.Errorf("cache: add %s (%d bytes) to disk tier of %d bytes: %w", d, size, s.disk.limit, ErrTooLarge)
	}
	v, err, _ := s.adding.Do(key, func() (any, error) {
		if n, ok := s.disk.peek(key); ok {
			return n, nil
		}
		if int64(len(data)) <= s.pk.maxEntry {
			return s.writePack(d, data)
		}
		return s.writeFile(d, data, nil)
	})
	if err != nil {
		return nil, err
	}
	return v.(*lruNode[*diskEntry]), nil
}

// writePack appends data to the active pack file as the entry d.
//
// Like entry files, packs are not fsynced: a record torn by a crash fails
// its header check at Open (and is not listed), and the bytes of a record
// whose header survived are hashed on their first read.
func (s *Store) writePack(d digest.Digest, data []byte) (n *lruNode[*diskEntry], err error) {
	defer func() {
		if err != nil {
			s.writeErrors.Add(1)
			err = fmt.Errorf("cache: storing %s on disk: %w", d, classifyWrite(err))
		}
	}()
	key := string(d)
	mu := &s.fileLocks[s.disk.shardIndex(key)]
	mu.Lock()
	if e, ok := s.disk.peek(key); ok {
		mu.Unlock()
		return e, nil
	}
	size := int64(len(data))
	n = &lruNode[*diskEntry]{key: key, size: recHeader + size, val: &diskEntry{size: size}}
	n.val.verified.Store(true) // the caller verified the data, and we wrote it
	n.val.touched.Store(time.Now().Unix())
	if err := s.appendRecord(n, data); err != nil {
		mu.Unlock()
		return nil, err
	}
	if e := s.disk.insert(n); e != nil {
		// Unreachable: inserts of a key happen under its file lock.
		mu.Unlock()
		s.packRelease(n.val.loc.Load().p, n, false)
		return e, nil
	}
	mu.Unlock()
	s.disk.shrink()
	s.helpCompact()
	return n, nil
}

// writeFile writes data to a temporary file and renames it into place as
// the entry d, replacing the index node old (a packed copy being promoted)
// if it is not nil.
//
// The file is not fsynced. After a crash, a file may be empty or hold
// garbage; entries found at Open are hashed on their first read, so such a
// file is discarded, never served. Skipping fsync keeps Add from waiting for
// the device on every chunk.
func (s *Store) writeFile(d digest.Digest, data []byte, old *lruNode[*diskEntry]) (n *lruNode[*diskEntry], err error) {
	defer func() {
		if err != nil && !errors.Is(err, ErrNotFound) { // a promoted entry that left meanwhile is no write error
			s.writeErrors.Add(1)
			err = fmt.Errorf("cache: storing %s on disk: %w", d, classifyWrite(err))
		}
	}()
	pattern := d.Encoded()[:16] + "-*"
	f, err := os.CreateTemp(s.tmpDir, pattern)
	if errors.Is(err, fs.ErrNotExist) { // tmp removed behind our back
		if err = os.MkdirAll(s.tmpDir, 0o700); err == nil {
			f, err = os.CreateTemp(s.tmpDir, pattern)
		}
	}
	if err != nil {
		return nil, err
	}
	tmp := f.Name()
	if _, err = f.Write(data); err == nil {
		err = f.Close()
	} else {
		f.Close()
	}
	if err == nil {
		n, err = s.commitDisk(string(d), int64(len(data)), tmp, old)
	}
	if err != nil {
		os.Remove(tmp)
		return nil, err
	}
	s.disk.shrink()
	return n, nil
}

// commitDisk renames the temporary file tmp into place as key and indexes
// it, unless key is present already (other than as old), in which case tmp
// is removed. A non-nil old is replaced in the index by the new node.
//
// Renames and unlinks of one name are serialized by the name's file lock
// (not the index shard lock, so lookups never wait for a syscall): an
// eviction that runs after key was added again must not unlink the new file.
func (s *Store) commitDisk(key string, size int64, tmp string, old *lruNode[*diskEntry]) (*lruNode[*diskEntry], error) {
	mu := &s.fileLocks[s.disk.shardIndex(key)]
	mu.Lock()
	defer mu.Unlock()
	e, ok := s.disk.peek(key)
	if old != nil && e != old {
		// Promoting an entry that has left or was replaced meanwhile.
		os.Remove(tmp)
		return nil, fmt.Errorf("%w: %s: changed while being promoted", ErrNotFound, key)
	}
	if old == nil && ok {
		os.Remove(tmp)
		return e, nil
	}
	final := s.entryPath(key)
	err := os.Rename(tmp, final)
	if errors.Is(err, fs.ErrNotExist) { // first entry with this prefix
		if err = os.MkdirAll(filepath.Dir(final), 0o700); err == nil {
			err = os.Rename(tmp, final)
		}
	}
	if err != nil {
		return nil, err
	}
	n := &lruNode[*diskEntry]{key: key, size: diskCharge(size), val: &diskEntry{size: size}}
	n.val.verified.Store(true) // the caller verified the data, and we wrote it
	n.val.touched.Store(time.Now().Unix())
	if old != nil {
		if !s.disk.replace(old, n) {
			// old left the index meanwhile (eviction serializes with
			// us only for entry files): drop the new file too.
			os.Remove(final)
			return nil, fmt.Errorf("%w: %s", ErrNotFound, key)
		}
		return n, nil
	}
	if e := s.disk.insert(n); e != nil {
		// Unreachable: inserts of a key happen under its file lock.
		return e, nil
	}
	return n, nil
}

// releaseDisk runs when n has left the disk index: it drops the cached
// descriptor and unlinks the file (readers holding a descriptor keep reading
// it), unless the entry has been added again meanwhile under the same name.
func (s *Store) releaseDisk(n *lruNode[*diskEntry]) {
	n.val.removed.Store(true)
	if n.val.loc.Load() != nil {
		n.val.lmu.Lock() // a compaction moving n finishes first
		loc := n.val.loc.Load()
		n.val.lmu.Unlock()
		s.packRelease(loc.p, n, false)
		return
	}
	s.files.drop(n)
	mu := &s.fileLocks[s.disk.shardIndex(n.key)]
	mu.Lock()
	defer mu.Unlock()
	if _, ok := s.disk.peek(n.key); ok {
		return
	}
	if err := os.Remove(s.entryPath(n.key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.L.WithError(err).WithField("digest", n.key).Warn("cannot remove evicted cache entry")
	}
}

// persistUse writes the access time of a used entry back to its file, at
// most once per atimeInterval, so that Open can restore the LRU order.
func (s *Store) persistUse(n *lruNode[*diskEntry]) {
	now := time.Now()
	last := n.val.touched.Load()
	if now.Unix()-last < atimeInterval || !n.val.touched.CompareAndSwap(last, now.Unix()) {
		return
	}
	if loc := n.val.loc.Load(); loc != nil {
		// Packed entries share their pack's time.
		p := loc.p
		if last := p.touched.Load(); now.Unix()-last >= atimeInterval && p.touched.CompareAndSwap(last, now.Unix()) {
			_ = os.Chtimes(p.path, now, time.Time{})
		}
		return
	}
	_ = os.Chtimes(s.entryPath(n.key), now, time.Time{}) // best effort; read-only is fine
}

// discard removes a corrupt entry and returns the miss to report.
func (s *Store) discard(n *lruNode[*diskEntry], why string) error {
	if s.disk.remove(n) {
		s.corrupt.Add(1)
		log.L.WithFields(log.Fields{"digest": n.key, "reason": why}).Warn("discarding corrupt cache disk entry")
	}
	return fmt.Errorf("%w: %s: %s on disk, discarded", ErrNotFound, n.key, why)
}

// lose forgets an entry whose file vanished and returns the miss to report.
func (s *Store) lose(n *lruNode[*diskEntry]) error {
	if s.disk.remove(n) {
		s.lost.Add(1)
		log.L.WithField("digest", n.key).Warn("cache disk entry deleted behind our back")
	}
	return fmt.Errorf("%w: %s: file missing", ErrNotFound, n.key)
}

// readFailed handles an error reading n's file (op says which step
// failed). An error that says nothing about the entry (too many open files,
// out of memory, an interrupted call) is returned as it is: the entry stays
// and a later read may succeed. Any other (EIO, EISDIR, EACCES, ESTALE, ...)
// means the entry cannot be served: it is discarded and the error reported
// as a miss, so the caller fetches the data again instead of finding the
// entry still listed and failing on it forever.
func (s *Store) readFailed(n *lruNode[*diskEntry], op string, err error) error {
	if transientReadError(err) {
		return fmt.Errorf("cache: %s %s: %w", op, n.key, err)
	}
	return fmt.Errorf("%w (%w)", s.discard(n, op+" failed: "+err.Error()), err)
}

// transientReadError reports whether err is a condition of the process or
// the system rather than of the file read.
func transientReadError(err error) bool {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOMEM, syscall.ENOBUFS, syscall.EINTR, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// openEntry opens n's file and checks its size.
func (s *Store) openEntry(n *lruNode[*diskEntry]) (*os.File, error) {
	f, err := os.Open(s.entryPath(n.key))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, s.lose(n)
		}
		return nil, s.readFailed(n, "open", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, s.readFailed(n, "stat", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, s.discard(n, "not a regular file ("+fi.Mode().Type().String()+")")
	}
	if fi.Size() != n.val.size {
		f.Close()
		return nil, s.discard(n, fmt.Sprintf("size %d, want %d", fi.Size(), n.val.size))
	}
	return f, nil
}

// readDisk serves ReadAt from n's file. A short read is a truncated file.
func (s *Store) readDisk(n *lruNode[*diskEntry], p []byte, off int64) (int, error) {
	size := n.val.size
	if off >= size {
		return 0, io.EOF
	}
	want := p
	if rem := size - off; int64(len(p)) > rem {
		want = p[:rem]
	}
	sf, base, err := s.acquireEntry(n)
	if err != nil {
		return 0, err
	}
	nr, err := sf.f.ReadAt(want, base+off)
	sf.release()
	if nr < len(want) {
		if err == nil || err == io.EOF {
			return 0, s.discard(n, fmt.Sprintf("truncated below %d bytes", off+int64(nr)+1))
		}
		return 0, s.readFailed(n, "read", err)
	}
	if len(want) < len(p) {
		return nr, io.EOF
	}
	return nr, nil
}

// verify hashes n's file the first time it is read in this process. Entries
// small enough for the memory tier are read whole, admitted to it and
// returned, so the read that triggered verification is served from memory;
// otherwise verify returns nil and the caller reads the (now verified) file.
// Concurrent first readers wait for one verification.
func (s *Store) verify(n *lruNode[*diskEntry]) ([]byte, error) {
	e := n.val
	e.vmu.Lock()
	defer e.vmu.Unlock()
	if e.verified.Load() {
		return nil, nil
	}
	if e.removed.Load() {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, n.key)
	}
	sf, base, err := s.acquireEntry(n)
	if err != nil {
		return nil, err
	}
	defer sf.release()

	alg := digest.Digest(n.key).Algorithm()
	h := alg.Hash()
	var buf []byte
	var nr int64
	if s.mem != nil && e.size <= s.memAdmit {
		buf = make([]byte, e.size)
		var r int
		r, err = sf.f.ReadAt(buf, base)
		nr = int64(r)
		h.Write(buf[:r])
	} else {
		nr, err = io.Copy(h, io.NewSectionReader(sf.f, base, e.size))
	}
	if err != nil && err != io.EOF {
		return nil, s.readFailed(n, "verify", err)
	}
	if nr < e.size {
		return nil, s.discard(n, fmt.Sprintf("truncated to %d of %d bytes", nr, e.size))
	}
	if got := digest.NewDigest(alg, h); string(got) != n.key {
		return nil, s.discard(n, "content hashes to "+string(got))
	}
	e.verified.Store(true)
	s.verified.Add(1)
	if buf != nil {
		me := s.admitMemory(n.key, buf, false)
		me.disk.Store(n)
		return me.data, nil
	}
	return nil, nil
}

// acquireEntry returns a referenced descriptor holding n's bytes from
// offset base on: its own file, or its pack. The caller must release it.
func (s *Store) acquireEntry(n *lruNode[*diskEntry]) (*sharedFile, int64, error) {
	loc := n.val.loc.Load()
	if loc == nil {
		sf, err := s.files.acquire(n, s.openEntry)
		return sf, 0, err
	}
	for {
		if sf := loc.p.acquire(); sf != nil {
			return sf, loc.off + recHeader, nil
		}
		// The pack is gone: n was moved by a compaction (look again)
		// or has left the index.
		next := n.val.loc.Load()
		if next == loc {
			return nil, 0, fmt.Errorf("%w: %s: its pack was removed", ErrNotFound, n.key)
		}
		loc = next
	}
}

// sharedFile is a reference-counted descriptor: the cache holds one
// reference while it lists the file, each reader one while reading. The
// descriptor is closed when the last reference goes.
type sharedFile struct {
	f    *os.File
	refs atomic.Int32
}

func (sf *sharedFile) release() {
	if sf.refs.Add(-1) == 0 {
		sf.f.Close()
	}
}

// fileCache keeps up to max descriptors of disk entries open, least
// recently used closed first, so that a disk hit costs one pread(2) instead
// of open, fstat, pread and close.
type fileCache struct {
	mu     sync.Mutex
	max    int
	closed bool
	lru    list.List // of *lruNode[*diskEntry]; front is most recently used
}

func newFileCache(limit int) *fileCache {
	return &fileCache{max: limit}
}

// acquire returns a referenced descriptor for n, opening it with open if it
// is not cached. The caller must release it.
func (c *fileCache) acquire(n *lruNode[*diskEntry], open func(*lruNode[*diskEntry]) (*os.File, error)) (*sharedFile, error) {
	e := n.val
	c.mu.Lock()
	if sf := e.file; sf != nil {
		sf.refs.Add(1)
		c.lru.MoveToFront(e.fdElem)
		c.mu.Unlock()
		return sf, nil
	}
	c.mu.Unlock()

	f, err := open(n) // without the lock: open(2) may be slow
	if err != nil {
		return nil, err
	}
	sf := &sharedFile{f: f}
	sf.refs.Store(1)
	if c.max <= 0 {
		return sf, nil
	}

	var victims []*sharedFile
	c.mu.Lock()
	switch {
	case e.file != nil: // another reader cached one meanwhile
		other := e.file
		other.refs.Add(1)
		c.lru.MoveToFront(e.fdElem)
		victims = append(victims, sf)
		sf = other
	case c.closed || e.removed.Load():
		// Do not cache: the entry is gone (its drop may already have
		// run) or the store is closing. Use the descriptor once.
	default:
		sf.refs.Add(1) // the cache's reference
		e.file = sf
		e.fdElem = c.lru.PushFront(n)
		for c.lru.Len() > c.max {
			victims = append(victims, c.removeLocked(c.lru.Back().Value.(*lruNode[*diskEntry])))
		}
	}
	c.mu.Unlock()
	for _, v := range victims {
		v.release()
	}
	return sf, nil
}

// removeLocked unlists n's descriptor and returns it for release.
func (c *fileCache) removeLocked(n *lruNode[*diskEntry]) *sharedFile {
	e := n.val
	c.lru.Remove(e.fdElem)
	sf := e.file
	e.file, e.fdElem = nil, nil
	return sf
}

// drop closes n's cached descriptor, if any, once its readers are done.
func (c *fileCache) drop(n *lruNode[*diskEntry]) {
	c.mu.Lock()
	var sf *sharedFile
	if n.val.file != nil {
		sf = c.removeLocked(n)
	}
	c.mu.Unlock()
	if sf != nil {
		sf.release()
	}
}

// closeAll releases every cached descriptor and stops caching new ones.
func (c *fileCache) closeAll() {
	c.mu.Lock()
	c.closed = true
	var victims []*sharedFile
	for c.lru.Len() > 0 {
		victims = append(victims, c.removeLocked(c.lru.Front().Value.(*lruNode[*diskEntry])))
	}
	c.mu.Unlock()
	for _, v := range victims {
		v.release()
	}
}

// AddFrom stores the size bytes read from r under d in the disk tier,
// without holding them in memory, checking as they stream that they hash to
// d: bytes that do not are discarded and an error returned. It is for large
// entries assembled from others (a whole file from its chunks, for FUSE
// passthrough). A store without a disk tier returns ErrTooLarge.
func (s *Store) AddFrom(d digest.Digest, size int64, r io.Reader) (err error) {
	if s.closed.Load() {
		return ErrClosed
	}
	if err := d.Validate(); err != nil {
		return fmt.Errorf("cache: add %q: %w: %w", d, errdefs.ErrInvalidArgument, err)
	}
	if s.disk == nil {
		return fmt.Errorf("cache: add %s (%d bytes) without a disk tier: %w", d, size, ErrTooLarge)
	}
	key := string(d)
	if n, ok := s.disk.peek(key); ok {
		s.disk.touch(n)
		return nil
	}
	if !s.disk.fits(diskCharge(size)) {
		return fmt.Errorf("cache: add %s (%d bytes) to disk tier of %d bytes: %w", d, size, s.disk.limit, ErrTooLarge)
	}
	_, err, _ = s.adding.Do(key, func() (any, error) {
		if n, ok := s.disk.peek(key); ok {
			return n, nil
		}
		return s.streamDisk(d, size, r)
	})
	return err
}

// streamDisk is writeFile for a stream that is verified as it is written.
func (s *Store) streamDisk(d digest.Digest, size int64, r io.Reader) (n *lruNode[*diskEntry], err error) {
	defer func() {
		if err != nil {
			s.writeErrors.Add(1)
			err = fmt.Errorf("cache: storing %s on disk: %w", d, classifyWrite(err))
		}
	}()
	f, err := os.CreateTemp(s.tmpDir, d.Encoded()[:16]+"-*")
	if err != nil {
		return nil, err
	}
	tmp := f.Name()
	v := d.Verifier()
	written, err := io.Copy(io.MultiWriter(f, v), io.LimitReader(r, size+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && (written != size || !v.Verified()) {
		err = fmt.Errorf("%w (%d of %d bytes)", ErrCorrupt, written, size)
	}
	if err == nil {
		n, err = s.commitDisk(string(d), size, tmp, nil)
	}
	if err != nil {
		os.Remove(tmp)
		return nil, err
	}
	s.disk.shrink()
	return n, nil
}
