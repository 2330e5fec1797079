package service

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/snapshot"
)

// LayerFS serves remote snapshots with package fs: it turns containerd's
// snapshot labels into layer sources for an fs.Manager. It implements
// snapshot.LayerFS; Service.LayerFS returns one.
type LayerFS struct {
	mgr *lfs.Manager
	// allowUnverified is the config's allow_unverified: layers without a
	// TOC digest can be mounted.
	allowUnverified bool
	// verifier proves mounted layers in the background; nil when
	// verification is off.
	verifier *verifier

	mu        sync.Mutex
	preloaded map[digest.Digest]bool
	// preloads bounds the neighbour-TOC preloads in flight: an image's
	// layer list is its own, and may be long.
	preloads chan struct{}
}

// maxPreloads is how many neighbour TOCs are preloaded at a time.
const maxPreloads = 4

var (
	_ snapshot.LayerFS      = (*LayerFS)(nil)
	_ snapshot.LayerSizer   = (*LayerFS)(nil)
	_ snapshot.LayerSweeper = (*LayerFS)(nil)
)

// NewLayerFS returns a LayerFS mounting layers with mgr.
func NewLayerFS(mgr *lfs.Manager, allowUnverified bool) *LayerFS {
	return &LayerFS{mgr: mgr, allowUnverified: allowUnverified, preloaded: map[digest.Digest]bool{}, preloads: make(chan struct{}, maxPreloads)}
}

// SourceFromLabels turns a remote snapshot's labels into the layer to
// mount: the image reference and layer digest containerd sets
// (snapshot.LayerRef) and the TOC digest from the layer's annotation.
// Missing or malformed labels are errdefs.ErrInvalidArgument.
func SourceFromLabels(labels map[string]string) (lfs.LayerSource, error) {
	ref, dgst, ok := snapshot.LayerRef(labels)
	if !ok {
		return lfs.LayerSource{}, fmt.Errorf("labels do not name an image and layer: %w", errdefs.ErrInvalidArgument)
	}
	d, err := digest.Parse(dgst)
	if err != nil {
		return lfs.LayerSource{}, fmt.Errorf("layer digest label %q: %w", dgst, errdefs.ErrInvalidArgument)
	}
	src := lfs.LayerSource{Ref: ref, Digest: d}
	if t := labels[snapshot.LabelTOCDigest]; t != "" {
		if src.TOCDigest, err = digest.Parse(t); err != nil {
			return lfs.LayerSource{}, fmt.Errorf("TOC digest label %q: %w", t, errdefs.ErrInvalidArgument)
		}
	}
	return src, nil
}

// Mount implements snapshot.LayerFS.
func (l *LayerFS) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	src, err := SourceFromLabels(labels)
	if err != nil {
		return err
	}
	target := verifyTarget{src: src, chain: labels[snapshots.LabelSnapshotRef], parent: labels[snapshot.LabelParentChainID]}
	var verified bool
	if l.verifier != nil {
		st := l.verifier.load(src.Digest, target.chain)
		if st != nil && st.Result == "failed" {
			return fmt.Errorf("layer %s failed verification on %s and is not served lazily again: %s: %w",
				src.Digest, st.At.Format(time.RFC3339), st.Error, errdefs.ErrDataLoss)
		}
		if st != nil && st.Result == "verified" {
			// The saved DiffID must give this chain on this parent too.
			if target.chain != "" && ChainID(target.parent, st.DiffID).String() != target.chain {
				return fmt.Errorf("layer %s unpacks to DiffID %s, which does not give chain %s on parent %q: %w",
					src.Digest, st.DiffID, target.chain, target.parent, errdefs.ErrDataLoss)
			}
			verified = true
		}
	}
	// A layer without a TOC digest is refused (unless allow_unverified):
	// its image is most likely not eStargz at all, and reading its
	// neighbours' footers would be wasted requests.
	if src.TOCDigest != "" || l.allowUnverified {
		l.preloadNeighbours(ctx, src, labels[snapshot.LabelCRIImageLayers])
	}
	start := time.Now()
	m, err := l.mgr.Mount(ctx, mountpoint, src)
	if err != nil {
		return err
	}
	log.G(ctx).WithField("layer", src.Digest).WithField("took", time.Since(start)).Info("layer mounted lazily")
	if l.verifier != nil && !verified {
		l.verifier.start(m, target)
	}
	return nil
}

// preloadNeighbours reads and saves the TOCs of the image's other layers
// in parallel, so that their Prepare calls, which containerd makes one
// after the other, find them ready. The TOCs are verified when those
// layers are mounted with their toc.digest labels.
func (l *LayerFS) preloadNeighbours(ctx context.Context, src lfs.LayerSource, layers string) {
	if layers == "" {
		return
	}
	for _, s := range strings.Split(layers, ",") {
		d, err := digest.Parse(strings.TrimSpace(s))
		if err != nil || d == src.Digest {
			continue
		}
		l.mu.Lock()
		seen := l.preloaded[d]
		l.preloaded[d] = true
		l.mu.Unlock()
		if seen {
			continue
		}
		n := lfs.LayerSource{Ref: src.Ref, Digest: d}
		go func() {
			pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			defer cancel()
			select {
			case l.preloads <- struct{}{}:
				defer func() { <-l.preloads }()
			case <-pctx.Done():
				return
			}
			if err := l.mgr.Preload(pctx, n); err != nil {
				log.G(pctx).WithError(err).WithField("layer", d).Debug("preloading neighbour layer failed")
			}
		}()
	}
}

// Check implements snapshot.LayerFS.
func (l *LayerFS) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	m, ok := l.mgr.Lookup(mountpoint)
	if !ok {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, errdefs.ErrNotFound)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return m.Check(cctx)
}

// Unmount implements snapshot.LayerFS.
func (l *LayerFS) Unmount(ctx context.Context, mountpoint string) error {
	if l.verifier != nil {
		l.verifier.stop(mountpoint)
	}
	return l.mgr.Unmount(ctx, mountpoint)
}

// LayerSize implements snapshot.LayerSizer: the uncompressed size of the
// layer mounted at mountpoint, from its TOC.
func (l *LayerFS) LayerSize(mountpoint string) (int64, bool) {
	return l.mgr.LayerSize(mountpoint)
}

// Mountpoints lists where layers are mounted.
func (l *LayerFS) Mountpoints() []string {
	mounts := l.mgr.Mounts()
	out := make([]string, 0, len(mounts))
	for _, m := range mounts {
		out = append(out, m.Dir())
	}
	return out
}
