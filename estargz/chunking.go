// Chunking: how large each piece of a regular file is. A reader that
// needs a few pages of a large file fetches the chunks holding them, so
// small chunks make partial reads cheap; every chunk also costs a TOC
// entry (about 60 compressed bytes, fetched before the layer can be
// mounted) and a little compression. docs/benchmarks.md ("Chunk size")
// has the measurements behind the default.

package estargz

import (
	"bytes"
	"io"
)

// chunkSizer returns the chunk size for a regular file of size bytes
// whose payload starts with head (at most headLen bytes; fewer when the
// file is shorter).
type chunkSizer func(size int64, head []byte) int64

// headLen is how many leading payload bytes a chunkSizer sees.
const headLen = 4

// The default chunking rule (BuildOptions.ChunkSize 0).
const (
	// PieceChunkSize is the chunk size of files that programs read in
	// scattered pieces: ELF executables and libraries (mapped by the
	// loader, a few pages touched) and zip archives (jar, whl, apk:
	// the central directory, then some members).
	PieceChunkSize = 64 << 10
	// BaseChunkSize is the chunk size of other files.
	BaseChunkSize = 256 << 10
	// MaxChunksPerFile bounds the chunks of one file under the default
	// rule (up to DefaultChunkSize per chunk), which bounds its TOC
	// entries (about 50 compressed bytes each) for huge files.
	MaxChunksPerFile = 1024
)

var (
	elfMagic = []byte("\x7fELF")
	zipMagic = []byte("PK\x03\x04")
)

// defaultChunks is the default rule: PieceChunkSize for ELF files and zip
// archives, BaseChunkSize for the rest, doubled until the file has at most
// MaxChunksPerFile chunks.
func defaultChunks(size int64, head []byte) int64 {
	cs := int64(BaseChunkSize)
	if bytes.HasPrefix(head, elfMagic) || bytes.HasPrefix(head, zipMagic) {
		cs = PieceChunkSize
	}
	for cs*MaxChunksPerFile < size && cs < DefaultChunkSize {
		cs *= 2
	}
	return cs
}

// chunkSizeFor returns the chunk size for a regular file of size bytes
// and a reader of its whole payload (the given one, or one that replays
// the bytes peeked to decide).
func (b *builder) chunkSizeFor(size int64, payload io.Reader) (int64, io.Reader, error) {
	if b.sizer == nil || size <= b.minChunk {
		// One chunk whatever the rule, unless the rule can go below
		// minChunk: sizers never do.
		return b.maxChunk, payload, nil
	}
	head := make([]byte, min(size, headLen))
	if _, err := io.ReadFull(payload, head); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	cs := b.sizer(size, head)
	cs = max(min(cs, b.maxChunk), b.minChunk)
	return cs, io.MultiReader(bytes.NewReader(head), payload), nil
}

// chunking returns the rule Build splits files with and its bounds.
func (o BuildOptions) chunking() (chunkSizer, int64, int64) {
	switch {
	case o.sizer != nil:
		return o.sizer, o.sizerMin, o.sizerMax
	case o.ChunkSize > 0:
		return nil, o.ChunkSize, o.ChunkSize
	}
	return defaultChunks, PieceChunkSize, DefaultChunkSize
}
