package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/remote"
)

// Verification policies (the [verify] policy key).
const (
	// VerifyBackground proves every lazily served layer equal to the
	// layer its image commits to, in the background after it is mounted,
	// and fails it closed on a difference.
	VerifyBackground = "background"
	// VerifyOff serves layers on their TOC and chunk digests alone. Unsafe
	// on a node shared by images of several owners: see docs/architecture.md.
	VerifyOff = "off"
)

// verifyState is what is saved of a layer's verification, so that a
// restart neither verifies a layer again nor serves a failed one.
type verifyState struct {
	Layer   digest.Digest `json:"layer"`
	ChainID string        `json:"chain_id,omitempty"`
	Result  string        `json:"result"` // "verified" or "failed"
	DiffID  digest.Digest `json:"diff_id,omitempty"`
	Error   string        `json:"error,omitempty"`
	At      time.Time     `json:"at"`
}

// failureHandler is told about a layer that failed verification.
type failureHandler = func(ctx context.Context, f LayerFailure)

// verifier runs and remembers layer verifications.
type verifier struct {
	dir      string // saved states, one file per (layer, chain)
	registry *remote.Registry
	store    *cache.Store
	metrics  *metrics
	// observer counts the verification stream as the layer's background
	// fetch (metrics, fetch log); nil counts nothing.
	observer lfs.Observer
	// quiet is how long a layer's reads must have fetched nothing before
	// its verification stream starts; maxWait bounds that wait. While it
	// streams, it pauses whenever the layer's reads fetched within
	// yieldQuiet, for at most maxPause at a time.
	quiet, maxWait, yieldQuiet, maxPause time.Duration
	// onFail is told about a layer that failed (the snapshotter stops
	// offering its snapshot for reuse).
	onFail atomic.Pointer[failureHandler]

	mu      sync.Mutex
	running map[string]context.CancelFunc // by mountpoint
	wg      sync.WaitGroup
	ctx     context.Context
	cancel  context.CancelFunc
}

func newVerifier(dir string, reg *remote.Registry, store *cache.Store, m *metrics) (*verifier, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the verification state directory: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &verifier{
		dir: dir, registry: reg, store: store, metrics: m,
		quiet: 2 * time.Second, maxWait: 60 * time.Second,
		yieldQuiet: 300 * time.Millisecond, maxPause: 5 * time.Second,
		running: map[string]context.CancelFunc{}, ctx: ctx, cancel: cancel,
	}, nil
}

// close stops running verifications and waits for them.
func (v *verifier) close() {
	v.cancel()
	v.wg.Wait()
}

func (v *verifier) statePath(layer digest.Digest, chain string) string {
	return filepath.Join(v.dir, digest.FromString(layer.String()+" "+chain).Encoded()+".json")
}

func (v *verifier) load(layer digest.Digest, chain string) *verifyState {
	b, err := os.ReadFile(v.statePath(layer, chain))
	if err != nil {
		return nil
	}
	var st verifyState
	if json.Unmarshal(b, &st) != nil || st.Layer != layer || st.ChainID != chain {
		return nil
	}
	return &st
}

func (v *verifier) save(st verifyState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	p := v.statePath(st.Layer, st.ChainID)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// verifyTarget is what a layer is checked against.
type verifyTarget struct {
	src lfs.LayerSource
	// chain is the chain ID containerd commits the snapshot under and
	// parent the chain ID of the layers below it ("" for a base layer):
	// the DiffID the blob unpacks to must give chain on top of parent.
	chain, parent string
}

// start verifies the layer mounted at m in the background.
func (v *verifier) start(m *lfs.Mount, t verifyTarget) {
	mp := m.Dir()
	v.mu.Lock()
	if _, ok := v.running[mp]; ok || v.ctx.Err() != nil {
		v.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(v.ctx)
	v.running[mp] = cancel
	v.mu.Unlock()
	v.wg.Go(func() {
		defer func() {
			v.mu.Lock()
			delete(v.running, mp)
			v.mu.Unlock()
			cancel()
		}()
		v.run(ctx, m, t)
	})
}

// stop cancels the verification of the layer at mountpoint, if any.
func (v *verifier) stop(mountpoint string) {
	v.mu.Lock()
	if cancel, ok := v.running[mountpoint]; ok {
		cancel()
	}
	v.mu.Unlock()
}

// run verifies until it has a result; transient failures (registry down,
// broken connection) are retried with a growing pause.
func (v *verifier) run(ctx context.Context, m *lfs.Mount, t verifyTarget) {
	l := log.G(ctx).WithField("layer", t.src.Digest).WithField("image", t.src.Ref)
	mountedAt := time.Now()
	pause := time.Second
	for attempt := 1; ; attempt++ {
		v.waitQuiet(ctx, m.Layer())
		res, err := v.check(ctx, m.Layer(), t)
		switch {
		case ctx.Err() != nil:
			return
		case err == nil:
			took := time.Since(mountedAt)
			_ = v.save(verifyState{Layer: t.src.Digest, ChainID: t.chain, Result: "verified", DiffID: res.DiffID, At: time.Now().UTC()})
			v.metrics.verified("ok", took)
			l.WithField("diff_id", res.DiffID).WithField("bytes", res.Size).WithField("since_mount", took).Info("layer verified")
			return
		case isTransient(err):
			l.WithError(err).WithField("attempt", attempt).Warn("layer verification interrupted; retrying")
			select {
			case <-ctx.Done():
				return
			case <-time.After(pause):
			}
			pause = min(2*pause, time.Minute)
			continue
		default:
			took := time.Since(mountedAt)
			m.Fail(err)
			if serr := v.save(verifyState{Layer: t.src.Digest, ChainID: t.chain, Result: "failed", Error: err.Error(), At: time.Now().UTC()}); serr != nil {
				l.WithError(serr).Error("failed to save the verification failure")
			}
			v.metrics.verified("failed", took)
			l.WithError(err).WithField("chain_id", t.chain).WithField("since_mount", took).
				Error("LAYER FAILED VERIFICATION: it does not match what its image commits to; every read of it fails from now on")
			if fn := v.onFail.Load(); fn != nil {
				(*fn)(context.WithoutCancel(ctx), LayerFailure{Mountpoint: m.Dir(), Image: t.src.Ref, Layer: t.src.Digest, ChainID: t.chain, Err: err})
			}
			return
		}
	}
}

// activity counts what a layer has done for its readers: range requests
// (a reader's misses and the speculation around them) and chunk reads,
// cached or not. A container whose start-up chunks were prefetched (a
// learned profile) reads from the cache and fetches nothing, yet it is
// busy starting: the verification stream's inflating and hashing would
// compete with it for the CPU and its stream with any miss for the link.
func activity(l *lfs.Layer) int64 {
	st := l.Stats()
	return st.Requests + st.CacheHits + st.CacheMisses
}

// waitQuiet waits until the layer has been idle (see activity) for
// v.quiet (at most v.maxWait), so that the verification stream does not
// compete with a starting container.
func (v *verifier) waitQuiet(ctx context.Context, l *lfs.Layer) {
	deadline := time.Now().Add(v.maxWait)
	last := activity(l)
	quietSince := time.Now()
	tick := time.NewTicker(v.quiet / 5)
	defer tick.Stop()
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if n := activity(l); n != last {
			last, quietSince = n, time.Now()
		} else if time.Since(quietSince) >= v.quiet {
			return
		}
	}
}

// check streams the whole blob once and proves it is the layer: the
// blob digest (checked by the registry client as it streams), the TOC
// against the tar, and the DiffID against the chain ID. Verified chunks
// not cached yet are added to the cache on the way.
func (v *verifier) check(ctx context.Context, layer *lfs.Layer, t verifyTarget) (*estargz.LayerCheck, error) {
	if v.registry == nil {
		return nil, fmt.Errorf("no registry client: %w", errdefs.ErrUnavailable)
	}
	start := time.Now()
	rc, err := v.registry.Fetch(ctx, t.src.Ref, ocispec.Descriptor{Digest: t.src.Digest, Size: t.src.Size})
	if err != nil {
		return nil, fmt.Errorf("fetching the blob: %w", err)
	}
	defer rc.Close()
	var streamed byteCounter
	rc = struct {
		io.Reader
		io.Closer
	}{io.TeeReader(newYieldingReader(ctx, rc, layer, v.yieldQuiet, v.maxPause), &streamed), rc}
	// The stream is this layer's background fetch: count it as one.
	defer func() {
		if v.observer != nil {
			v.observer.Fetched(t.src.Digest, int64(streamed), time.Since(start), true, nil)
		}
	}()
	res, err := estargz.CheckLayer(ctx, rc, layer.Compression(), layer.Index(), estargz.LayerDigests{Blob: t.src.Digest}, estargz.CheckOptions{
		OnChunk: func(c estargz.Chunk, data []byte) error {
			if v.store.Has(c.Digest) {
				return nil
			}
			if err := v.store.Add(c.Digest, data); err != nil && !errdefs.IsResourceExhausted(err) {
				log.G(ctx).WithError(err).WithField("chunk", c.Digest).Debug("caching a verified chunk failed")
			}
			return nil
		},
	})
	if err != nil {
		return nil, err
	}
	if t.chain != "" {
		want := ChainID(t.parent, res.DiffID)
		if want.String() != t.chain {
			return nil, fmt.Errorf("%w: the blob unpacks to DiffID %s, which gives chain %s on parent %q, but containerd commits it as %s",
				estargz.ErrLayerMismatch, res.DiffID, want, t.parent, t.chain)
		}
	}
	return res, nil
}

// ChainID is the OCI chain ID of a layer with the given DiffID on top of
// the layers whose chain ID is parent ("" for a base layer).
func ChainID(parent string, diffID digest.Digest) digest.Digest {
	if parent == "" {
		return diffID
	}
	// A parent's chain ID stands for all the layers below it.
	return identity.ChainID([]digest.Digest{digest.Digest(parent), diffID})
}

// isTransient tells a verification that could not finish (network,
// registry, cancellation) from one that found the layer wrong.
func isTransient(err error) bool {
	if errors.Is(err, estargz.ErrLayerMismatch) || errdefs.IsDataLoss(err) {
		return false
	}
	var ne net.Error
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &ne) ||
		errdefs.IsUnavailable(err) || errdefs.IsNotFound(err) || errdefs.IsUnauthorized(err) ||
		errdefs.IsPermissionDenied(err) || !errors.Is(err, estargz.ErrFormat)
}

// byteCounter is an io.Writer counting what is written to it.
type byteCounter int64

func (c *byteCounter) Write(p []byte) (int, error) {
	*c += byteCounter(len(p))
	return len(p), nil
}

// yieldingReader paces the verification stream behind the layer's reads:
// before each piece it waits, up to maxPause, until the layer has been
// idle (see activity) for quiet, so that a starting container's reads do
// not queue behind the stream on the link or for the CPU.
type yieldingReader struct {
	ctx             context.Context
	r               io.Reader
	layer           *lfs.Layer
	quiet, maxPause time.Duration
	last            int64
	lastChange      time.Time
}

// yieldPiece is how much the stream reads between two looks at the reads.
const yieldPiece = 256 << 10

func newYieldingReader(ctx context.Context, r io.Reader, l *lfs.Layer, quiet, maxPause time.Duration) *yieldingReader {
	// The stream starts after a quiet period (waitQuiet): count it quiet.
	return &yieldingReader{ctx: ctx, r: r, layer: l, quiet: quiet, maxPause: maxPause,
		last: activity(l), lastChange: time.Now().Add(-quiet)}
}

func (y *yieldingReader) Read(p []byte) (int, error) {
	if len(p) > yieldPiece {
		p = p[:yieldPiece]
	}
	if y.quiet > 0 {
		deadline := time.Now().Add(y.maxPause)
		for {
			if n := activity(y.layer); n != y.last {
				y.last, y.lastChange = n, time.Now()
			}
			if time.Since(y.lastChange) >= y.quiet || time.Now().After(deadline) {
				break
			}
			select {
			case <-y.ctx.Done():
				return 0, y.ctx.Err()
			case <-time.After(y.quiet / 4):
			}
		}
	}
	return y.r.Read(p)
}
