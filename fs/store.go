// The chunk cache as the layer sees it: verified plain bytes keyed by chunk
// digest. Bytes are added only after they pass verification (fetch.go), so
// whatever the Store holds can be served as is.

package fs

import (
	"io"
	"os"

	"github.com/opencontainers/go-digest"
)

// Store is the verified chunk cache, content-addressed by chunk digest.
type Store interface {
	// Add stores verified plain bytes under their digest.
	Add(d digest.Digest, data []byte) error
	// ReadAt reads from a stored chunk; a miss is an error.
	ReadAt(d digest.Digest, p []byte, off int64) (int, error)
	// Has reports whether a chunk is stored.
	Has(d digest.Digest) bool
}

// PassthroughStore is a Store that keeps entries as files it can hand
// out, read-only, for FUSE passthrough.
type PassthroughStore interface {
	Store
	// OpenFile opens an entry's file, or fails on a miss.
	OpenFile(d digest.Digest) (*os.File, error)
	// AddFrom stores size bytes streamed from r under d, verifying them.
	AddFrom(d digest.Digest, size int64, r io.Reader) error
}
