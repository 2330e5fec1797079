// Build: turning a layer tar into an eStargz blob. This file holds the
// entry point and the input side (decompressing the input, passing its
// entries through in order). The rest of the build is spread by concern:
//
//   - members.go: cutting the tar stream into segments, compressing them
//     in parallel and writing them in order (each one member or frame);
//   - compress.go: the gzip and zstd member compressors;
//   - tocwrite.go: recording each entry in the TOC (chunking, digests),
//     then writing the TOC and the footer;
//   - dedupe.go: later-wins replacement, so the TOC shows what extraction
//     leaves;
//   - spool.go and prioritize.go: spooling the input to reorder it, with
//     the prioritized files first.

package estargz

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// BuildOptions tune Build.
type BuildOptions struct {
	// Compression selects gzip eStargz (default) or zstd:chunked.
	Compression Compression
	// Level is the compression level: gzip 1-9 (default
	// DefaultGzipLevel), zstd 1-22 (default 3). 0 means the default.
	Level int
	// ChunkSize, when > 0, is the size of the pieces every regular file
	// is split into (the last one may be shorter). 0 selects the default
	// rule: PieceChunkSize for ELF files and zip archives, BaseChunkSize
	// for other files, larger for files that would have more than
	// MaxChunksPerFile chunks (docs/benchmarks.md has the measurements).
	ChunkSize int64
	// Prioritized lists files in the order a workload reads them at
	// start-up. They are moved to the front of the blob, with their parent
	// directories and hardlink targets, followed by .prefetch.landmark.
	Prioritized []string
	// Workers is the number of compressing goroutines (default
	// GOMAXPROCS). The output does not depend on it.
	Workers int
	// TempDir holds the spooled input when Prioritized is set (default
	// os.TempDir()).
	TempDir string
	// sizer, when set, overrides ChunkSize with a per-file rule whose
	// results are clamped to [sizerMin, sizerMax] (for measurements).
	sizer              chunkSizer
	sizerMin, sizerMax int64
	// Progress, when set, is called from time to time with the number of
	// uncompressed input bytes consumed so far.
	Progress func(inputBytes int64)
}

// DefaultGzipLevel is the gzip level Build uses when none is given. On a
// Debian root file system, level 6 of klauspost/compress is about 4x faster
// than level 9 and its output about 2.5% larger; pass 9 for the smallest
// blobs.
const DefaultGzipLevel = 6

// BuildResult describes a blob written by Build.
type BuildResult struct {
	// Compression of the blob.
	Compression Compression
	// Digest and Size of the blob.
	Digest digest.Digest
	Size   int64
	// TOCDigest is the sha256 of the TOC JSON.
	TOCDigest digest.Digest
	// DiffID is the sha256 of the decompressed blob (the layer's diff_id).
	DiffID digest.Digest
	// UncompressedSize is the length of the decompressed blob.
	UncompressedSize int64
	// Entries is the number of TOC entries.
	Entries int
	// MissingPrioritized lists prioritized names not found in the layer.
	MissingPrioritized []string
	// Annotations are the OCI annotations for the layer descriptor.
	Annotations map[string]string
}

// Build converts the layer tar read from src (plain, gzip or zstd,
// detected by magic bytes) into an eStargz blob written to dst.
//
// Each regular file's payload and each chunk of a large file begins a new
// gzip member or zstd frame; headers of the following entries ride along in
// the current one. Members are compressed in parallel and written in order,
// each with a fresh compressor, so the same input and options always give
// the same bytes. An input that is already eStargz is rebuilt: its TOC and
// landmarks are dropped and made anew. When the input holds the same name
// more than once, the later entry wins, as it does on extraction.
func Build(ctx context.Context, dst io.Writer, src io.Reader, opts BuildOptions) (*BuildResult, error) {
	sizer, minChunk, maxChunk := opts.chunking()
	opts.ChunkSize = maxChunk // sizes the builder's buffers
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	mk, err := newCompressorFactory(opts.Compression, opts.Level)
	if err != nil {
		return nil, err
	}
	in, closeIn, err := decompressedStream(src)
	if err != nil {
		return nil, err
	}
	defer closeIn()
	read := &progressCounter{progress: opts.Progress}
	counted := io.TeeReader(in, read)

	var entries entrySource
	var missing []string
	if len(opts.Prioritized) > 0 {
		sp, err := spool(ctx, counted, opts.TempDir)
		if err != nil {
			return nil, err
		}
		defer sp.Close()
		var order []*spooledEntry
		order, missing = sp.order(opts.Prioritized)
		entries = &spooledSource{sp: sp, order: order}
	} else {
		entries = &streamSource{tr: tar.NewReader(counted)}
	}

	b := &builder{opts: opts, newCompressor: mk, outDigest: digest.SHA256.Digester(), diff: digest.SHA256.Digester(),
		sizer: sizer, minChunk: minChunk, maxChunk: maxChunk}
	b.out = io.MultiWriter(dst, b.outDigest.Hash(), &b.outSize)
	toc, err := b.run(ctx, entries)
	if err != nil {
		return nil, err
	}
	if _, ok := entries.(*streamSource); ok {
		toc.Entries = dedupeTOC(toc.Entries)
	}
	res, err := b.finish(toc)
	if err != nil {
		return nil, err
	}
	res.MissingPrioritized = missing
	if opts.Progress != nil {
		opts.Progress(read.n)
	}
	return res, nil
}

// decompressedStream detects the compression of a layer by its magic bytes.
func decompressedStream(src io.Reader) (io.Reader, func(), error) {
	br := bufio.NewReaderSize(src, 1<<20)
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("estargz: reading layer: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("estargz: layer looks gzip-compressed but is not: %w", err)
		}
		return zr, func() { zr.Close() }, nil
	case bytes.HasPrefix(magic, zstdFrameMagic) || bytes.HasPrefix(magic, skippableFrameMagic):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<30))
		if err != nil {
			return nil, nil, fmt.Errorf("estargz: layer looks zstd-compressed but is not: %w", err)
		}
		return zr, zr.Close, nil
	}
	return br, func() {}, nil
}

// entrySource yields the tar entries to write, in output order.
type entrySource interface {
	// next returns the next header and its payload reader, or io.EOF.
	next() (*tar.Header, io.Reader, error)
}

// streamSource passes entries through in input order.
type streamSource struct {
	tr          *tar.Reader
	landmarkOut bool
}

func (s *streamSource) next() (*tar.Header, io.Reader, error) {
	if !s.landmarkOut {
		s.landmarkOut = true
		return landmarkHeader(NoPrefetchLandmark), bytes.NewReader([]byte{landmarkContents}), nil
	}
	for {
		h, err := s.tr.Next()
		if err != nil {
			if err != io.EOF {
				err = fmt.Errorf("estargz: reading input tar: %w", err)
			}
			return nil, nil, err
		}
		if skipInputEntry(h) {
			continue
		}
		return h, s.tr, nil
	}
}

// skipInputEntry reports entries that are not carried over: an existing
// TOC, existing landmarks and global PAX headers.
func skipInputEntry(h *tar.Header) bool {
	if h.Typeflag == tar.TypeXGlobalHeader {
		return true
	}
	switch cleanLookup(h.Name) {
	case TOCTarName, PrefetchLandmark, NoPrefetchLandmark:
		return true
	}
	return false
}

func landmarkHeader(name string) *tar.Header {
	return &tar.Header{Name: name, Typeflag: tar.TypeReg, Size: 1, Mode: 0o644, Format: tar.FormatUSTAR}
}

// progressCounter counts the input bytes that an io.TeeReader copies to it
// and reports the count every 4 MiB.
type progressCounter struct {
	n        int64
	reported int64
	progress func(int64)
}

func (c *progressCounter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	if c.progress != nil && c.n-c.reported >= 4<<20 {
		c.reported = c.n
		c.progress(c.n)
	}
	return len(p), nil
}
