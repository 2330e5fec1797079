// Blobs: where a layer's compressed bytes come from.
//
// A Layer reads its blob only through the small Blob interface (ranged
// reads), and opens it only when a chunk is first missing from the cache
// (OpenFunc), so that a layer whose TOC and chunks are cached mounts without
// the registry. A Manager opens blobs through a BlobOpener: all it needs
// from a registry client. *remote.Registry is one, without this package
// importing it: the method's result type is an interface type literal
// (RangeReader), which package remote declares identically.

package fs

import (
	"context"
	"io"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Blob reads the compressed bytes of a layer blob.
type Blob interface {
	// ReadAt reads len(p) bytes at off, or fails.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// RangeReader is a Blob of known size, as a registry serves it. It is an
// alias of an interface type literal so that a registry client can return
// the identical type (remote.RangeReader) without importing this package.
type RangeReader = interface {
	// ReadAt reads len(p) bytes at off; fewer only at the end of the
	// blob, with io.EOF.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	// Size is the blob's size in bytes.
	Size() int64
}

// BlobOpener is what a Manager needs from a registry: opening a layer blob
// for ranged reads. *remote.Registry satisfies it.
type BlobOpener interface {
	// OpenRangeReader opens the blob desc describes (desc.Size 0: ask the
	// registry) in the repository ref names.
	OpenRangeReader(ctx context.Context, ref string, desc ocispec.Descriptor) (RangeReader, error)
}

// OpenFunc opens a layer's blob when it is first needed, so that a layer
// whose TOC and chunks are cached can be mounted without the registry.
type OpenFunc func(ctx context.Context) (Blob, error)

// readerAt adapts a Blob to io.ReaderAt, with ctx for every read (for
// estargz, which takes an io.ReaderAt).
type readerAt struct {
	ctx context.Context
	b   Blob
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) { return r.b.ReadAt(r.ctx, p, off) }

var _ io.ReaderAt = readerAt{}

// fileBlob serves a local blob file, for mounting a blob without a
// registry.
type fileBlob struct{ r io.ReaderAt }

func (f fileBlob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return f.r.ReadAt(p, off)
}
