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
// The layout follows content stores, with small entries packed:
//
//	<Dir>/sha256/<first 2 hex>/<hex>   an entry with a file of its own, plain bytes
//	<Dir>/sha512/...                   likewise for other digest algorithms
//	<Dir>/packs/<16 hex>.pack          small entries appended back to back
//	<Dir>/packs/<16 hex>.idx           a sealed pack's records (digest, offset, length)
//	<Dir>/tmp/                         Adds in progress; emptied by Open
//
// With Options.PackMaxEntry set (the daemon uses DefaultPackMaxEntry,
// 1 MiB), Add appends an entry of at most that many bytes to the active
// pack: one pwritev(2) of a record header (magic,
// algorithm, length, raw digest, CRC-32C of the header) and the bytes, on a
// descriptor the store keeps open. Creating a file per chunk cost an inode
// allocation, a directory entry and a rename; on ext4 that was most of the
// CPU the disk tier took for small chunks (see docs/benchmarks.md). A pack
// is sealed at Options.PackSize (32 MiB), when its index file is written,
// and at Close. Larger entries, and whole-file entries from AddFrom, are
// written to a temporary file in <Dir>/tmp and renamed into place, so a name
// never refers to a partial file.
//
// OpenFile needs a file holding exactly the entry (FUSE passthrough hands it
// to the kernel), so it promotes a packed entry: the entry is verified if
// it has not been, copied to a file of its own, and its record becomes dead.
// Chunks fetched and never opened for passthrough (the background fetch,
// chunks of multi-chunk files) never get a file.
//
// Nothing is fsynced: fsync per chunk would make every fetch wait for the
// device, and nothing is lost that cannot be fetched again. After a crash
// an entry file may be empty or hold garbage, and a pack may end in a torn
// record, or lack its index file. Open lists a pack's records from its
// index file (checked by its CRC; a damaged one is ignored) and scans the
// record headers after what the index covers; the scan stops at the first
// header that is not intact or whose length runs past the end of the file,
// so a torn record, and anything after it, is not listed. Every entry found
// at Open, in a file or a pack, is hashed on its first read (below), so
// bytes a crash damaged are discarded, never served.
//
// Open indexes the existing entries from their names, sizes and the later of
// their access and modification times: one fstatat(2) per entry file, one
// read per pack index file, no content read (about half a second for 100k
// entry files on a small, busy VM). It then evicts down to the limit. While
// running, the store writes an entry's access time back to its file (for a
// packed entry: to its pack, which all its entries share) at most once an
// hour, so the LRU order survives restarts even on noatime mounts. Open takes
// an exclusive flock on Dir: a second store on the same directory, in this
// or another process, fails with ErrLocked.
//
// Disk usage is charged in 4 KiB blocks for entry files and by the byte
// (header included) for packed records. The disk tier evicts least recently
// used entries, one by one, packed or not. Evicting an entry file unlinks
// it; descriptors that readers (or FUSE passthrough, see Store.OpenFile)
// hold stay valid. Evicting a packed entry makes its record dead: dead
// records count against the limit until their pack is deleted, which
// happens when nothing in it is live, or when more than half of a sealed
// pack is dead: then its live records are copied to the active pack
// (compaction, in the background; an entry not yet verified stays
// unverified and is hashed on its first read from the new place) and it is
// deleted. When the tier is nearly full, live records among the least
// recently used quarter of the tier are evicted with their pack instead of
// copied, so a pack of chunks nobody used again since they were written
// goes whole, without copying. So dead records never take more than about as much disk as live
// ones, and at least about half the limit holds live entries. A pack
// queued for compaction is no longer charged (charging it until it is
// gone would make evictions cascade, as evicting a packed entry frees
// nothing by itself); Adds help compact while more than two packs' worth
// of bytes wait. So usage may exceed the limit by the entries being
// written and by the packs waiting for compaction (up to about three
// packs). Records of evicted entries listed in an index file come back
// after a restart if their pack is still there; they hold valid (and again
// verified-on-first-read) bytes and are charged like any entry.
//
// Errors writing the disk tier (ENOSPC, EDQUOT, EROFS, ...) fail that Add
// with a wrapped error (ENOSPC and EDQUOT also match
// errdefs.ErrResourceExhausted) and leave no temporary file and no partial
// record (a pack is cut back to where the failed record started, or sealed
// if even that fails); what is
// already cached keeps being served, and the memory tier keeps working. A
// read of a pack failing with an I/O error discards that entry alone, like
// an entry file's.
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
// entry. Appends to packs are serialized by one mutex (a pwritev into the
// page cache each); reads of packed entries take no lock but a reference on
// the pack's descriptor, so a pack deleted meanwhile finishes its reads.
// There is no global mutable state: everything lives in the Store.
package cache
