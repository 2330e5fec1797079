package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"
)

// Defaults applied by Open to zero-valued Options fields.
const (
	DefaultMaxDiskBytes   int64 = 10 << 30
	DefaultMaxMemoryBytes int64 = 64 << 20
	DefaultMaxOpenFiles         = 256
)

// Options configure a Store. The zero value is a 64 MiB memory-only cache.
type Options struct {
	// Dir is the root of the disk tier, e.g. <daemon root>/cache. It is
	// created if missing. "" makes the store memory-only.
	Dir string

	// MaxDiskBytes bounds the disk tier (least recently used entries are
	// evicted). Entry sizes are charged rounded up to whole 4 KiB blocks.
	// 0 means DefaultMaxDiskBytes; < 0 means unlimited.
	MaxDiskBytes int64

	// MaxMemoryBytes bounds the memory tier (least recently used entries
	// are evicted). Entries larger than an eighth of it bypass the memory
	// tier. 0 means DefaultMaxMemoryBytes; < 0 disables the memory tier.
	MaxMemoryBytes int64

	// MaxOpenFiles bounds the file descriptors the store keeps open to
	// serve ReadAt from the disk tier without an open(2) per read.
	// 0 means DefaultMaxOpenFiles; < 0 opens and closes a file per read.
	MaxOpenFiles int

	// PackMaxEntry is the largest entry Add appends to a pack file
	// instead of giving it a file of its own (see the package
	// documentation); DefaultPackMaxEntry is the recommended value, the
	// daemon's default. 0 (or < 0) gives every new entry its own file;
	// packs already on disk are served either way.
	PackMaxEntry int64

	// PackSize is the size at which a pack file is sealed and the next
	// one started. 0 means DefaultPackSize.
	PackSize int64
}

// Store is a content-addressed, verified two-tier chunk cache. It is safe for
// concurrent use. See the package documentation for the design.
type Store struct {
	mem      *lru[*memEntry] // nil if the memory tier is disabled
	memAdmit int64           // largest entry admitted to the memory tier

	disk   *lru[*diskEntry] // nil for a memory-only store
	dir    string
	tmpDir string
	files  *fileCache
	pk     *packTier // the packed part of the disk tier; nil for a memory-only store
	// fileLocks serialize renames and unlinks of entry files, striped
	// like the disk index's shards.
	fileLocks [numShards]sync.Mutex
	lock      *os.File // the directory, open to hold its flock
	adding    singleflight.Group

	closed atomic.Bool

	corrupt     atomic.Uint64
	lost        atomic.Uint64
	verified    atomic.Uint64
	writeErrors atomic.Uint64
}

// memEntry is the value of a memory tier node.
type memEntry struct {
	// data is the entry's content. It is never modified after insertion
	// and is shared with callers of Get.
	data []byte
	// disk is the entry's disk tier node, if known, so memory hits keep
	// the disk copy from ageing out of the disk tier's LRU order.
	disk atomic.Pointer[lruNode[*diskEntry]]
}

// Open opens (creating if needed) the store described by opts. With a
// directory, it takes an exclusive lock on it, removes leftover temporary
// files, indexes the existing entries from their names, sizes and times
// (without reading their contents) and evicts down to MaxDiskBytes.
func Open(opts Options) (*Store, error) {
	if opts.MaxMemoryBytes == 0 {
		opts.MaxMemoryBytes = DefaultMaxMemoryBytes
	}
	if opts.MaxDiskBytes == 0 {
		opts.MaxDiskBytes = DefaultMaxDiskBytes
	}
	if opts.MaxOpenFiles == 0 {
		opts.MaxOpenFiles = DefaultMaxOpenFiles
	}
	if opts.PackMaxEntry <= 0 {
		opts.PackMaxEntry = -1
	}
	if opts.PackSize <= 0 {
		opts.PackSize = DefaultPackSize
	}
	if opts.Dir == "" && opts.MaxMemoryBytes < 0 {
		return nil, errors.New("cache: no directory and memory tier disabled: nothing to store in")
	}

	s := &Store{}
	if opts.MaxMemoryBytes > 0 {
		s.mem = newLRU[*memEntry](opts.MaxMemoryBytes)
		s.memAdmit = opts.MaxMemoryBytes / 8
	}
	if opts.Dir == "" {
		return s, nil
	}
	if err := s.openDisk(filepath.Clean(opts.Dir), opts.MaxDiskBytes, opts.MaxOpenFiles, opts.PackMaxEntry, opts.PackSize); err != nil {
		return nil, err
	}
	return s, nil
}

// Add stores data as the content of d. The caller must already have verified
// that data matches d; Add does not hash it again. data is copied, so the
// caller may reuse it afterwards.
//
// The entry goes into the memory tier (if it is small enough) and is written
// to the disk tier: appended to the active pack file if it is at most
// Options.PackMaxEntry bytes, otherwise to a temporary file under <Dir>/tmp,
// then renamed into place, so a reader never sees a partial file. Nothing
// is fsynced; see the package documentation for why that is safe.
//
// Add is idempotent, and concurrent Adds of the same digest write the file
// once. It returns nil if the entry is persisted (or, for a memory-only
// store, cached). On a disk error, for example a full or read-only file
// system, Add returns a wrapped error (errors.Is works with syscall.ENOSPC,
// syscall.EROFS, ...), leaves no temporary file behind and keeps the entry in
// the memory tier if it was admitted there.
func (s *Store) Add(d digest.Digest, data []byte) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if err := d.Validate(); err != nil {
		return fmt.Errorf("cache: add %q: %w: %w", d, errdefs.ErrInvalidArgument, err)
	}
	key := string(d)
	size := int64(len(data))

	var me *memEntry
	if s.mem != nil && size <= s.memAdmit {
		me = s.admitMemory(key, data, true)
	}
	if s.disk == nil {
		if me == nil {
			return fmt.Errorf("cache: add %s (%d bytes): %w", d, size, ErrTooLarge)
		}
		return nil
	}
	dn, err := s.addDisk(d, data)
	if err != nil {
		return err
	}
	if me != nil {
		me.disk.Store(dn)
	}
	return nil
}

// admitMemory inserts data under key into the memory tier unless it is
// already there, copying data if cp is set. It returns the entry now cached.
func (s *Store) admitMemory(key string, data []byte, cp bool) *memEntry {
	if e, ok := s.mem.peek(key); ok {
		return e.val
	}
	if cp {
		data = bytes.Clone(data)
	}
	n := &lruNode[*memEntry]{key: key, size: int64(len(data)), val: &memEntry{data: data}}
	if e := s.mem.insert(n); e != nil {
		return e.val
	}
	s.mem.shrink()
	return n.val
}

// ReadAt reads len(p) bytes of the entry d starting at off, like
// io.ReaderAt: it returns io.EOF if fewer bytes remain (0, io.EOF at or past
// the end). On a miss it returns an error satisfying errors.Is(err,
// ErrNotFound). An entry found corrupt, truncated or deleted on disk, or
// whose file fails to read (EIO, a directory in its place, ...), is
// discarded and reported as a miss (wrapping the cause), so Has no longer
// lists it. Only errors that are the process's or the system's rather than
// the file's (EMFILE, ENOMEM, EINTR, ...) are returned as they are: the
// entry stays cached, but the caller should fetch the data elsewhere.
//
// A memory tier hit takes a shard read lock and a copy, and allocates
// nothing.
func (s *Store) ReadAt(d digest.Digest, p []byte, off int64) (int, error) {
	if s.closed.Load() {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("cache: read %s: negative offset %d: %w", d, off, errdefs.ErrInvalidArgument)
	}
	key := string(d)
	if s.mem != nil {
		if n, ok := s.mem.get(key); ok {
			s.touchDisk(n.val)
			return readBuf(n.val.data, p, off)
		}
	}
	if s.disk == nil {
		return 0, ErrNotFound
	}
	n, ok := s.disk.get(key)
	if !ok {
		return 0, ErrNotFound
	}
	if !n.val.verified.Load() {
		buf, err := s.verify(n)
		if err != nil {
			return 0, err
		}
		if buf != nil {
			return readBuf(buf, p, off)
		}
	}
	return s.readDisk(n, p, off)
}

// readBuf implements ReaderAt semantics over an in-memory entry.
func readBuf(data, p []byte, off int64) (int, error) {
	if off >= int64(len(data)) {
		return 0, io.EOF
	}
	n := copy(p, data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// touchDisk keeps the disk copy of a memory tier hit recent in the disk
// tier's LRU order. It is cheap: the disk index lock is only taken when the
// disk node is no longer among the recently used ones.
func (s *Store) touchDisk(me *memEntry) {
	if dn := me.disk.Load(); dn != nil {
		s.disk.touch(dn)
	}
}

// Get returns the whole content of d. The returned slice may be shared with
// the memory tier and other callers: it must not be modified. On a miss it
// returns an error satisfying errors.Is(err, ErrNotFound). A disk tier hit
// is promoted to the memory tier if it is small enough.
func (s *Store) Get(d digest.Digest) ([]byte, error) {
	if s.closed.Load() {
		return nil, ErrClosed
	}
	key := string(d)
	if s.mem != nil {
		if n, ok := s.mem.get(key); ok {
			s.touchDisk(n.val)
			return n.val.data, nil
		}
	}
	if s.disk == nil {
		return nil, ErrNotFound
	}
	n, ok := s.disk.get(key)
	if !ok {
		return nil, ErrNotFound
	}
	if !n.val.verified.Load() {
		buf, err := s.verify(n)
		if err != nil {
			return nil, err
		}
		if buf != nil {
			return buf, nil
		}
	}
	buf := make([]byte, n.val.size)
	if _, err := s.readDisk(n, buf, 0); err != nil && err != io.EOF {
		return nil, err
	}
	if s.mem != nil && n.val.size <= s.memAdmit {
		me := s.admitMemory(key, buf, false)
		me.disk.Store(n)
		return me.data, nil
	}
	return buf, nil
}

// Has reports whether d is cached in either tier. It does not read or verify
// the entry and does not count as a use: an entry that is corrupt or was
// deleted behind the store's back is still reported until a read finds out.
func (s *Store) Has(d digest.Digest) bool {
	if s.closed.Load() {
		return false
	}
	key := string(d)
	if s.mem != nil {
		if _, ok := s.mem.peek(key); ok {
			return true
		}
	}
	if s.disk != nil {
		if _, ok := s.disk.peek(key); ok {
			return true
		}
	}
	return false
}

// OpenFile opens the disk tier file of d for reading, for FUSE passthrough
// (the kernel then reads the file directly). The entry is verified first if
// this process has not verified it yet, and its size is checked. A packed
// entry is first copied to a file of its own (once; its pack record becomes
// dead), so the file holds exactly the entry. The caller owns the returned
// file and must close it.
//
// The file stays valid even if the entry is evicted meanwhile: eviction only
// unlinks the name, so the data stays readable through the descriptor (and
// keeps occupying disk space until it is closed). There is deliberately no
// Path method: a path can be evicted between being returned and being opened.
//
// An entry that is only in the memory tier is reported as ErrNotFound.
func (s *Store) OpenFile(d digest.Digest) (*os.File, error) {
	if s.closed.Load() {
		return nil, ErrClosed
	}
	if s.disk == nil {
		return nil, ErrNotFound
	}
	n, ok := s.disk.get(string(d))
	if !ok {
		return nil, ErrNotFound
	}
	if !n.val.verified.Load() {
		if _, err := s.verify(n); err != nil {
			return nil, err
		}
	}
	if n.val.loc.Load() != nil {
		var err error
		if n, err = s.promote(n); err != nil {
			return nil, err
		}
	}
	return s.openEntry(n)
}

// TierStats describes one tier of a Store.
type TierStats struct {
	Hits      uint64 // lookups that found the entry in this tier
	Misses    uint64 // lookups that did not (a memory miss may still hit disk)
	Evictions uint64 // entries evicted to stay within Limit
	Entries   int64  // entries currently held
	Bytes     int64  // bytes currently charged (disk: files in 4 KiB blocks; packed records, and dead ones not yet reclaimed, by the byte)
	Limit     int64  // configured limit; < 0 unlimited, 0 tier disabled
}

// Stats is a snapshot of a Store's counters, for metrics and the CLI.
type Stats struct {
	Memory TierStats
	Disk   TierStats

	// Verified counts disk entries hashed on their first read in this
	// process and found intact.
	Verified uint64
	// Corrupt counts disk entries found with the wrong size or content
	// and discarded.
	Corrupt uint64
	// Lost counts disk entries whose file disappeared behind the store's
	// back.
	Lost uint64
	// WriteErrors counts Adds that failed to write the disk tier.
	WriteErrors uint64
}

// Stats returns the store's counters. Counters are read one by one without
// a global lock, so a snapshot taken under load is only approximately
// consistent.
func (s *Store) Stats() Stats {
	st := Stats{
		Verified:    s.verified.Load(),
		Corrupt:     s.corrupt.Load(),
		Lost:        s.lost.Load(),
		WriteErrors: s.writeErrors.Load(),
	}
	if s.mem != nil {
		st.Memory = tierStats(s.mem.stats(), s.mem.limit)
	}
	if s.disk != nil {
		st.Disk = tierStats(s.disk.stats(), s.disk.limit)
	}
	return st
}

func tierStats(st lruStats, limit int64) TierStats {
	return TierStats{
		Hits:      st.hits,
		Misses:    st.misses,
		Evictions: st.evictions,
		Entries:   st.entries,
		Bytes:     st.bytes,
		Limit:     limit,
	}
}

// Close releases the store's open files and its directory lock. Entries stay
// on disk for the next Open. Files returned by OpenFile stay valid. Close is
// idempotent; other methods return ErrClosed (Has returns false) afterwards.
func (s *Store) Close() error {
	if !s.closed.CompareAndSwap(false, true) {
		return nil
	}
	if s.pk != nil {
		s.closePacks()
	}
	if s.files != nil {
		s.files.closeAll()
	}
	if s.lock != nil {
		return s.lock.Close() // closing the descriptor releases the flock
	}
	return nil
}
