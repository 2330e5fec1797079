// Package estargz reads, writes and verifies eStargz layer blobs.
//
// An eStargz blob is an ordinary compressed tar layer (gzip, or zstd for
// zstd:chunked) in which every regular file's payload — and every chunk of a
// large file — starts a new compressed member (gzip) or frame (zstd). The last
// part of the blob is a table of contents (TOC, stargz.index.json) listing
// every entry, the compressed offset where its payload starts and the sha256
// of each chunk's plain bytes, followed by a fixed-size footer that says where
// the TOC is. A reader that knows the TOC can therefore fetch and decompress
// any file, or any chunk of a file, with one ranged read, and verify it
// without touching the rest of the blob. Every other runtime still sees a
// valid tar.gz (or tar.zst) layer.
//
// The package has three parts that mirror each other:
//
//   - Build turns a layer tar (plain, gzip or zstd) into an eStargz blob,
//     compressing members on all cores with output that does not depend on
//     the number of workers.
//   - ParseFooter, ParseTOC and Open find and parse the TOC of a blob
//     (normally with two reads: the tail, then the TOC) into an Index that
//     answers lookups, directory listings, hardlink resolution and "which
//     chunk holds byte N of file F".
//   - DecodeChunk decompresses one chunk from its compressed bytes and
//     verifies it against its chunkDigest; Verify checks a whole blob.
//
// Hostile input is expected: every check that fails returns an *Error whose
// Kind (ErrFormat, ErrTOCTooLarge, ErrDigest, ...) can be tested with
// errors.Is and whose message names the entry and offset involved. Nothing
// in this package panics on input.
//
// The format facts follow the upstream eStargz specification: the 51-byte
// gzip footer (and the 47-byte legacy CRFS footer on read), the zstd:chunked
// skippable-frame TOC and 40-byte footer payload, the landmark files that
// delimit the prioritized (prefetch) region, and the OCI annotations.
package estargz
