package estargz

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// OpenOptions tune Open.
type OpenOptions struct {
	// Limits bound the TOC.
	Limits Limits
	// TailSize is how many bytes Open reads from the end of the blob in
	// its first read. When the TOC fits in them, Open needs no second
	// read. The default grows with the blob, as TOCs do: 1/128 of it,
	// at least 256 KiB and at most 4 MiB.
	TailSize int64
	// TOCDigest, when set, is the digest the TOC JSON must have (the
	// layer's toc.digest annotation).
	TOCDigest digest.Digest
}

// DefaultTailSize is Open's smallest default first read.
const DefaultTailSize = 256 << 10

// maxDefaultTailSize bounds the default first read.
const maxDefaultTailSize = 4 << 20

// Reader is an opened eStargz blob.
type Reader struct {
	// Footer is the blob's parsed footer.
	Footer *Footer
	// Index is the validated TOC.
	*Index
	// TOCJSON is the raw TOC, as hashed by TOCDigest.
	TOCJSON []byte

	r       io.ReaderAt
	size    int64
	decoder *Decoder
}

// Open reads the footer and TOC of the blob r of the given size. In the
// common case it makes two reads: the tail, then the TOC (one when the TOC
// lies within the tail).
func Open(r io.ReaderAt, size int64, opts OpenOptions) (*Reader, error) {
	f, tocJSON, err := ReadTOC(r, size, opts)
	if err != nil {
		return nil, err
	}
	ix, err := ParseTOC(tocJSON, f.PayloadEnd, opts.Limits)
	if err != nil {
		return nil, err
	}
	return &Reader{Footer: f, Index: ix, TOCJSON: tocJSON, r: r, size: size, decoder: NewDecoder()}, nil
}

// ReadTOC reads the footer and the TOC JSON of the blob r of the given size
// (checking it against opts.TOCDigest when set) without parsing the TOC:
// Open's first half, for callers that only keep the TOC for later.
func ReadTOC(r io.ReaderAt, size int64, opts OpenOptions) (*Footer, []byte, error) {
	if size < 0 {
		return nil, nil, errorf(ErrFormat, "", -1, "negative blob size %d", size)
	}
	limits := opts.Limits.withDefaults()
	tailSize := opts.TailSize
	if tailSize <= 0 {
		tailSize = min(max(size/128, DefaultTailSize), maxDefaultTailSize)
	}
	tailSize = max(min(tailSize, size), min(MaxFooterSize, size))
	tail := make([]byte, tailSize)
	if _, err := readFull(r, tail, size-tailSize); err != nil {
		return nil, nil, fmt.Errorf("reading the last %d bytes of the blob: %w", tailSize, err)
	}
	f, err := ParseFooter(tail, size)
	if err != nil {
		return nil, nil, err
	}
	tocEnd := size - f.Size
	if f.Compression == Zstd {
		tocEnd = f.TOCOffset + f.TOCCompressedSize
	}
	if tocEnd-f.TOCOffset > limits.MaxTOCSize {
		return nil, nil, errorf(ErrTOCTooLarge, "", f.TOCOffset, "compressed TOC is %d bytes, limit %d", tocEnd-f.TOCOffset, limits.MaxTOCSize)
	}
	var compressed []byte
	if tailStart := size - tailSize; f.TOCOffset >= tailStart {
		compressed = tail[f.TOCOffset-tailStart : tocEnd-tailStart]
	} else {
		compressed = make([]byte, tocEnd-f.TOCOffset)
		if _, err := readFull(r, compressed, f.TOCOffset); err != nil {
			return nil, nil, fmt.Errorf("reading the TOC at offset %d: %w", f.TOCOffset, err)
		}
	}
	tocJSON, err := DecompressTOC(f, compressed, limits)
	if err != nil {
		return nil, nil, err
	}
	if opts.TOCDigest != "" {
		if got := digest.FromBytes(tocJSON); got != opts.TOCDigest {
			return nil, nil, errorf(ErrDigest, "", f.TOCOffset, "TOC digest is %s, the layer says %s", got, opts.TOCDigest)
		}
	}
	return f, tocJSON, nil
}

func readFull(r io.ReaderAt, p []byte, off int64) (int, error) {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// DecompressTOC extracts the TOC JSON from its compressed bytes (the blob
// range [f.TOCOffset, f.TOCOffset+len(compressed))), enforcing limits.
func DecompressTOC(f *Footer, compressed []byte, limits Limits) ([]byte, error) {
	limits = limits.withDefaults()
	switch f.Compression {
	case Zstd:
		if f.TOCSize > limits.MaxTOCSize {
			return nil, errorf(ErrTOCTooLarge, "", f.TOCOffset, "footer says the TOC is %d bytes, limit %d", f.TOCSize, limits.MaxTOCSize)
		}
		zr, err := zstd.NewReader(bytes.NewReader(compressed), zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxMemory(uint64(limits.MaxTOCSize)+1), zstd.WithDecoderMaxWindow(64<<20))
		if err != nil {
			return nil, fmt.Errorf("estargz: zstd decoder: %w", err)
		}
		defer zr.Close()
		out, err := io.ReadAll(io.LimitReader(zr, limits.MaxTOCSize+1))
		if errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded) {
			return nil, wrapErr(ErrTOCTooLarge, "", f.TOCOffset, err, "zstd TOC frame needs more than %d bytes", limits.MaxTOCSize)
		}
		if err != nil {
			return nil, wrapErr(ErrFormat, "", f.TOCOffset, err, "decompressing the zstd TOC")
		}
		if int64(len(out)) > limits.MaxTOCSize {
			return nil, errorf(ErrTOCTooLarge, "", f.TOCOffset, "TOC decompresses to more than %d bytes", limits.MaxTOCSize)
		}
		if f.TOCSize != 0 && int64(len(out)) != f.TOCSize {
			return nil, errorf(ErrFormat, "", f.TOCOffset, "TOC decompresses to %d bytes, footer says %d", len(out), f.TOCSize)
		}
		return out, nil
	default:
		zr, err := gzip.NewReader(bytes.NewReader(compressed))
		if err != nil {
			return nil, wrapErr(ErrFormat, "", f.TOCOffset, err, "TOC member is not gzip")
		}
		zr.Multistream(false)
		tr := tar.NewReader(zr)
		h, err := tr.Next()
		if err != nil {
			return nil, wrapErr(ErrFormat, "", f.TOCOffset, err, "reading the TOC tar header")
		}
		if h.Name != TOCTarName || h.Typeflag != tar.TypeReg {
			return nil, errorf(ErrFormat, h.Name, f.TOCOffset, "TOC member holds %q, want regular file %q", h.Name, TOCTarName)
		}
		if h.Size > limits.MaxTOCSize {
			return nil, errorf(ErrTOCTooLarge, "", f.TOCOffset, "%d bytes, limit %d", h.Size, limits.MaxTOCSize)
		}
		out, err := readExactly(tr, nil, h.Size, 8*int64(len(compressed)))
		if err != nil {
			return nil, wrapErr(ErrFormat, TOCTarName, f.TOCOffset, err, "reading the TOC")
		}
		return out, nil
	}
}

// Decoder decompresses and verifies chunks. It pools decompressors and is
// safe for concurrent use.
type Decoder struct {
	gz   sync.Pool // *gzip.Reader
	zstd sync.Pool // *zstd.Decoder
}

// NewDecoder returns a Decoder.
func NewDecoder() *Decoder { return &Decoder{} }

// maxChunkDecodeWindow bounds the memory a zstd frame can make the decoder
// allocate.
const maxChunkDecodeWindow = 64 << 20

// DecodeChunk decompresses chunk c of a blob with compression comp from
// compressed, the blob bytes [c.Offset, c.End), into buf (grown if needed)
// and verifies the result against c.Digest. It never reads more than the
// chunk's declared size out of the decompressor, so a member that would
// decompress to far more (a decompression bomb) costs nothing; a member that
// decompresses to less is an error.
func (d *Decoder) DecodeChunk(comp Compression, compressed []byte, c Chunk, buf []byte) ([]byte, error) {
	if c.Size < 0 || c.InnerOffset < 0 || c.Size > maxFileSize {
		return nil, errorf(ErrFormat, "", c.Offset, "bad chunk geometry")
	}
	src := bytes.NewReader(compressed)
	var r io.Reader
	switch comp {
	case Zstd:
		zr, _ := d.zstd.Get().(*zstd.Decoder)
		if zr == nil {
			var err error
			zr, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
				zstd.WithDecoderMaxWindow(maxChunkDecodeWindow))
			if err != nil {
				return nil, fmt.Errorf("estargz: zstd decoder: %w", err)
			}
		}
		if err := zr.Reset(src); err != nil {
			return nil, wrapErr(ErrFormat, "", c.Offset, err, "zstd frame")
		}
		defer func() { _ = zr.Reset(nil); d.zstd.Put(zr) }()
		r = zr
	default:
		zr, _ := d.gz.Get().(*gzip.Reader)
		var err error
		if zr == nil {
			zr, err = gzip.NewReader(src)
		} else {
			err = zr.Reset(src)
		}
		if err != nil {
			return nil, wrapErr(ErrFormat, "", c.Offset, err, "gzip member header")
		}
		zr.Multistream(false)
		defer d.gz.Put(zr)
		r = zr
	}
	if c.InnerOffset > 0 {
		if n, err := io.CopyN(io.Discard, r, c.InnerOffset); err != nil {
			return nil, wrapErr(ErrFormat, "", c.Offset, err, "skipping %d of %d inner bytes", n, c.InnerOffset)
		}
	}
	// The size comes from the TOC: trust it only as far as the member
	// actually delivers bytes, so a lie costs no more memory than the
	// truth would.
	buf, err := readExactly(r, buf, c.Size, 8*int64(len(compressed)))
	if err != nil {
		return nil, wrapErr(ErrFormat, "", c.Offset, err, "decompressing %d chunk bytes", c.Size)
	}
	if err := verifyChunk(buf, c.Digest); err != nil {
		return nil, err
	}
	return buf, nil
}

// readExactly reads exactly size bytes from r into buf, reusing buf when
// it is large enough. Otherwise it allocates at most max(hint, 1 MiB)
// bytes up front and grows the buffer only as bytes arrive, so a size that
// r cannot back does not cause a large allocation. Running short is
// io.ErrUnexpectedEOF.
func readExactly(r io.Reader, buf []byte, size, hint int64) ([]byte, error) {
	if int64(cap(buf)) >= size {
		buf = buf[:size]
		if _, err := io.ReadFull(r, buf); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		return buf, nil
	}
	buf = make([]byte, min(size, max(hint, 1<<20)))
	filled := 0
	for {
		n, err := io.ReadFull(r, buf[filled:])
		filled += n
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		if int64(filled) == size {
			return buf, nil
		}
		grown := make([]byte, min(size, 2*int64(len(buf))))
		copy(grown, buf)
		buf = grown
	}
}

func verifyChunk(p []byte, want digest.Digest) error {
	if want.Algorithm() != digest.SHA256 {
		return errorf(ErrDigest, "", -1, "unsupported chunk digest algorithm %q", want.Algorithm())
	}
	sum := sha256.Sum256(p)
	if got := digest.NewDigestFromBytes(digest.SHA256, sum[:]); got != want {
		return errorf(ErrDigest, "", -1, "chunk bytes hash to %s, TOC says %s", got, want)
	}
	return nil
}

// ReadChunk fetches chunk c from the blob, decodes and verifies it.
func (r *Reader) ReadChunk(c Chunk, buf []byte) ([]byte, error) {
	if c.End <= c.Offset || c.End > r.size {
		return nil, errorf(ErrFormat, "", c.Offset, "chunk member [%d,%d) outside the blob", c.Offset, c.End)
	}
	compressed := make([]byte, c.End-c.Offset)
	if _, err := readFull(r.r, compressed, c.Offset); err != nil {
		return nil, fmt.Errorf("reading blob bytes [%d,%d): %w", c.Offset, c.End, err)
	}
	return r.decoder.DecodeChunk(r.Footer.Compression, compressed, c, buf)
}

// OpenFile returns a reader for a regular file's content that fetches,
// decodes and verifies chunks as they are read (no caching).
func (r *Reader) OpenFile(name string) (*io.SectionReader, error) {
	n, ok := r.Lookup(name)
	if !ok {
		return nil, fmt.Errorf("estargz: %q: %w", name, errNotExist)
	}
	if n.Type != TypeReg {
		return nil, fmt.Errorf("estargz: %q is a %s, not a regular file", name, n.Type)
	}
	return io.NewSectionReader(&fileReader{r: r, n: n}, 0, n.Size), nil
}

var errNotExist = errors.New("no such file in layer")

type fileReader struct {
	r *Reader
	n *Node
}

func (f *fileReader) ReadAt(p []byte, off int64) (int, error) {
	total := 0
	for len(p) > 0 {
		i := f.n.ChunkAt(off)
		if i < 0 {
			return total, io.EOF
		}
		c := f.n.Chunks[i]
		data, err := f.r.ReadChunk(c, nil)
		if err != nil {
			if e, ok := err.(*Error); ok && e.Entry == "" {
				e.Entry = f.n.Name
			}
			return total, err
		}
		k := copy(p, data[off-c.FileOffset:])
		p, off, total = p[k:], off+int64(k), total+k
	}
	return total, nil
}

// Verify reads every chunk of every regular file, verifying each against
// its chunkDigest and each file against its whole-file digest.
func (r *Reader) Verify() error {
	var err error
	seen := make(map[*Node]bool)
	r.Walk(func(name string, n *Node) bool {
		if err != nil {
			return false
		}
		if n.Type != TypeReg || seen[n] {
			return true
		}
		seen[n] = true
		h := digest.SHA256.Digester()
		var buf []byte
		for _, c := range n.Chunks {
			buf, err = r.ReadChunk(c, buf)
			if err != nil {
				if e, ok := err.(*Error); ok {
					e.Entry, e.Offset = name, c.FileOffset
				}
				return false
			}
			h.Hash().Write(buf)
		}
		if n.Digest != "" {
			if got := h.Digest(); got != n.Digest {
				err = errorf(ErrDigest, name, -1, "file content hashes to %s, TOC says %s", got, n.Digest)
			}
		}
		return err == nil
	})
	return err
}
