package cache

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"testing"
)

func addKeys(c *lru[int], from, to int, size int64) {
	for i := from; i < to; i++ {
		if e := c.insert(&lruNode[int]{key: fmt.Sprint(i), size: size, val: i}); e != nil {
			panic("duplicate insert")
		}
	}
}

func TestLRUExactOrderForSmallSets(t *testing.T) {
	c := newLRU[int](-1)
	addKeys(c, 0, 5, 1)
	for _, k := range []string{"2", "0", "4", "2"} {
		if _, ok := c.get(k); !ok {
			t.Fatal(k)
		}
	}
	want := []string{"1", "3", "0", "4", "2"}
	if got := c.keysOldestFirst(); !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v", got, want)
	}
}

// With many entries, hot entries are not moved on every hit, but whatever
// is used is still kept over whatever is not.
func TestLRULazyPromotion(t *testing.T) {
	c := newLRU[int](1000)
	addKeys(c, 0, 1000, 1)
	clock := c.clock.Load()
	// The newest entries are hit without a promotion.
	for i := 990; i < 1000; i++ {
		c.get(fmt.Sprint(i))
	}
	if c.clock.Load() != clock {
		t.Fatalf("recent entries were promoted (clock %d -> %d)", clock, c.clock.Load())
	}
	// Old entries are promoted when used...
	for i := range 500 {
		c.get(fmt.Sprint(i))
	}
	// ... so adding 500 more evicts exactly the 500 unused ones.
	addKeys(c, 1000, 1500, 1)
	c.shrink()
	for i := range 1500 {
		_, ok := c.peek(fmt.Sprint(i))
		if want := i < 500 || i >= 1000; ok != want {
			t.Fatalf("key %d present = %v, want %v", i, ok, want)
		}
	}
	st := c.stats()
	if st.evictions != 500 || st.entries != 1000 || st.bytes != 1000 || st.hits != 510 {
		t.Fatalf("stats %+v", st)
	}
}

func TestLRURemoveAndRelease(t *testing.T) {
	c := newLRU[int](3)
	var released []int
	c.release = func(n *lruNode[int]) { released = append(released, n.val) }
	addKeys(c, 0, 3, 1)
	n, _ := c.peek("1")
	if !c.remove(n) || c.remove(n) {
		t.Fatal("remove should succeed once")
	}
	addKeys(c, 3, 5, 1)
	c.shrink()
	if !slices.Equal(released, []int{1, 0}) {
		t.Fatalf("released %v", released)
	}
	// A removed node is not resurrected by touch.
	c.touch(n)
	if _, ok := c.peek("1"); ok {
		t.Fatal("removed node came back")
	}
	// Inserting a present key returns the present node.
	m, _ := c.peek("4")
	if e := c.insert(&lruNode[int]{key: "4", size: 1}); e != m {
		t.Fatal("duplicate insert")
	}
}

func TestLRUConcurrent(t *testing.T) {
	c := newLRU[int](200)
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := range 5000 {
				k := fmt.Sprint((i * (w + 1)) % 500)
				if n, ok := c.get(k); ok {
					if n.key != k {
						t.Errorf("got %s for %s", n.key, k)
					}
					if i%7 == 0 {
						c.remove(n)
					}
					continue
				}
				c.insert(&lruNode[int]{key: k, size: 1})
				c.shrink()
			}
		})
	}
	wg.Wait()
	var n int64
	for i := range c.shards {
		s := &c.shards[i]
		linked := 0
		for e := s.root.next; e != &s.root; e = e.next {
			if s.m[e.key] != e || c.shard(e.key) != s {
				t.Fatal("list node not in map")
			}
			linked++
		}
		if linked != len(s.m) {
			t.Fatalf("shard %d: %d linked, %d in map", i, linked, len(s.m))
		}
		n += int64(linked)
	}
	if st := c.stats(); st.entries != n || st.bytes != n || n > 200 {
		t.Fatalf("stats %+v, %d linked", st, n)
	}
}

// keysOldestFirst returns the keys in eviction order: least recently used
// first. Order across shards follows the stamps. Used by tests.
func (c *lru[V]) keysOldestFirst() []string {
	type ks struct {
		key   string
		stamp uint64
	}
	var all []ks
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		for n := s.root.prev; n != &s.root; n = n.prev {
			all = append(all, ks{n.key, n.stamp.Load()})
		}
		s.mu.RUnlock()
	}
	slices.SortFunc(all, func(a, b ks) int { return cmp.Compare(a.stamp, b.stamp) })
	keys := make([]string, len(all))
	for i, k := range all {
		keys[i] = k.key
	}
	return keys
}
