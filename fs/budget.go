// One memory budget for every layer a Manager serves: the indexes of
// mounted layers (and of neighbours' TOCs preloaded for them), the TOCs
// being read and parsed, and the buffers of fetched groups being decoded.
// A hostile image can make each of these large; the budget bounds their
// sum, so that many such layers cannot take the daemon down.
//
// Two kinds of charges share it:
//
//   - held: a layer's index, for as long as it is mounted. Indexes may take
//     at most 3/4 of the budget, so that fetches always have room. A mount
//     whose index does not fit fails with errdefs.ErrResourceExhausted
//     (containerd then pulls that layer the ordinary way).
//   - transient: a TOC being read and parsed, a group of chunks being
//     fetched and decoded. They wait for each other; a fetch larger than
//     what is left when nothing else is in flight runs alone. A TOC whose
//     parse could never fit beside the held indexes is refused at once.

package fs

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// DefaultMemoryBudget is the budget of a daemon whose configuration does
// not set one: half the 1 GiB MemoryHigh of the systemd unit, leaving the
// rest to the memory chunk cache, the Go runtime and FUSE buffers.
const DefaultMemoryBudget = 512 << 20

// MemoryBudget bounds the memory the layers of a Manager take for indexes
// and in-flight fetches. A nil *MemoryBudget is unlimited. It is safe for
// concurrent use.
type MemoryBudget struct {
	limit int64

	mu        sync.Mutex
	held      int64         // indexes of mounted (or preloaded) layers
	transient int64         // TOC parses and fetch buffers in flight
	changed   chan struct{} // closed (and replaced) when a charge is released
}

// NewMemoryBudget returns a budget of limit bytes; limit <= 0 means
// unlimited (nil).
func NewMemoryBudget(limit int64) *MemoryBudget {
	if limit <= 0 {
		return nil
	}
	return &MemoryBudget{limit: limit, changed: make(chan struct{})}
}

// Limit returns the budget in bytes (0: unlimited).
func (b *MemoryBudget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit
}

// Used returns the bytes charged for indexes (held) and for TOC parses and
// fetches in flight (transient).
func (b *MemoryBudget) Used() (held, transient int64) {
	if b == nil {
		return 0, 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held, b.transient
}

// heldCap is the most the indexes may hold together.
func (b *MemoryBudget) heldCap() int64 { return b.limit - b.limit/4 }

// notifyLocked wakes the waiters; b.mu is held.
func (b *MemoryBudget) notifyLocked() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// acquire charges n transient bytes, waiting until they fit beside the
// other charges. With clamp, a charge that could never fit beside the held
// indexes is lowered to what is left of the budget (it then runs alone);
// without it, such a charge fails with errdefs.ErrResourceExhausted. It
// returns the bytes charged, to be given to release.
func (b *MemoryBudget) acquire(ctx context.Context, n int64, clamp bool, what string) (int64, error) {
	if b == nil || n <= 0 {
		return 0, nil
	}
	b.mu.Lock()
	for {
		if b.held+n > b.limit {
			if !clamp {
				held := b.held
				b.mu.Unlock()
				return 0, b.exhausted(what, n, held)
			}
			n = max(b.limit-b.held, 1)
		}
		if b.held+b.transient+n <= b.limit || b.transient == 0 {
			b.transient += n
			b.mu.Unlock()
			return n, nil
		}
		ch := b.changed
		b.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, fmt.Errorf("%s: waiting for %d bytes of the memory budget: %w", what, n, ctx.Err())
		}
		b.mu.Lock()
	}
}

// exhausted is the error for a charge of n bytes that cannot fit beside
// the held ones.
func (b *MemoryBudget) exhausted(what string, n, held int64) error {
	return fmt.Errorf("%s needs about %d bytes of memory and the layers mounted hold %d of the %d-byte memory budget: %w",
		what, n, held, b.limit, errdefs.ErrResourceExhausted)
}

// check fails like acquire when n bytes could never fit beside the held
// ones, without charging anything.
func (b *MemoryBudget) check(n int64, what string) error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	held := b.held
	b.mu.Unlock()
	if held+n > b.limit {
		return b.exhausted(what, n, held)
	}
	return nil
}

// release returns n transient bytes.
func (b *MemoryBudget) release(n int64) {
	if b == nil || n <= 0 {
		return
	}
	b.mu.Lock()
	b.transient -= n
	b.notifyLocked()
	b.mu.Unlock()
}

// hold turns a transient charge of from bytes into a held one of n bytes,
// or releases it and fails with errdefs.ErrResourceExhausted when the
// indexes would then take more than their share of the budget.
func (b *MemoryBudget) hold(from, n int64, what string) error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.transient -= from
	b.notifyLocked()
	if b.held+n > b.heldCap() {
		return fmt.Errorf("%s needs about %d bytes of memory for its index; the layers mounted hold %d and indexes may take %d of the %d-byte memory budget: %w",
			what, n, b.held, b.heldCap(), b.limit, errdefs.ErrResourceExhausted)
	}
	b.held += n
	return nil
}

// unhold returns n held bytes.
func (b *MemoryBudget) unhold(n int64) {
	if b == nil || n <= 0 {
		return
	}
	b.mu.Lock()
	b.held -= n
	b.notifyLocked()
	b.mu.Unlock()
}

// Estimates of what a TOC takes, from measurements of estargz.ParseTOC
// (Go 1.26). Parsing a TOC of n entries and J bytes of JSON allocates,
// with the JSON itself, up to about 4 J + 768 n (5.3x J for 400k entries
// with 200-byte names, 11.7x J for 1 Mi entries with 50-byte names): all
// of it is charged, since under a soft memory limit the garbage of a large
// parse can be resident before the collector reclaims it. Its index (raw
// entries dropped) keeps about 336 n + (name bytes).
const (
	parseJSONFactor   = 4
	parsePeakPerEntry = 768
	indexPerEntry     = 336
)

// tocEntries estimates the number of entries in tocJSON: every entry is a
// JSON object, so it has a '{' (braces inside strings only overcount).
func tocEntries(tocJSON []byte) int64 {
	return int64(bytes.Count(tocJSON, []byte{'{'}))
}

// parsePeak is the memory charged while a TOC of the given JSON size and
// estimated entry count is held and parsed.
func parsePeak(jsonSize, entries int64) int64 {
	return parseJSONFactor*jsonSize + parsePeakPerEntry*entries
}

// indexSize is the memory charged for a parsed index while its layer is
// mounted: per entry, the node, its chunks and its names.
func indexSize(ix *estargz.Index) int64 {
	var n int64
	if ix.TOC != nil {
		for _, e := range ix.TOC.Entries {
			n += indexPerEntry + int64(len(e.Name)+len(e.LinkName))
			for k, v := range e.Xattrs {
				n += int64(len(k) + len(v))
			}
		}
		return n
	}
	ix.Walk(func(name string, node *estargz.Node) bool {
		n += indexPerEntry + int64(len(name)+len(node.LinkName))
		return true
	})
	return n
}

// parseCharged parses tocJSON for layer d under the budget: it charges the
// parse's peak (refusing a TOC that could never fit) and, once parsed,
// holds the index's size. It returns the index and the bytes held, to be
// returned with unhold when the layer goes away. already is a transient
// charge the caller made for reading the TOC, released here.
func (m *Manager) parseCharged(ctx context.Context, d digest.Digest, tocJSON []byte, payloadEnd int64, already int64) (*estargz.Index, int64, error) {
	b := m.opts.Budget
	what := fmt.Sprintf("layer %s (a %d-byte TOC)", d, len(tocJSON))
	// The read's charge gives way to the parse's, which covers the JSON.
	b.release(already)
	peak, err := b.acquire(ctx, parsePeak(int64(len(tocJSON)), tocEntries(tocJSON)), false, what)
	if err != nil {
		return nil, 0, err
	}
	ix, err := estargz.ParseTOC(tocJSON, payloadEnd, m.opts.Limits)
	if err != nil {
		b.release(peak)
		return nil, 0, err
	}
	size := indexSize(ix)
	// Mounts need the index only; the raw entries are half of its memory
	// on large layers, and a preloaded index may wait minutes for its mount.
	ix.TOC = nil
	if b == nil {
		return ix, 0, nil
	}
	if err := b.hold(peak, size, what); err != nil {
		return nil, 0, err
	}
	return ix, size, nil
}

// tocReadCharge returns the limits to read the TOC of the blob ra of the
// given size with and the memory to charge for reading it: its compressed
// bytes and twice the size it says it decompresses to (the zstd:chunked
// footer's TOC size, or the ISIZE trailer of the gzip TOC member; the
// decompression buffer grows by doubling), each at most the TOC size
// limit. For gzip, the limits are lowered to the declared
// size, so that a member lying about it is cut off there.
func (m *Manager) tocReadCharge(ra io.ReaderAt, size int64) (limits estargz.Limits, charge int64, f *estargz.Footer) {
	limits = m.opts.Limits
	maxTOC := limits.MaxTOCSize
	if maxTOC <= 0 {
		maxTOC = estargz.DefaultMaxTOCSize
	}
	if m.opts.Budget == nil {
		return limits, 0, nil
	}
	n := min(size, int64(estargz.MaxFooterSize)+4)
	tail := make([]byte, n)
	if _, err := ra.ReadAt(tail, size-n); err != nil {
		return limits, 2 * maxTOC, nil // ReadTOC will fail the same way
	}
	f, err := estargz.ParseFooter(tail, size)
	if err != nil {
		return limits, 2 * maxTOC, nil
	}
	if f.Compression == estargz.Zstd {
		declared := f.TOCSize
		if declared <= 0 || declared > maxTOC {
			declared = maxTOC
		}
		return limits, min(f.TOCCompressedSize, maxTOC) + 2*declared, f
	}
	compressed := min(max(size-f.Size-f.TOCOffset, 0), maxTOC)
	if int64(len(tail)) < f.Size+4 {
		return limits, compressed + 2*maxTOC, f
	}
	isize := int64(binary.LittleEndian.Uint32(tail[int64(len(tail))-f.Size-4:]))
	if isize < maxTOC {
		// The JSON is a file in a tar stream of isize bytes.
		limits.MaxTOCSize = max(isize, compressed, 1)
		return limits, compressed + 2*limits.MaxTOCSize, f
	}
	return limits, compressed + 2*maxTOC, f
}

// prescanThreshold is the read charge above which a TOC is first streamed
// through once, counting its bytes and entries without keeping them, so
// that one whose parse could not fit is refused without ever being held.
const prescanThreshold = 32 << 20

// prescanTOC streams the TOC that footer f describes in blob ra of the
// given size (decompressing it into a small buffer) and fails with
// errdefs.ErrResourceExhausted when parsing it could not fit beside the
// indexes held now. Anything it cannot read is left for ReadTOC to report.
func (m *Manager) prescanTOC(ctx context.Context, ra io.ReaderAt, size int64, f *estargz.Footer, limits estargz.Limits, d digest.Digest) error {
	maxTOC := limits.MaxTOCSize
	if maxTOC <= 0 {
		maxTOC = estargz.DefaultMaxTOCSize
	}
	tocEnd := size - f.Size
	if f.Compression == estargz.Zstd {
		tocEnd = f.TOCOffset + f.TOCCompressedSize
	}
	clen := tocEnd - f.TOCOffset
	if clen <= 0 || clen > maxTOC || tocEnd > size {
		return nil
	}
	what := fmt.Sprintf("layer %s (reading its TOC)", d)
	charged, err := m.opts.Budget.acquire(ctx, clen+1<<20, false, what)
	if err != nil {
		return err
	}
	defer m.opts.Budget.release(charged)
	compressed := make([]byte, clen)
	if _, err := ra.ReadAt(compressed, f.TOCOffset); err != nil {
		return nil
	}
	var r io.Reader
	switch f.Compression {
	case estargz.Zstd:
		zr, err := zstd.NewReader(bytes.NewReader(compressed), zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxMemory(uint64(maxTOC)+1), zstd.WithDecoderMaxWindow(64<<20))
		if err != nil {
			return nil
		}
		defer zr.Close()
		r = zr
	default:
		zr, err := gzip.NewReader(bytes.NewReader(compressed))
		if err != nil {
			return nil
		}
		zr.Multistream(false)
		tr := tar.NewReader(zr)
		if _, err := tr.Next(); err != nil {
			return nil
		}
		r = tr
	}
	r = io.LimitReader(r, maxTOC+1)
	buf := make([]byte, 256<<10)
	var jsonSize, entries int64
	for {
		n, err := r.Read(buf)
		jsonSize += int64(n)
		entries += int64(bytes.Count(buf[:n], []byte{'{'}))
		if err != nil {
			break
		}
	}
	return m.opts.Budget.check(parsePeak(jsonSize, entries), fmt.Sprintf("layer %s (a %d-byte TOC)", d, jsonSize))
}

// checkBlobSize checks the blob size the registry answered with against
// the one the manifest gives (when known).
func checkBlobSize(src LayerSource, registry int64) error {
	if src.Size > 0 && registry != src.Size {
		return fmt.Errorf("layer %s: the registry has %d bytes, the manifest says %d: %w",
			src.Digest, registry, src.Size, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// groupMemory is what fetching a group of chunks spanning blob bytes
// [start, end) holds at most: the compressed range and every chunk
// decoded.
func groupMemory(group []estargz.Chunk, start, end int64) int64 {
	n := end - start
	for _, c := range group {
		n += c.Size
	}
	return n
}
