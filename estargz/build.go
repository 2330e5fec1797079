package estargz

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"
)

// BuildOptions tune Build.
type BuildOptions struct {
	// Compression selects gzip eStargz (default) or zstd:chunked.
	Compression Compression
	// Level is the compression level: gzip 1-9 (default
	// DefaultGzipLevel), zstd 1-22 (default 3). 0 means the default.
	Level int
	// ChunkSize is the largest piece a regular file is split into
	// (default DefaultChunkSize).
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
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
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
	counted := &countingReader{r: in, progress: opts.Progress}

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

	b := &builder{opts: opts, newCompressor: mk, out: &hashingWriter{w: dst, h: sha256.New()}, diff: sha256.New()}
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
		opts.Progress(counted.n)
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

// segment is the plain bytes of one future member (gzip) or frame (zstd).
type segment struct {
	plain      []byte
	compressed []byte
	// entries begin their payload at this segment's first byte.
	entries []*TOCEntry
	done    chan struct{}
	err     error
	weight  int64 // bytes of the in-flight budget it holds
}

type builder struct {
	opts          BuildOptions
	newCompressor func() (memberCompressor, error)
	out           *hashingWriter
	diff          hash.Hash
	plainSize     int64
	bufs          sync.Pool

	// producer state
	cur    *segment
	pinned bool // cur holds a payload that must not be split
	order  chan *segment
	jobs   chan *segment
	ctx    context.Context

	// inflight bounds the plain bytes of segments cut but not yet
	// written. Bounding bytes rather than segments lets the producer run
	// ahead past many small members while a large one compresses, so
	// every worker stays busy on a realistic mix of file sizes.
	inflight *semaphore.Weighted
	budget   int64
}

// getBuf returns an empty buffer for a segment expected to hold about
// hint bytes: a pooled chunk-sized buffer for payload chunks, a small one
// (grown by append if needed) otherwise.
func (b *builder) getBuf(hint int64) []byte {
	if hint < b.opts.ChunkSize/2 {
		return make([]byte, 0, hint+16<<10)
	}
	if p, ok := b.bufs.Get().(*[]byte); ok {
		return (*p)[:0]
	}
	return make([]byte, 0, b.opts.ChunkSize+64<<10)
}

func (b *builder) putBuf(p []byte) {
	if cap(p) >= int(b.opts.ChunkSize) && cap(p) <= 4*int(b.opts.ChunkSize)+1<<20 {
		b.bufs.Put(&p)
	}
}

// Write appends tar bytes to the current segment. Header-only runs are cut
// into chunk-sized members; a payload in progress never is.
func (b *builder) Write(p []byte) (int, error) {
	if b.cur == nil {
		b.cur = &segment{plain: b.getBuf(int64(len(p)))}
	}
	b.cur.plain = append(b.cur.plain, p...)
	if !b.pinned && int64(len(b.cur.plain)) >= b.opts.ChunkSize {
		if err := b.cut(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// cut sends the current segment to be compressed and starts a new one.
func (b *builder) cut() error {
	s := b.cur
	b.cur = nil
	b.pinned = false
	if s == nil || (len(s.plain) == 0 && len(s.entries) == 0) {
		return nil
	}
	s.done = make(chan struct{})
	s.weight = min(int64(cap(s.plain)), b.budget)
	if err := b.inflight.Acquire(b.ctx, s.weight); err != nil {
		return err
	}
	select {
	case b.order <- s:
	case <-b.ctx.Done():
		return b.ctx.Err()
	}
	select {
	case b.jobs <- s:
	case <-b.ctx.Done():
		return b.ctx.Err()
	}
	return nil
}

// startPayload cuts and pins a new segment whose first byte is the payload
// of ent, size bytes long.
func (b *builder) startPayload(ent *TOCEntry, size int64) error {
	if err := b.cut(); err != nil {
		return err
	}
	b.cur = &segment{plain: b.getBuf(size), entries: []*TOCEntry{ent}}
	b.pinned = true
	return nil
}

func (b *builder) run(ctx context.Context, src entrySource) (*TOC, error) {
	g, ctx := errgroup.WithContext(ctx)
	b.ctx = ctx
	b.order = make(chan *segment, 64*b.opts.Workers)
	b.jobs = make(chan *segment, b.opts.Workers)
	// About what 3*Workers chunk-sized segments hold.
	b.budget = 3 * int64(b.opts.Workers) * (b.opts.ChunkSize + 64<<10)
	b.inflight = semaphore.NewWeighted(b.budget)

	for range b.opts.Workers {
		g.Go(func() error {
			c, err := b.newCompressor()
			if err != nil {
				return err
			}
			for s := range b.jobs {
				s.compressed, s.err = c.compress(s.compressed[:0], s.plain)
				close(s.done)
			}
			return nil
		})
	}
	g.Go(b.writeSegments)

	toc := &TOC{Version: 1}
	g.Go(func() error {
		defer close(b.jobs)
		defer close(b.order)
		err := b.produce(src, toc)
		if err == nil {
			err = b.cut()
		}
		return err
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return toc, nil
}

// writeSegments writes compressed segments in order and assigns offsets.
func (b *builder) writeSegments() error {
	for s := range b.order {
		select {
		case <-s.done:
		case <-b.ctx.Done():
			return b.ctx.Err()
		}
		if s.err != nil {
			return fmt.Errorf("estargz: compressing: %w", s.err)
		}
		for _, e := range s.entries {
			e.Offset = b.out.n
		}
		b.diff.Write(s.plain)
		b.plainSize += int64(len(s.plain))
		if _, err := b.out.Write(s.compressed); err != nil {
			return fmt.Errorf("estargz: writing blob: %w", err)
		}
		b.putBuf(s.plain)
		s.plain, s.compressed = nil, nil
		b.inflight.Release(s.weight)
	}
	return nil
}

func (b *builder) produce(src entrySource, toc *TOC) error {
	tw := tar.NewWriter(b)
	for {
		if err := b.ctx.Err(); err != nil {
			return err
		}
		h, payload, err := src.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if err := b.writeEntry(tw, h, payload, toc); err != nil {
			return err
		}
	}
	if b.opts.Compression == Zstd {
		// zstd:chunked has no TOC tar entry: end the archive here so the
		// decompressed stream is a complete tar.
		return tw.Close()
	}
	// gzip: the TOC entry and the end-of-archive blocks follow in their
	// own member, written by finish.
	return tw.Flush()
}

// writeEntry writes one tar entry and records it in the TOC.
func (b *builder) writeEntry(tw *tar.Writer, h *tar.Header, payload io.Reader, toc *TOC) error {
	name, err := CleanName(h.Name)
	if err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont:
		h.Typeflag = tar.TypeReg // sparse files arrive expanded
	}
	ent := &TOCEntry{
		Name:        name,
		Mode:        h.Mode,
		UID:         h.Uid,
		GID:         h.Gid,
		Uname:       h.Uname,
		Gname:       h.Gname,
		ModTime3339: formatModTime(h.ModTime),
	}
	if name == "" {
		ent.Name = "./"
	}
	for k, v := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if ent.Xattrs == nil {
				ent.Xattrs = make(map[string][]byte)
			}
			ent.Xattrs[x] = []byte(v)
		}
	}
	switch h.Typeflag {
	case tar.TypeReg:
		ent.Type, ent.Size = TypeReg, h.Size
	case tar.TypeDir:
		ent.Type = TypeDir
	case tar.TypeSymlink:
		ent.Type, ent.LinkName = TypeSymlink, h.Linkname
	case tar.TypeLink:
		target, err := CleanName(h.Linkname)
		if err != nil {
			return err
		}
		ent.Type, ent.LinkName = TypeHardlink, target
	case tar.TypeChar, tar.TypeBlock:
		ent.Type = TypeChar
		if h.Typeflag == tar.TypeBlock {
			ent.Type = TypeBlock
		}
		ent.DevMajor, ent.DevMinor = int(h.Devmajor), int(h.Devminor)
	case tar.TypeFifo:
		ent.Type = TypeFifo
	default:
		return fmt.Errorf("estargz: entry %q: unsupported tar type %q", h.Name, h.Typeflag)
	}
	if err := writeHeader(tw, h); err != nil {
		return fmt.Errorf("estargz: entry %q: writing tar header: %w", h.Name, err)
	}
	toc.Entries = append(toc.Entries, ent)
	if ent.Type != TypeReg {
		return nil
	}

	file := sha256.New()
	first := true
	for written := int64(0); written < h.Size; {
		size := min(b.opts.ChunkSize, h.Size-written)
		chunk := ent
		if !first {
			chunk = &TOCEntry{Name: name, Type: TypeChunk}
			toc.Entries = append(toc.Entries, chunk)
		}
		first = false
		chunk.ChunkOffset = written
		if size == b.opts.ChunkSize {
			chunk.ChunkSize = size
		}
		if err := b.startPayload(chunk, size); err != nil {
			return err
		}
		start := len(b.cur.plain)
		if _, err := io.CopyN(tw, payload, size); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("estargz: entry %q: reading payload at %d: %w", h.Name, written, err)
		}
		data := b.cur.plain[start:]
		sum := sha256.Sum256(data)
		chunk.ChunkDigest = digest.NewDigestFromBytes(digest.SHA256, sum[:]).String()
		file.Write(data)
		b.pinned = false
		written += size
	}
	ent.Digest = digest.NewDigest(digest.SHA256, file).String()
	return nil
}

// writeHeader writes h keeping its input format (so PAX sub-second times
// and records survive), falling back to whatever format can hold it.
func writeHeader(tw *tar.Writer, h *tar.Header) error {
	if err := tw.WriteHeader(h); err == nil {
		return nil
	}
	h2 := *h
	h2.Format = tar.FormatPAX
	if err := tw.WriteHeader(&h2); err == nil {
		return nil
	}
	h2.Format = tar.FormatUnknown
	return tw.WriteHeader(&h2)
}

// finish writes the TOC and footer and computes the result.
func (b *builder) finish(toc *TOC) (*BuildResult, error) {
	tocJSON, err := json.MarshalIndent(toc, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("estargz: encoding TOC: %w", err)
	}
	c, err := b.newCompressor()
	if err != nil {
		return nil, err
	}
	tocOff := b.out.n
	ann := map[string]string{TOCDigestAnnotation: digest.FromBytes(tocJSON).String()}
	switch b.opts.Compression {
	case Zstd:
		compressed, err := c.compress(nil, tocJSON)
		if err != nil {
			return nil, fmt.Errorf("estargz: compressing TOC: %w", err)
		}
		if _, err := b.out.Write(skippableFrame(compressed)); err != nil {
			return nil, fmt.Errorf("estargz: writing TOC: %w", err)
		}
		dataOff := tocOff + skippableHeaderSize
		if _, err := b.out.Write(zstdFooter(dataOff, int64(len(compressed)), int64(len(tocJSON)))); err != nil {
			return nil, fmt.Errorf("estargz: writing footer: %w", err)
		}
		ann[ZstdChunkedManifestChecksumAnnotation] = digest.FromBytes(compressed).String()
		ann[ZstdChunkedManifestPositionAnnotation] = fmt.Sprintf("%d:%d:%d:1", dataOff, len(compressed), len(tocJSON))
	default:
		var plain bytes.Buffer
		tw := tar.NewWriter(&plain)
		if err := tw.WriteHeader(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeReg, Size: int64(len(tocJSON)), Format: tar.FormatUSTAR}); err != nil {
			return nil, fmt.Errorf("estargz: TOC tar header: %w", err)
		}
		if _, err := tw.Write(tocJSON); err != nil {
			return nil, fmt.Errorf("estargz: TOC tar entry: %w", err)
		}
		if err := tw.Close(); err != nil {
			return nil, fmt.Errorf("estargz: TOC tar entry: %w", err)
		}
		compressed, err := c.compress(nil, plain.Bytes())
		if err != nil {
			return nil, fmt.Errorf("estargz: compressing TOC: %w", err)
		}
		b.diff.Write(plain.Bytes())
		b.plainSize += int64(plain.Len())
		if _, err := b.out.Write(compressed); err != nil {
			return nil, fmt.Errorf("estargz: writing TOC: %w", err)
		}
		if _, err := b.out.Write(gzipFooter(tocOff)); err != nil {
			return nil, fmt.Errorf("estargz: writing footer: %w", err)
		}
	}
	ann[UncompressedSizeAnnotation] = strconv.FormatInt(b.plainSize, 10)
	return &BuildResult{
		Compression:      b.opts.Compression,
		Digest:           digest.NewDigest(digest.SHA256, b.out.h),
		Size:             b.out.n,
		TOCDigest:        digest.FromBytes(tocJSON),
		DiffID:           digest.NewDigest(digest.SHA256, b.diff),
		UncompressedSize: b.plainSize,
		Entries:          len(toc.Entries),
		Annotations:      ann,
	}, nil
}

// dedupeTOC drops entries that a later entry of the same name replaces (a
// file's chunk entries go with it), and entries below a directory that a
// later non-directory replaces, so the TOC shows what extraction leaves.
func dedupeTOC(entries []*TOCEntry) []*TOCEntry {
	names := make([]string, len(entries))
	isDir := make([]bool, len(entries))
	for i, e := range entries {
		names[i], _ = CleanName(e.Name)
		isDir[i] = e.Type == TypeDir
		if e.Type == TypeChunk {
			names[i] = "" // never a key: follows its reg entry
		}
	}
	keep := survivors(names, isDir, func(i int) bool { return entries[i].Type == TypeChunk })
	out := entries[:0]
	for i, e := range entries {
		if keep[i] {
			out = append(out, e)
		}
	}
	return out
}

// survivors decides which of a sequence of named entries remain after
// later-wins replacement. follower(i) marks entries that belong to the
// entry before them (chunks) and share its fate. A non-directory that
// replaces a directory — declared, or only implied by the names below it —
// removes everything below it, as extraction does.
func survivors(names []string, isDir []bool, follower func(int) bool) []bool {
	keep := make([]bool, len(names))
	alive := make(map[string]int, len(names))
	// kids links every path (alive or only implied) to the paths directly
	// below it, so a replaced subtree is found without scanning all names.
	kids := make(map[string]map[string]struct{})
	link := func(n string) {
		for n != "" {
			i := strings.LastIndexByte(n, '/')
			parent := ""
			if i >= 0 {
				parent = n[:i]
			}
			k := kids[parent]
			if k == nil {
				k = make(map[string]struct{})
				kids[parent] = k
			}
			if _, ok := k[n]; ok {
				return
			}
			k[n] = struct{}{}
			n = parent
		}
	}
	var removeBelow func(string)
	removeBelow = func(n string) {
		for c := range kids[n] {
			if j, ok := alive[c]; ok {
				drop(keep, j, follower)
				delete(alive, c)
			}
			removeBelow(c)
		}
		delete(kids, n)
	}
	owner := -1
	for i, n := range names {
		if follower != nil && follower(i) {
			keep[i] = owner >= 0 && keep[owner]
			continue
		}
		owner = i
		if prev, ok := alive[n]; ok {
			drop(keep, prev, follower)
		}
		if !isDir[i] && n != "" {
			removeBelow(n)
		}
		alive[n] = i
		keep[i] = true
		link(n)
	}
	return keep
}

func drop(keep []bool, i int, follower func(int) bool) {
	keep[i] = false
	if follower == nil {
		return
	}
	for j := i + 1; j < len(keep) && follower(j); j++ {
		keep[j] = false
	}
}

// hashingWriter counts and hashes what passes through.
type hashingWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func (w *hashingWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.h.Write(p[:n])
	w.n += int64(n)
	return n, err
}

// countingReader counts bytes read and reports progress every 4 MiB.
type countingReader struct {
	r        io.Reader
	n        int64
	reported int64
	progress func(int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.progress != nil && c.n-c.reported >= 4<<20 {
		c.reported = c.n
		c.progress(c.n)
	}
	return n, err
}

// ctxReader fails reads once ctx is done, so that copying one large
// payload stops promptly on cancellation.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// spooled input for reordering.
type spooledEntry struct {
	h    *tar.Header
	name string
	off  int64 // payload offset in the spool file
}

type spoolFile struct {
	f       *os.File
	entries []*spooledEntry
}

func (s *spoolFile) Close() error {
	name := s.f.Name()
	err := s.f.Close()
	if rerr := os.Remove(name); err == nil && rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = rerr
	}
	return err
}

// spool copies every payload of the input tar to a temporary file and
// keeps the headers, dropping entries that later ones replace.
func spool(ctx context.Context, r io.Reader, dir string) (*spoolFile, error) {
	f, err := os.CreateTemp(dir, "lazypull-spool-*")
	if err != nil {
		return nil, fmt.Errorf("estargz: creating spool file: %w", err)
	}
	sp := &spoolFile{f: f}
	ok := false
	defer func() {
		if !ok {
			sp.Close()
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	var off int64
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("estargz: reading input tar: %w", err)
		}
		if skipInputEntry(h) {
			continue
		}
		name, err := CleanName(h.Name)
		if err != nil {
			return nil, err
		}
		e := &spooledEntry{h: h, name: name, off: off}
		n, err := io.Copy(w, &ctxReader{ctx: ctx, r: tr})
		if err != nil {
			return nil, fmt.Errorf("estargz: entry %q: spooling payload: %w", h.Name, err)
		}
		off += n
		sp.entries = append(sp.entries, e)
	}
	if err := w.Flush(); err != nil {
		return nil, fmt.Errorf("estargz: writing spool file: %w", err)
	}
	names := make([]string, len(sp.entries))
	isDir := make([]bool, len(sp.entries))
	for i, e := range sp.entries {
		names[i], isDir[i] = e.name, e.h.Typeflag == tar.TypeDir
	}
	keep := survivors(names, isDir, nil)
	kept := sp.entries[:0]
	for i, e := range sp.entries {
		if keep[i] {
			kept = append(kept, e)
		}
	}
	sp.entries = kept
	ok = true
	return sp, nil
}

// order puts prioritized entries first — each after its parent directories
// and, for hardlinks, after its target — then the landmark, then the rest
// in input order. It returns the names that were not found.
func (s *spoolFile) order(prioritized []string) ([]*spooledEntry, []string) {
	byName := make(map[string]*spooledEntry, len(s.entries))
	for _, e := range s.entries {
		byName[e.name] = e
	}
	picked := make(map[*spooledEntry]bool)
	var out []*spooledEntry
	var move func(name string, depth int) bool
	move = func(name string, depth int) bool {
		e, ok := byName[name]
		if !ok || depth > maxHardlinkDepth {
			return false
		}
		if picked[e] {
			return true
		}
		// Parents, outermost first.
		parts := strings.Split(name, "/")
		for i := 1; i < len(parts); i++ {
			if p, ok := byName[strings.Join(parts[:i], "/")]; ok && !picked[p] {
				picked[p] = true
				out = append(out, p)
			}
		}
		if e.h.Typeflag == tar.TypeLink {
			if t, err := CleanName(e.h.Linkname); err == nil {
				move(t, depth+1)
			}
		}
		picked[e] = true
		out = append(out, e)
		return true
	}
	var missing []string
	for _, p := range prioritized {
		name, err := CleanName(p)
		if err != nil || !move(name, 0) {
			missing = append(missing, p)
		}
	}
	landmark := NoPrefetchLandmark
	if len(out) > 0 {
		landmark = PrefetchLandmark
	}
	out = append(out, &spooledEntry{h: landmarkHeader(landmark), name: landmark, off: -1})
	for _, e := range s.entries {
		if !picked[e] {
			out = append(out, e)
		}
	}
	return out, missing
}

type spooledSource struct {
	sp    *spoolFile
	order []*spooledEntry
	i     int
}

func (s *spooledSource) next() (*tar.Header, io.Reader, error) {
	if s.i >= len(s.order) {
		return nil, nil, io.EOF
	}
	e := s.order[s.i]
	s.i++
	if e.off < 0 {
		return e.h, bytes.NewReader([]byte{landmarkContents}), nil
	}
	size := int64(0)
	if e.h.Typeflag == tar.TypeReg || e.h.Typeflag == tar.TypeRegA || e.h.Typeflag == tar.TypeGNUSparse || e.h.Typeflag == tar.TypeCont {
		size = e.h.Size
	}
	return e.h, io.NewSectionReader(s.sp.f, e.off, size), nil
}

// memberCompressor compresses one segment into one member or frame.
type memberCompressor interface {
	compress(dst, src []byte) ([]byte, error)
}

func newCompressorFactory(c Compression, level int) (func() (memberCompressor, error), error) {
	switch c {
	case Gzip:
		if level == 0 {
			level = DefaultGzipLevel
		}
		if level < gzip.BestSpeed || level > gzip.BestCompression {
			return nil, fmt.Errorf("estargz: gzip level %d out of range 1-9", level)
		}
		return func() (memberCompressor, error) {
			zw, err := gzip.NewWriterLevel(io.Discard, level)
			if err != nil {
				return nil, fmt.Errorf("estargz: gzip writer: %w", err)
			}
			return &gzipMember{zw: zw}, nil
		}, nil
	case Zstd:
		if level == 0 {
			level = 3
		}
		if level < 1 || level > 22 {
			return nil, fmt.Errorf("estargz: zstd level %d out of range 1-22", level)
		}
		return func() (memberCompressor, error) {
			enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(level)),
				zstd.WithEncoderConcurrency(1), zstd.WithZeroFrames(true))
			if err != nil {
				return nil, fmt.Errorf("estargz: zstd writer: %w", err)
			}
			return &zstdMember{enc: enc}, nil
		}, nil
	}
	return nil, fmt.Errorf("estargz: unknown compression %v", c)
}

type gzipMember struct {
	zw  *gzip.Writer
	buf bytes.Buffer
}

func (g *gzipMember) compress(dst, src []byte) ([]byte, error) {
	g.buf.Reset()
	g.zw.Reset(&g.buf)
	if _, err := g.zw.Write(src); err != nil {
		return nil, err
	}
	if err := g.zw.Close(); err != nil {
		return nil, err
	}
	return append(dst, g.buf.Bytes()...), nil
}

type zstdMember struct{ enc *zstd.Encoder }

func (z *zstdMember) compress(dst, src []byte) ([]byte, error) {
	return z.enc.EncodeAll(src, dst), nil
}
