// Package cache is lazypull's verified chunk store: a content-addressed cache
// of plain (decompressed) bytes keyed by their digest, with a memory tier in
// front of a disk tier.
//
// Because entries are keyed by the digest of their content, a chunk shared by
// several layers or images is fetched and stored once, and any byte sequence
// whose digest is known (a chunk, a layer's TOC JSON keyed by the TOC digest)
// can be stored. There is no maximum entry size; entries larger than an
// eighth of the memory tier bypass it.
//
// # Trust
//
// The package follows the project rule that bytes are verified once, where
// they enter, and never leave unverified:
//
//   - Add trusts its caller: the fs reader has just checked the chunk against
//     the TOC. Hashing again would double the CPU cost of every fetch.
//   - An entry written by this process is trusted for the process's lifetime.
//   - An entry found on disk by Open is hashed in full the first time it is
//     read in this process, then remembered as verified. A file cut short or
//     filled with garbage by a crash, or altered while the daemon was down, is
//     discarded and reported as a miss (the caller refetches it), never
//     served. The cost is one extra read and hash of each entry per restart,
//     paid on first use rather than at Open, which stays fast.
//   - Lengths are checked always: on every open (fstat) and on every read
//     (a short read means the file was truncated). A file deleted behind the
//     store's back is forgotten and reported as a miss when a read next opens
//     it (a descriptor the store already holds keeps serving the intact data).
//
// The trade-off: corruption of a file that this process wrote or already
// verified, while the process runs, is caught only if it changes the length.
// Rehashing on every disk read would cost far more than it protects against.
//
// # Disk tier
//
// The layout follows content stores:
//
//	<Dir>/sha256/<first 2 hex>/<hex>   one file per entry, plain bytes
//	<Dir>/sha512/...                   likewise for other digest algorithms
//	<Dir>/tmp/                         Adds in progress; emptied by Open
//
// Add writes a temporary file in <Dir>/tmp and renames it into place, so a
// name never refers to a partial file. Files are not fsynced: fsync per 4 MiB
// chunk would make every fetch wait for the device, and the verification on
// first read after a restart already catches anything a crash left behind.
// Nothing is lost that cannot be fetched again.
//
// Open indexes the existing entries from their names, sizes and the later of
// their access and modification times: one fstatat(2) each, no content read
// (about half a second for 100k entries on a small, busy VM). It then evicts
// down to the limit. While running, the store writes an entry's access time
// back to its file at most once an hour, so the LRU order survives restarts
// even on noatime mounts. Open takes an exclusive flock on Dir: a second store
// on the same directory, in this or another process, fails with ErrLocked.
//
// Disk usage is charged in 4 KiB blocks. The disk tier evicts least recently
// used entries by unlinking their files; descriptors that readers (or FUSE
// passthrough, see Store.OpenFile) hold stay valid. While an Add is writing,
// usage may exceed the limit by the entries in flight.
//
// Errors writing the disk tier (ENOSPC, EROFS, ...) fail that Add with a
// wrapped error and leave no temporary file; what is already cached keeps
// being served, and the memory tier keeps working.
//
// # Memory tier
//
// The memory tier holds whole entries as immutable byte slices, bounded by
// bytes with LRU eviction. Add copies the caller's buffer into it; Get returns
// the cached slice itself, which callers must not modify. A disk hit that has
// to read the whole entry anyway (Get, or the first read that verifies it) is
// promoted into memory. Memory hits also count as uses of the entry's disk
// copy, so an entry hot in memory is not the first to leave the disk.
//
// # Concurrency
//
// Each tier is an index split into 64 shards, each with its own RWMutex, map
// and recency list. A lookup takes only a shard read lock; moving an entry to
// the front of its list takes the write lock but is skipped while the entry
// is already among the most recently used eighth of the tier, so hot entries
// are served under read locks only. Eviction picks the globally least
// recently used entry by comparing the shard tails' logical timestamps. A
// memory hit copies from the shared slice after the lock is released and
// allocates nothing. Disk hits use a small cache of open descriptors, so they
// cost one pread(2).
//
// Renames and unlinks of entry files are serialized per name by striped
// locks separate from the index locks, so lookups never wait for a system
// call, and evicting an old copy never unlinks a newer copy of the same
// entry. There is no global mutable state: everything lives in the Store.
package cache
