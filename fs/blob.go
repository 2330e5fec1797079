// Blobs: where a layer's compressed bytes come from.
//
// A Layer reads its blob only through the small Blob interface (ranged
// reads), and opens it only when a chunk is first missing from the cache, so
// that a layer whose TOC and chunks are cached mounts without the registry.

package fs

import (
	"context"
)

// Blob reads the compressed bytes of a layer blob.
type Blob interface {
	// ReadAt reads len(p) bytes at off, or fails.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// BlobOpener opens a layer's blob when it is first needed, so that a layer
// whose TOC and chunks are cached can be mounted without the registry.
type BlobOpener func(ctx context.Context) (Blob, error)
