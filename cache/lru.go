package cache

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// numShards is the number of independently locked partitions of an index.
// Keys are spread over shards by hash, so readers of different entries
// rarely touch the same lock.
const numShards = 64

// lruNode is one entry of an lru index. key, size and val are immutable once
// the node has been inserted; prev, next and linked are guarded by the lock
// of the node's shard; stamp is read without locks.
type lruNode[V any] struct {
	key  string
	size int64 // bytes charged against the index limit
	val  V

	// stamp is the value of the index clock when the node was last moved
	// to the front of its shard's list. Within a shard, list order equals
	// stamp order, so the global least recently used entry is the shard
	// tail with the smallest stamp.
	stamp atomic.Uint64

	prev, next *lruNode[V]
	linked     bool
}

// lruShard is one partition of an lru index: a map for lookups and an
// intrusive doubly linked list in recency order.
type lruShard[V any] struct {
	mu   sync.RWMutex
	m    map[string]*lruNode[V]
	root lruNode[V] // sentinel: root.next is the most, root.prev the least recently used

	// Hit and miss counters live next to the lock that the same lookups
	// already write, so counting costs no extra contended cache line.
	hits, misses atomic.Uint64

	_ [64]byte // keep neighbouring shards off each other's cache lines
}

func (s *lruShard[V]) unlink(n *lruNode[V]) {
	n.prev.next = n.next
	n.next.prev = n.prev
	n.prev, n.next = nil, nil
	n.linked = false
}

func (s *lruShard[V]) pushFront(n *lruNode[V]) {
	n.prev = &s.root
	n.next = s.root.next
	n.prev.next = n
	n.next.prev = n
	n.linked = true
}

// lru is a sharded, byte-bounded least-recently-used index.
//
// Lookups take only a shard read lock. Moving an entry to the front needs
// the shard write lock, so it is done lazily: an entry that is already among
// the most recently promoted eighth of the index is not moved again. Hot
// entries are therefore read without any exclusive lock, while the order of
// everything that is a candidate for eviction stays exact. With fewer than
// eight entries the order is exact LRU.
//
// Eviction picks, among the shard tails, the one with the smallest stamp,
// which is the globally least recently used entry.
type lru[V any] struct {
	shards *[numShards]lruShard[V]
	seed   maphash.Seed
	limit  int64 // bytes; < 0 means unlimited

	clock     atomic.Uint64 // logical time, advanced on every insert and promotion
	count     atomic.Int64
	bytes     atomic.Int64
	evictions atomic.Uint64

	evictMu sync.Mutex // serializes evictors so they do not over-evict

	// overhead, if non-nil, is charged against limit on top of the
	// entries' sizes (the disk tier's dead pack records).
	overhead *atomic.Int64

	// release, if non-nil, is called without locks after a node left the
	// index (eviction or remove).
	release func(n *lruNode[V])
	// promoted, if non-nil, is called without locks after a node was
	// moved to the front.
	promoted func(n *lruNode[V])
}

func newLRU[V any](limit int64) *lru[V] {
	c := &lru[V]{
		shards: new([numShards]lruShard[V]),
		seed:   maphash.MakeSeed(),
		limit:  limit,
	}
	for i := range c.shards {
		s := &c.shards[i]
		s.m = make(map[string]*lruNode[V])
		s.root.next = &s.root
		s.root.prev = &s.root
	}
	return c
}

// shardIndex is the index of key's shard.
func (c *lru[V]) shardIndex(key string) int {
	return int(maphash.String(c.seed, key) % numShards)
}

func (c *lru[V]) shard(key string) *lruShard[V] {
	return &c.shards[c.shardIndex(key)]
}

// fits reports whether an entry of size bytes can be held at all.
func (c *lru[V]) fits(size int64) bool {
	return c.limit < 0 || size <= c.limit
}

// get looks key up, counts a hit or a miss and marks the node as used.
func (c *lru[V]) get(key string) (*lruNode[V], bool) {
	s := c.shard(key)
	s.mu.RLock()
	n := s.m[key]
	s.mu.RUnlock()
	if n == nil {
		s.misses.Add(1)
		return nil, false
	}
	s.hits.Add(1)
	c.touch(n)
	return n, true
}

// peek looks key up without counting or marking it as used.
func (c *lru[V]) peek(key string) (*lruNode[V], bool) {
	s := c.shard(key)
	s.mu.RLock()
	n := s.m[key]
	s.mu.RUnlock()
	return n, n != nil
}

// touch marks n as used, moving it to the front of its shard unless it is
// recent enough already (see lru). It is a no-op for removed nodes.
func (c *lru[V]) touch(n *lruNode[V]) {
	if c.clock.Load()-n.stamp.Load() <= uint64(c.count.Load())/8 {
		return
	}
	s := c.shard(n.key)
	s.mu.Lock()
	if !n.linked {
		s.mu.Unlock()
		return
	}
	s.unlink(n)
	s.pushFront(n)
	n.stamp.Store(c.clock.Add(1))
	s.mu.Unlock()
	if c.promoted != nil {
		c.promoted(n)
	}
}

// insert adds n as the most recently used entry unless its key is present,
// in which case the present node is returned and n is not inserted. insert
// does not evict; call shrink afterwards.
func (c *lru[V]) insert(n *lruNode[V]) (existing *lruNode[V]) {
	s := c.shard(n.key)
	s.mu.Lock()
	if e := s.m[n.key]; e != nil {
		s.mu.Unlock()
		return e
	}
	s.m[n.key] = n
	s.pushFront(n)
	n.stamp.Store(c.clock.Add(1))
	c.count.Add(1)
	c.bytes.Add(n.size)
	s.mu.Unlock()
	return nil
}

// removeLocked unlinks n from s; the caller holds s.mu for writing and
// calls c.release(n) after unlocking.
func (c *lru[V]) removeLocked(s *lruShard[V], n *lruNode[V]) {
	s.unlink(n)
	delete(s.m, n.key)
	c.count.Add(-1)
	c.bytes.Add(-n.size)
}

// remove takes n out of the index. It reports false if n was not (or no
// longer) in the index.
func (c *lru[V]) remove(n *lruNode[V]) bool {
	s := c.shard(n.key)
	s.mu.Lock()
	if !n.linked || s.m[n.key] != n {
		s.mu.Unlock()
		return false
	}
	c.removeLocked(s, n)
	s.mu.Unlock()
	if c.release != nil {
		c.release(n)
	}
	return true
}

// charged is the bytes counted against the limit: the entries' sizes plus
// the overhead.
func (c *lru[V]) charged() int64 {
	b := c.bytes.Load()
	if c.overhead != nil {
		b += max(0, c.overhead.Load())
	}
	return b
}

// shrink evicts least recently used entries until the index is within its
// limit.
func (c *lru[V]) shrink() {
	if c.limit < 0 || c.charged() <= c.limit {
		return
	}
	c.evictMu.Lock()
	defer c.evictMu.Unlock()
	for c.charged() > c.limit && c.evictOne() {
	}
}

// replace puts n in old's place (same key) as the most recently used
// entry. It reports false, and leaves the index alone, if old is no longer
// in the index. old is released like a removed node.
func (c *lru[V]) replace(old, n *lruNode[V]) bool {
	s := c.shard(old.key)
	s.mu.Lock()
	if !old.linked || s.m[old.key] != old {
		s.mu.Unlock()
		return false
	}
	s.unlink(old)
	s.m[n.key] = n
	s.pushFront(n)
	n.stamp.Store(c.clock.Add(1))
	c.bytes.Add(n.size - old.size)
	s.mu.Unlock()
	if c.release != nil {
		c.release(old)
	}
	return true
}

// evictOne evicts the globally least recently used entry. The caller holds
// c.evictMu. It reports false if the index is empty.
func (c *lru[V]) evictOne() bool {
	var victim *lruShard[V]
	var oldest uint64
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		if t := s.root.prev; t != &s.root {
			if st := t.stamp.Load(); victim == nil || st < oldest {
				victim, oldest = s, st
			}
		}
		s.mu.RUnlock()
	}
	if victim == nil {
		return false
	}
	victim.mu.Lock()
	// The tail may have been promoted meanwhile; evicting the new tail of
	// the same shard is still a fine approximation and keeps progress.
	t := victim.root.prev
	if t == &victim.root {
		victim.mu.Unlock()
		return true
	}
	c.removeLocked(victim, t)
	victim.mu.Unlock()
	c.evictions.Add(1)
	if c.release != nil {
		c.release(t)
	}
	return true
}

// lruStats is a snapshot of an index's counters.
type lruStats struct {
	hits, misses, evictions uint64
	entries, bytes          int64
}

func (c *lru[V]) stats() lruStats {
	st := lruStats{
		evictions: c.evictions.Load(),
		entries:   c.count.Load(),
		bytes:     c.charged(),
	}
	for i := range c.shards {
		st.hits += c.shards[i].hits.Load()
		st.misses += c.shards[i].misses.Load()
	}
	return st
}
