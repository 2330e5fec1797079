package fs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
)

// LayerSource identifies a layer to mount.
type LayerSource struct {
	// Ref is an image reference in the layer's repository (the tag or
	// digest part is not used for the blob).
	Ref string
	// Digest is the layer blob's digest.
	Digest digest.Digest
	// Size is the blob's size, or 0 if unknown (asked from the registry).
	Size int64
	// TOCDigest is the layer's toc.digest annotation. Empty means the TOC
	// cannot be verified: refused unless ManagerOptions.AllowUnverified.
	TOCDigest digest.Digest
}

// ManagerOptions configure a Manager.
type ManagerOptions struct {
	// Root holds per-layer metadata (the TOC and the footer), so layers
	// can be mounted again after a restart without the registry.
	Root string
	// Registry opens blobs (a *remote.Registry, or anything that can open
	// a blob for ranged reads). It may be nil when every layer mounted is
	// fully described by metadata under Root and cached.
	Registry BlobOpener
	// Store is the chunk cache shared by all layers.
	Store Store
	// Layer, Mount and Fetch tune each layer.
	Layer LayerOptions
	Mount MountOptions
	Fetch FetchOptions
	// AllowUnverified mounts layers that have no TOC digest to verify
	// against.
	AllowUnverified bool
	// Limits bound TOCs.
	Limits estargz.Limits
	// Budget bounds the memory of the indexes of all layers mounted and
	// of the TOC parses and fetches in flight (see MemoryBudget). Nil:
	// unbounded (each TOC is bounded by Limits only).
	Budget *MemoryBudget
	// Recorder, when set, learns the first read of each file of every
	// layer mounted, with the image reference the layer was mounted for.
	Recorder ImageRecorder
}

// ImageRecorder learns what a workload reads, per image (see Recorder).
// While one is set, layers are mounted without passthrough, so that every
// read reaches the daemon.
type ImageRecorder interface {
	FirstRead(ref string, layer digest.Digest, name string)
	ChunkRead(ref string, layer digest.Digest, c estargz.Chunk)
}

// refRecorder adapts an ImageRecorder to one layer's Recorder.
type refRecorder struct {
	ref string
	r   ImageRecorder
}

func (r refRecorder) FirstRead(layer digest.Digest, name string) { r.r.FirstRead(r.ref, layer, name) }

func (r refRecorder) ChunkRead(layer digest.Digest, c estargz.Chunk) {
	r.r.ChunkRead(r.ref, layer, c)
}

// Manager mounts and unmounts layers, keeping their metadata under Root.
type Manager struct {
	opts ManagerOptions

	mu        sync.Mutex
	mounts    map[string]*Mount // by mountpoint
	preparing map[digest.Digest]*preparation
}

// NewManager returns a Manager.
func NewManager(opts ManagerOptions) (*Manager, error) {
	if opts.Store == nil {
		return nil, errors.New("fs: manager needs a chunk store")
	}
	if opts.Layer.Scheduler == nil {
		opts.Layer.Scheduler = NewScheduler(DefaultMaxBackground)
	}
	if opts.Layer.Budget == nil {
		opts.Layer.Budget = opts.Budget
	}
	if err := os.MkdirAll(filepath.Join(opts.Root, "layers"), 0o700); err != nil {
		return nil, fmt.Errorf("fs: creating metadata dir: %w", err)
	}
	return &Manager{opts: opts, mounts: map[string]*Mount{}, preparing: map[digest.Digest]*preparation{}}, nil
}

// layerMeta is what Root keeps about a layer.
type layerMeta struct {
	Ref         string        `json:"ref"`
	Digest      digest.Digest `json:"digest"`
	Size        int64         `json:"size"`
	Compression string        `json:"compression"`
	TOCDigest   digest.Digest `json:"tocDigest"`
	PayloadEnd  int64         `json:"payloadEnd"`
}

func (m *Manager) metaDir(d digest.Digest) string {
	return filepath.Join(m.opts.Root, "layers", d.Algorithm().String()+"-"+d.Encoded())
}

// OpenLayer returns the Layer for src: from metadata under Root when it is
// there (no network), else by reading the blob's footer and TOC from the
// registry, verifying the TOC and saving it. Its index must fit the
// memory budget, but stays charged to it only while the layer is mounted
// by Mount.
func (m *Manager) OpenLayer(ctx context.Context, src LayerSource) (*Layer, error) {
	l, held, err := m.openLayer(ctx, src)
	m.opts.Budget.unhold(held)
	return l, err
}

// openLayer is OpenLayer, returning also the bytes of the budget the
// layer's index holds (to be returned with unhold).
func (m *Manager) openLayer(ctx context.Context, src LayerSource) (_ *Layer, held int64, _ error) {
	if err := src.Digest.Validate(); err != nil {
		return nil, 0, fmt.Errorf("layer digest %q: %w: %w", src.Digest, errdefs.ErrInvalidArgument, err)
	}
	if src.TOCDigest == "" && !m.opts.AllowUnverified {
		return nil, 0, fmt.Errorf("layer %s has no %s annotation, so its TOC cannot be verified (set allow_unverified to mount it anyway): %w",
			src.Digest, estargz.TOCDigestAnnotation, errdefs.ErrFailedPrecondition)
	}
	var ix *estargz.Index
	var meta *layerMeta
	var blob RangeReader
	var err error
	m.mu.Lock()
	_, preloaded := m.preparing[src.Digest]
	m.mu.Unlock()
	if preloaded {
		// A neighbour's mount has fetched (or is fetching) and indexed
		// this TOC already: take that index rather than parse it again.
		ix, meta, blob, held, err = m.prepared(ctx, src)
	} else if ix, meta, held, err = m.loadMeta(ctx, src); err != nil {
		if errors.Is(err, errdefs.ErrResourceExhausted) {
			// The saved TOC is the layer's: fetching it again would not
			// make it smaller.
			return nil, 0, err
		}
		log.G(ctx).WithError(err).WithField("layer", src.Digest).Debug("no usable saved metadata; reading the TOC from the registry")
		ix, meta, blob, held, err = m.prepared(ctx, src)
	}
	if err != nil {
		return nil, 0, err
	}
	// Saved or preloaded without the manifest's size: check it now.
	if err := checkBlobSize(src, meta.Size); err != nil {
		m.opts.Budget.unhold(held)
		return nil, 0, err
	}
	// The layer needs the index only; the raw TOC entries are half of
	// its memory on large layers.
	ix.TOC = nil
	comp := estargz.Gzip
	if meta.Compression == estargz.Zstd.String() {
		comp = estargz.Zstd
	}
	ref := src.Ref
	if ref == "" {
		ref = meta.Ref
	}
	desc := ocispec.Descriptor{Digest: src.Digest, Size: meta.Size}
	open := func(ctx context.Context) (Blob, error) {
		if blob != nil {
			// Opened when the TOC was read: no second round trip.
			return blob, nil
		}
		if m.opts.Registry == nil {
			return nil, fmt.Errorf("no registry configured: %w", errdefs.ErrUnavailable)
		}
		return m.opts.Registry.OpenRangeReader(ctx, ref, desc)
	}
	lo := m.opts.Layer
	if m.opts.Recorder != nil {
		lo.Recorder = refRecorder{ref: ref, r: m.opts.Recorder}
	}
	return NewLayer(src.Digest, ix, comp, open, m.opts.Store, lo), held, nil
}

func (m *Manager) loadMeta(ctx context.Context, src LayerSource) (*estargz.Index, *layerMeta, int64, error) {
	dir := m.metaDir(src.Digest)
	b, err := os.ReadFile(filepath.Join(dir, "layer.json"))
	if err != nil {
		return nil, nil, 0, err
	}
	var meta layerMeta
	if err := json.Unmarshal(b, &meta); err != nil {
		return nil, nil, 0, fmt.Errorf("parsing %s: %w", filepath.Join(dir, "layer.json"), err)
	}
	// The saved TOC is trusted only if it hashes to the digest the caller
	// expects now (it may have been saved unverified by Preload).
	if meta.Digest != src.Digest || (src.TOCDigest != "" && meta.TOCDigest != src.TOCDigest) {
		return nil, nil, 0, fmt.Errorf("saved metadata in %s is for another layer or TOC", dir)
	}
	if src.TOCDigest == "" && !m.opts.AllowUnverified {
		return nil, nil, 0, fmt.Errorf("saved metadata in %s cannot be verified", dir)
	}
	tocFile := filepath.Join(dir, "toc.json")
	fi, err := os.Stat(tocFile)
	if err != nil {
		return nil, nil, 0, err
	}
	// Reading it holds its bytes: charge them first (a saved TOC is
	// bounded by the limits it was saved under, which may be looser).
	what := fmt.Sprintf("layer %s (a %d-byte saved TOC)", src.Digest, fi.Size())
	reading, err := m.opts.Budget.acquire(ctx, fi.Size(), false, what)
	if err != nil {
		return nil, nil, 0, err
	}
	tocJSON, err := os.ReadFile(tocFile)
	if err != nil {
		m.opts.Budget.release(reading)
		return nil, nil, 0, err
	}
	if digest.FromBytes(tocJSON) != meta.TOCDigest {
		m.opts.Budget.release(reading)
		return nil, nil, 0, fmt.Errorf("saved TOC in %s is corrupt", dir)
	}
	ix, held, err := m.parseCharged(ctx, src.Digest, tocJSON, meta.PayloadEnd, reading)
	if err != nil {
		return nil, nil, 0, err
	}
	return ix, &meta, held, nil
}

// TailOpener is a BlobOpener that can open a blob with one request that
// also returns its last n bytes (a suffix-range GET), so that the size,
// the footer and usually the TOC of a layer arrive in one round trip.
// *remote.Registry satisfies it.
type TailOpener interface {
	OpenRangeReaderTail(ctx context.Context, ref string, desc ocispec.Descriptor, n int64) (RangeReader, []byte, error)
}

// Bounds of the tail read that opens a layer: sized like the TOC, which
// grows with the blob (1/128 of it), so that one read usually holds it.
const (
	minOpenTail = 256 << 10
	maxOpenTail = 4 << 20
)

// openTailSize is how many bytes at the end of a blob of the given size
// (0: unknown) the first request of a layer asks for.
func openTailSize(size int64) int64 {
	return min(max(size/128, minOpenTail), maxOpenTail)
}

// tailReaderAt serves reads within the blob's already fetched tail from
// memory and the others from the blob.
type tailReaderAt struct {
	readerAt
	tail []byte
	off  int64 // offset of tail in the blob
}

func (t tailReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= t.off && off+int64(len(p)) <= t.off+int64(len(t.tail)) {
		return copy(p, t.tail[off-t.off:]), nil
	}
	return t.readerAt.ReadAt(p, off)
}

// openForTOC opens src's blob, with its tail when the registry can send
// both in one request.
func (m *Manager) openForTOC(ctx context.Context, src LayerSource) (RangeReader, io.ReaderAt, int64, error) {
	desc := ocispec.Descriptor{Digest: src.Digest, Size: src.Size}
	if to, ok := m.opts.Registry.(TailOpener); ok {
		blob, tail, err := to.OpenRangeReaderTail(ctx, src.Ref, desc, openTailSize(src.Size))
		if err != nil {
			return nil, nil, 0, err
		}
		if n := int64(len(tail)); n > 0 && n <= blob.Size() {
			return blob, tailReaderAt{readerAt{ctx, blob}, tail, blob.Size() - n}, n, nil
		}
		return blob, readerAt{ctx, blob}, 0, nil
	}
	blob, err := m.opts.Registry.OpenRangeReader(ctx, src.Ref, desc)
	if err != nil {
		return nil, nil, 0, err
	}
	return blob, readerAt{ctx, blob}, 0, nil
}

// fetchMeta reads src's footer and TOC from the registry, parses it under
// the memory budget and saves it. It returns the index, the metadata, the
// blob opened for it and the bytes of the budget the index holds.
func (m *Manager) fetchMeta(ctx context.Context, src LayerSource) (*estargz.Index, *layerMeta, RangeReader, int64, error) {
	if m.opts.Registry == nil {
		return nil, nil, nil, 0, fmt.Errorf("layer %s: no saved metadata and no registry: %w", src.Digest, errdefs.ErrUnavailable)
	}
	t0 := time.Now()
	blob, ra, tailSize, err := m.openForTOC(ctx, src)
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("layer %s: %w", src.Digest, err)
	}
	if err := checkBlobSize(src, blob.Size()); err != nil {
		return nil, nil, nil, 0, err
	}
	// Charge the compressed and the decompressed TOC before reading them.
	limits, charge, footer := m.tocReadCharge(ra, blob.Size())
	if footer != nil && charge > prescanThreshold {
		if err := m.prescanTOC(ctx, ra, blob.Size(), footer, limits, src.Digest); err != nil {
			return nil, nil, nil, 0, err
		}
	}
	reading, err := m.opts.Budget.acquire(ctx, charge, false, fmt.Sprintf("layer %s (reading its TOC)", src.Digest))
	if err != nil {
		return nil, nil, nil, 0, err
	}
	f, tocJSON, err := estargz.ReadTOC(ra, blob.Size(), estargz.OpenOptions{TOCDigest: src.TOCDigest, Limits: limits, TailSize: tailSize})
	if err != nil {
		m.opts.Budget.release(reading)
	}
	if errors.Is(err, estargz.ErrDigest) {
		return nil, nil, nil, 0, fmt.Errorf("layer %s: TOC %w: %w", src.Digest, ErrVerify, err)
	}
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("layer %s: %w", src.Digest, err)
	}
	t1 := time.Now()
	// Validate before saving: a TOC that does not parse is not kept.
	ix, held, err := m.parseCharged(ctx, src.Digest, tocJSON, f.PayloadEnd, reading)
	if err != nil {
		if errors.Is(err, errdefs.ErrResourceExhausted) {
			return nil, nil, nil, 0, err // names the layer already
		}
		return nil, nil, nil, 0, fmt.Errorf("layer %s: %w", src.Digest, err)
	}
	log.G(ctx).WithFields(log.Fields{
		"layer": src.Digest, "tocBytes": len(tocJSON), "fetch": t1.Sub(t0), "parse": time.Since(t1),
	}).Debug("TOC read")
	meta := &layerMeta{
		Ref: src.Ref, Digest: src.Digest, Size: blob.Size(),
		Compression: f.Compression.String(), TOCDigest: digest.FromBytes(tocJSON),
		PayloadEnd: f.PayloadEnd,
	}
	if err := m.saveMeta(meta, tocJSON); err != nil {
		log.G(ctx).WithError(err).WithField("layer", src.Digest).Warn("saving layer metadata failed; the layer will need the registry after a restart")
	}
	return ix, meta, blob, held, nil
}

func (m *Manager) saveMeta(meta *layerMeta, tocJSON []byte) error {
	dir := m.metaDir(meta.Digest)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(dir, "toc.json"), tocJSON); err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, "layer.json"), b)
}

func writeFileAtomic(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	// No fsync: a file torn by a crash fails its digest check when it is
	// loaded, and the TOC is fetched again.
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), name)
}

// Preload reads and saves a layer's TOC without mounting it, so that a
// later Mount finds it locally. The TOC is not verified here (src may lack
// a TOC digest); Mount verifies the saved TOC against the digest it is
// given.
func (m *Manager) Preload(ctx context.Context, src LayerSource) error {
	if _, err := os.Stat(filepath.Join(m.metaDir(src.Digest), "layer.json")); err == nil {
		return nil
	}
	p := m.prepare(ctx, src)
	<-p.done
	return p.err
}

// preparation is a layer's TOC being fetched and indexed ahead of its
// mount (Preload), or for it. A Mount that finds one waits for it instead
// of fetching the TOC again, and takes its index.
type preparation struct {
	done chan struct{}
	ix   *estargz.Index
	meta *layerMeta
	blob RangeReader // opened to read the TOC, for the layer's reads
	err  error
	// held is the budget the index holds until a mount claims it (then
	// it is the mount's) or the preparation expires (then it is returned).
	// Guarded by Manager.mu.
	held    int64
	claimed bool
}

// preparedTTL is how long a preloaded index waits for its Mount.
const preparedTTL = 2 * time.Minute

// prepare starts (or joins) the fetch and indexing of src's TOC.
func (m *Manager) prepare(ctx context.Context, src LayerSource) *preparation {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.preparing[src.Digest]; ok {
		return p
	}
	p := &preparation{done: make(chan struct{})}
	m.preparing[src.Digest] = p
	go func() {
		// The TOC is not verified here (a neighbour's digest is not
		// known yet): prepared() checks it against the mount's.
		ix, meta, blob, held, err := m.fetchMeta(context.WithoutCancel(ctx), LayerSource{Ref: src.Ref, Digest: src.Digest, Size: src.Size})
		m.mu.Lock()
		p.ix, p.meta, p.blob, p.held, p.err = ix, meta, blob, held, err
		m.mu.Unlock()
		close(p.done)
		time.AfterFunc(preparedTTL, func() { m.dropPrepared(src.Digest, p) })
	}()
	return p
}

func (m *Manager) dropPrepared(d digest.Digest, p *preparation) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.preparing[d] == p {
		delete(m.preparing, d)
	}
	if !p.claimed {
		// Expired without a mount: its index is garbage now.
		p.claimed = true
		m.opts.Budget.unhold(p.held)
	}
}

// prepared returns src's index from a preparation, started now if none
// is in flight, after checking the TOC against src.TOCDigest, and the
// bytes of the budget the index holds for the caller (0 when another
// mount took the same index first: it is charged once).
func (m *Manager) prepared(ctx context.Context, src LayerSource) (*estargz.Index, *layerMeta, RangeReader, int64, error) {
	p := m.prepare(ctx, src)
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, nil, nil, 0, ctx.Err()
	}
	m.mu.Lock()
	if m.preparing[src.Digest] == p {
		delete(m.preparing, src.Digest)
	}
	var held int64
	if !p.claimed {
		p.claimed, held = true, p.held
	}
	m.mu.Unlock()
	if p.err != nil {
		return nil, nil, nil, 0, p.err
	}
	if src.TOCDigest != "" && p.meta.TOCDigest != src.TOCDigest {
		m.opts.Budget.unhold(held)
		return nil, nil, nil, 0, fmt.Errorf("layer %s: TOC %w: %w", src.Digest, ErrVerify,
			&estargz.Error{Kind: estargz.ErrDigest, Offset: -1, Msg: fmt.Sprintf("TOC digest is %s, the layer says %s", p.meta.TOCDigest, src.TOCDigest)})
	}
	return p.ix, p.meta, p.blob, held, nil
}

// Mount opens the layer and mounts it at mountpoint, then starts prefetch
// and background fetching as configured.
func (m *Manager) Mount(ctx context.Context, mountpoint string, src LayerSource) (*Mount, error) {
	l, held, err := m.openLayer(ctx, src)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(mountpoint, 0o755); err != nil {
		m.opts.Budget.unhold(held)
		return nil, fmt.Errorf("creating mountpoint: %w", err)
	}
	mo := m.opts.Mount
	if m.opts.Recorder != nil {
		mo.Passthrough = false // the recorder must see every read
	}
	if mo.FsName == "" {
		mo.FsName = "lazypull:" + src.Digest.Encoded()[:12]
	}
	mnt, err := MountLayer(mountpoint, l, mo)
	if err != nil {
		m.opts.Budget.unhold(held)
		return nil, err
	}
	mnt.release = func() { m.opts.Budget.unhold(held) }
	m.mu.Lock()
	m.mounts[mountpoint] = mnt
	m.mu.Unlock()
	l.StartFetching(context.WithoutCancel(ctx), m.opts.Fetch)
	return mnt, nil
}

// Lookup returns the mount at mountpoint.
func (m *Manager) Lookup(mountpoint string) (*Mount, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	mnt, ok := m.mounts[mountpoint]
	return mnt, ok
}

// LayerSize returns the uncompressed size of the layer mounted at
// mountpoint as its TOC describes it: the size of the layer's tar stream
// (a 512-byte header per entry, file contents padded to 512 bytes, the
// two closing blocks; eStargz landmarks left out), which is what unpacking
// it would have taken. ok is
// false when nothing is mounted there.
func (m *Manager) LayerSize(mountpoint string) (size int64, ok bool) {
	mnt, ok := m.Lookup(mountpoint)
	if !ok || mnt.Layer() == nil || mnt.Layer().Index() == nil {
		return 0, false
	}
	seen := map[*estargz.Node]bool{}
	mnt.Layer().Index().Walk(func(name string, n *estargz.Node) bool {
		if name == "" || name == estargz.PrefetchLandmark || name == estargz.NoPrefetchLandmark {
			return true // the root has no entry; landmarks are the converter's
		}
		size += 512
		if n.Type == estargz.TypeReg && !seen[n] {
			seen[n] = true // further names are hardlinks: header only
			size += (n.Size + 511) &^ 511
		}
		return true
	})
	return size + 1024, true
}

// Unmount unmounts the layer at mountpoint.
func (m *Manager) Unmount(ctx context.Context, mountpoint string) error {
	m.mu.Lock()
	mnt, ok := m.mounts[mountpoint]
	delete(m.mounts, mountpoint)
	m.mu.Unlock()
	if !ok {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, errdefs.ErrNotFound)
	}
	return mnt.Unmount()
}

// Mounts returns every mounted layer.
func (m *Manager) Mounts() []*Mount {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*Mount, 0, len(m.mounts))
	for _, mnt := range m.mounts {
		out = append(out, mnt)
	}
	return out
}

// Close unmounts everything.
func (m *Manager) Close() error {
	var errs []error
	for _, mnt := range m.Mounts() {
		if err := m.Unmount(context.Background(), mnt.Dir()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// OpenLocalLayer opens a local eStargz blob file as a Layer. Its TOC is
// trusted (it is the caller's own file); chunks are still verified.
func OpenLocalLayer(path string, store Store, opts LayerOptions) (*Layer, func() error, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	r, err := estargz.Open(f, fi.Size(), estargz.OpenOptions{})
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	d, err := digest.FromReader(io.NewSectionReader(f, 0, fi.Size()))
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("hashing %s: %w", path, err)
	}
	open := func(context.Context) (Blob, error) { return fileBlob{f}, nil }
	return NewLayer(d, r.Index, r.Footer.Compression, open, store, opts), f.Close, nil
}
