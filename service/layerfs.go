package service

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

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
	// profiles records and looks up start-up profiles; nil when off.
	profiles *profiles

	mu        sync.Mutex
	preloaded map[digest.Digest]bool
	// preloads bounds the neighbour-TOC preloads in flight: an image's
	// layer list is its own, and may be long.
	preloads chan struct{}
	// manifests, when set, fetches images' manifests for their layers'
	// sizes (see manifestSizes); sizes caches them by manifest digest.
	manifests ManifestFetcher
	sizes     map[digest.Digest]map[digest.Digest]int64
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
	return &LayerFS{mgr: mgr, allowUnverified: allowUnverified, preloaded: map[digest.Digest]bool{}, preloads: make(chan struct{}, maxPreloads),
		sizes: map[digest.Digest]map[digest.Digest]int64{}}
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
	// The blob size the manifest gives, checked against the registry's
	// when the TOC is read (and against the saved one on a remount).
	// A layer saved under the root was checked when it was saved: a
	// remount (after a restart, maybe offline) needs no manifest.
	var sizes map[digest.Digest]int64
	if !l.mgr.Saved(src.Digest) {
		sizes = l.manifestSizes(ctx, src.Ref, labels)
	}
	if sizes != nil {
		size, ok := sizes[src.Digest]
		if !ok {
			return fmt.Errorf("layer %s is not in manifest %s: %w", src.Digest, labels[snapshotters.TargetManifestDigestLabel], errdefs.ErrInvalidArgument)
		}
		src.Size = size
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
		l.preloadNeighbours(ctx, src, labels[snapshot.LabelCRIImageLayers], sizes)
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
	l.profiles.mounted(ctx, mountpoint, labels, src, m.Layer())
	return nil
}

// preloadNeighbours reads and saves the TOCs of the image's other layers
// in parallel, so that their Prepare calls, which containerd makes one
// after the other, find them ready. The TOCs are verified when those
// layers are mounted with their toc.digest labels.
func (l *LayerFS) preloadNeighbours(ctx context.Context, src lfs.LayerSource, layers string, sizes map[digest.Digest]int64) {
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
		n := lfs.LayerSource{Ref: src.Ref, Digest: d, Size: sizes[d]}
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
	l.profiles.unmounted(mountpoint)
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

// ManifestFetcher fetches a manifest by reference (*remote.Registry).
type ManifestFetcher interface {
	FetchIndexOrManifest(ctx context.Context, ref string) (ocispec.Descriptor, []byte, error)
}

// maxCachedManifests bounds the layer sizes kept per manifest digest.
const maxCachedManifests = 256

// manifestTimeout bounds the manifest fetch of a mount; past it (or
// offline, e.g. when a restart mounts saved layers again) the layer is
// mounted with the registry's size, as without the label.
const manifestTimeout = 10 * time.Second

// manifestSizes returns the layer sizes of the manifest whose digest
// containerd gives in the cri.manifest-digest label (fetched by digest from
// the image's repository, so verified, and cached), or nil when the label
// is missing or the manifest cannot be fetched.
func (l *LayerFS) manifestSizes(ctx context.Context, ref string, labels map[string]string) map[digest.Digest]int64 {
	md, err := digest.Parse(labels[snapshotters.TargetManifestDigestLabel])
	if err != nil || l.manifests == nil {
		return nil
	}
	l.mu.Lock()
	sizes, ok := l.sizes[md]
	l.mu.Unlock()
	if ok {
		return sizes
	}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return nil
	}
	withDigest, err := reference.WithDigest(reference.TrimNamed(named), md)
	if err != nil {
		return nil
	}
	mctx, cancel := context.WithTimeout(ctx, manifestTimeout)
	defer cancel()
	_, raw, err := l.manifests.FetchIndexOrManifest(mctx, withDigest.String())
	if err != nil {
		log.G(ctx).WithError(err).WithField("manifest", md).Debug("fetching the manifest for layer sizes failed; using the registry's")
		return nil
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		log.G(ctx).WithError(err).WithField("manifest", md).Debug("manifest does not parse; using the registry's layer sizes")
		return nil
	}
	sizes = make(map[digest.Digest]int64, len(m.Layers))
	for _, d := range m.Layers {
		sizes[d.Digest] = d.Size
	}
	l.mu.Lock()
	if len(l.sizes) >= maxCachedManifests {
		clear(l.sizes)
	}
	l.sizes[md] = sizes
	l.mu.Unlock()
	return sizes
}
