package cache_test

import (
	"errors"
	"fmt"
	"os"

	"github.com/lazypull/lazypull/cache"
	"github.com/opencontainers/go-digest"
)

func Example() {
	dir, _ := os.MkdirTemp("", "lazypull-cache-example")
	defer os.RemoveAll(dir)

	s, err := cache.Open(cache.Options{Dir: dir, MaxDiskBytes: 1 << 30})
	if err != nil {
		panic(err)
	}
	// The fs reader has fetched, decompressed and verified a chunk.
	chunk := []byte("#!/bin/sh\necho hello\n")
	d := digest.FromBytes(chunk)
	if err := s.Add(d, chunk); err != nil {
		fmt.Println("not persisted:", err) // still served from memory
	}

	p := make([]byte, 4)
	n, err := s.ReadAt(d, p, 10)
	fmt.Printf("%q %v\n", p[:n], err)

	_, err = s.ReadAt(digest.FromString("never added"), p, 0)
	fmt.Println(errors.Is(err, cache.ErrNotFound))
	s.Close()

	// After a restart the entry is still there; it is hashed once on its
	// first read.
	s, _ = cache.Open(cache.Options{Dir: dir})
	defer s.Close()
	whole, _ := s.Get(d)
	fmt.Printf("%q %d verified\n", whole, s.Stats().Verified)
	// Output:
	// "echo" <nil>
	// true
	// "#!/bin/sh\necho hello\n" 1 verified
}
