package snapshot

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// LayerFS mounts image layers lazily.
type LayerFS interface {
	// Mount mounts the layer described by labels (containerd.io/snapshot/...
	// labels incl. cri.image-ref, cri.layer-digest, cri.image-layers,
	// containerd.io/snapshot/stargz/toc.digest, and lazypull's own labels)
	// read-only at mountpoint. An error means "cannot serve lazily" (fall
	// back to a normal snapshot).
	Mount(ctx context.Context, mountpoint string, labels map[string]string) error
	// Check reports whether the layer mounted at mountpoint is still healthy.
	Check(ctx context.Context, mountpoint string, labels map[string]string) error
	// Unmount unmounts the layer at mountpoint.
	Unmount(ctx context.Context, mountpoint string) error
}

// LayerSizer is implemented by a LayerFS that knows the uncompressed size
// of the layers it mounts (from their verified TOC). The snapshotter then
// records that size as the Usage of the remote snapshot (and in
// LabelUncompressedSize), so that containerd and kubelet's image
// filesystem stats count lazily served layers as if they were unpacked.
type LayerSizer interface {
	// LayerSize returns the uncompressed size of the layer mounted at
	// mountpoint; ok is false when it is unknown.
	LayerSize(mountpoint string) (size int64, ok bool)
}

// MountLister is implemented by a LayerFS whose mounts outlive the
// snapshotter (they are served by another process, the fuse manager). New
// then keeps the mounts it lists instead of unmounting them as stale,
// takes those of remote snapshots as mounted (checking them before use),
// and unmounts those of snapshots removed meanwhile; Close leaves the
// mounts in place, so that running containers keep reading them while the
// daemon restarts.
type MountLister interface {
	// Mountpoints lists where layers are mounted.
	Mountpoints(ctx context.Context) ([]string, error)
}

// Labels read or written by the snapshotter. Those starting with
// "containerd.io/snapshot/" are passed on by containerd from the layer
// descriptor's annotations.
const (
	// LabelRemote marks a committed snapshot served by the LayerFS ("true").
	LabelRemote = "containerd.io/snapshot/lazypull.remote"
	// LabelParentChainID is the chain ID of the layers below a remote
	// layer (the parent snapshot's name; empty for a base layer). The
	// snapshotter sets it itself on every remote snapshot, over anything
	// an image annotation says, so that the LayerFS can check the layer's
	// DiffID against the chain ID it is committed under.
	LabelParentChainID = "containerd.io/snapshot/lazypull.parent-chain-id"
	// LabelUncompressedSize is the layer's uncompressed size in bytes,
	// reported as the Usage of a remote snapshot when the LayerFS is no
	// LayerSizer. Optional; the snapshotter sets it on remote snapshots
	// from the LayerSizer.
	LabelUncompressedSize = "containerd.io/snapshot/lazypull.uncompressed-size"

	// LabelCRIImageRef is the image reference set by CRI (or by
	// pkg/snapshotters.AppendInfoHandlerWrapper).
	LabelCRIImageRef = "containerd.io/snapshot/cri.image-ref"
	// LabelCRILayerDigest is the layer digest set by CRI.
	LabelCRILayerDigest = "containerd.io/snapshot/cri.layer-digest"
	// LabelCRIImageLayers is the comma-separated list of the image's layer
	// digests set by CRI.
	LabelCRIImageLayers = "containerd.io/snapshot/cri.image-layers"
	// LabelTOCDigest is the eStargz/zstd:chunked TOC digest annotation.
	LabelTOCDigest = "containerd.io/snapshot/stargz/toc.digest"
)

// LayerRef returns the image reference and layer digest named by labels.
// ok is false unless both are present.
//
// Only the labels containerd's image handler sets are read (CRI's, which
// pkg/snapshotters.AppendInfoHandlerWrapper writes over any annotation of
// the same name): containerd also passes every "containerd.io/snapshot/"
// annotation of a layer descriptor on as a label, so any other label could
// come from the image and point the mount at another blob, repository or
// host.
func LayerRef(labels map[string]string) (imageRef, layerDigest string, ok bool) {
	imageRef = labels[LabelCRIImageRef]
	layerDigest = labels[LabelCRILayerDigest]
	return imageRef, layerDigest, imageRef != "" && layerDigest != ""
}

// remoteLayer is the in-memory state of a committed remote snapshot.
type remoteLayer struct {
	id         string
	name       string
	mountpoint string
	labels     map[string]string // passed to the LayerFS
	pinned     map[string]string // labels Update must keep
	digest     string
	// failed is set (under Snapshotter.mu) when the layer failed
	// verification: the snapshot is removed once nothing is stacked on it.
	failed bool

	mu      sync.Mutex // serializes Mount/Check/Unmount of this layer
	mounted bool
	removed bool
}

func (s *Snapshotter) newRemoteLayer(id, name string, labels map[string]string) *remoteLayer {
	_, digest, _ := LayerRef(labels)
	pinned := map[string]string{}
	for k, v := range labels {
		if k == snapshots.LabelSnapshotRef || strings.HasPrefix(k, "containerd.io/snapshot/") {
			pinned[k] = v
		}
	}
	return &remoteLayer{
		id:         id,
		name:       name,
		mountpoint: s.fsPath(id),
		labels:     maps.Clone(labels),
		pinned:     pinned,
		digest:     digest,
	}
}

// remote returns the remote layer of snapshot id, or nil.
func (s *Snapshotter) remote(id string) *remoteLayer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.remotes[id]
}

// loadRemotes registers the remote snapshots recorded in the metadata. It
// needs a transaction in ctx.
func (s *Snapshotter) loadRemotes(ctx context.Context) ([]*remoteLayer, error) {
	var list []*remoteLayer
	err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
		if info.Kind != snapshots.KindCommitted || info.Labels[LabelRemote] != "true" {
			return nil
		}
		id, _, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		list = append(list, s.newRemoteLayer(id, info.Name, info.Labels))
		return nil
	})
	if err != nil && !errdefs.IsNotFound(err) { // NotFound: no snapshots yet
		return nil, err
	}
	s.mu.Lock()
	for _, rl := range list {
		s.remotes[rl.id] = rl
	}
	s.mu.Unlock()
	return list, nil
}

// restore mounts the given remote layers again in the background, at most
// concurrency at a time.
func (s *Snapshotter) restore(ctx context.Context, list []*remoteLayer, concurrency int) {
	if len(list) == 0 {
		return
	}
	if s.layers == nil {
		for _, rl := range list {
			log.G(ctx).WithField("snapshot", rl.name).WithField("layer", rl.digest).
				Error("remote snapshot cannot be served: no LayerFS configured")
		}
		return
	}
	if concurrency <= 0 {
		concurrency = 8
	}
	log.G(ctx).WithField("count", len(list)).Info("mounting remote snapshots again")
	ctx = s.bgCtx
	s.bgWG.Go(func() {
		sem := make(chan struct{}, concurrency)
		var wg sync.WaitGroup
		var mu sync.Mutex
		failed := 0
	loop:
		for _, rl := range list {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				break loop
			}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := s.ensureLayer(ctx, rl); err != nil {
					mu.Lock()
					failed++
					mu.Unlock()
					log.G(ctx).WithError(err).WithField("snapshot", rl.name).WithField("layer", rl.digest).
						Error("FAILED to mount remote snapshot again; it stays unavailable until a remount succeeds")
				}
			})
		}
		wg.Wait()
		log.G(ctx).WithField("count", len(list)).WithField("failed", failed).Info("remote snapshots restored")
	})
}

// prepareTarget is Prepare with containerd.io/snapshot.ref set: the
// unpacker wants the layer committed as target.
func (s *Snapshotter) prepareTarget(ctx context.Context, key, parent, target string, labels map[string]string, opts []snapshots.Opt) ([]mount.Mount, error) {
	if info, err := s.Stat(ctx, target); err == nil {
		if info.Parent == parent {
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		// Only containerd's Walk on (target, parent) can tell it apart;
		// a different parent cannot be shared, so unpack normally.
		log.G(ctx).WithField("target", target).WithField("parent", parent).
			Debug("target exists on another parent; preparing normally")
		return s.create(ctx, snapshots.KindActive, key, parent, opts)
	} else if !errdefs.IsNotFound(err) {
		return nil, err
	}
	imageRef, digest, ok := LayerRef(labels)
	if s.layers == nil || !ok {
		return s.create(ctx, snapshots.KindActive, key, parent, opts)
	}

	mounts, err := s.create(ctx, snapshots.KindActive, key, parent, opts)
	if err != nil {
		return nil, err
	}
	l := log.G(ctx).WithField("key", key).WithField("layer", digest).WithField("image", imageRef)
	var id string
	if err := s.withTx(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return nil, err
	}
	mp := s.fsPath(id)
	labels = maps.Clone(labels)
	labels[LabelParentChainID] = parent
	if err := s.layers.Mount(ctx, mp, labels); err != nil {
		l.WithError(err).Warn("cannot serve layer lazily; falling back to a normal snapshot")
		if mounted, _ := isMounted(mp); mounted {
			_ = detach(mp)
		}
		return mounts, nil
	}

	committed := maps.Clone(labels)
	committed[LabelRemote] = "true"
	var usage snapshots.Usage
	if sz, ok := s.layers.(LayerSizer); ok {
		if n, ok := sz.LayerSize(mp); ok && n >= 0 {
			usage.Size = n
			committed[LabelUncompressedSize] = strconv.FormatInt(n, 10)
		}
	}
	if usage.Size == 0 {
		if n, err := strconv.ParseInt(labels[LabelUncompressedSize], 10, 64); err == nil && n >= 0 {
			usage.Size = n
		}
	}
	err = s.withTx(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, target, usage, snapshots.WithLabels(committed))
		return err
	})
	if err != nil {
		rl := &remoteLayer{mountpoint: mp, mounted: true, digest: digest}
		s.unmountLayer(ctx, rl)
		if rerr := s.Remove(ctx, key); rerr != nil {
			l.WithError(rerr).Error("failed to remove snapshot after failed commit")
		}
		if errors.Is(err, errdefs.ErrAlreadyExists) {
			// Another Prepare committed the same target meanwhile.
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("failed to commit remote snapshot %s: %w", target, err)
	}
	rl := s.newRemoteLayer(id, target, committed)
	rl.mounted = true
	s.mu.Lock()
	s.remotes[id] = rl
	s.mu.Unlock()
	l.WithField("target", target).Info("layer mounted remotely")
	return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// ensureLowers makes sure the remote layers among ids are mounted and healthy.
func (s *Snapshotter) ensureLowers(ctx context.Context, ids []string) error {
	for _, id := range ids {
		if rl := s.remote(id); rl != nil {
			if err := s.ensureLayer(ctx, rl); err != nil {
				return err
			}
		}
	}
	return nil
}

// ensureLayer checks a remote layer and (re)mounts it if it is not healthy.
func (s *Snapshotter) ensureLayer(ctx context.Context, rl *remoteLayer) error {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.removed {
		return fmt.Errorf("remote snapshot %s was removed: %w", rl.name, errdefs.ErrNotFound)
	}
	if s.layers == nil {
		return fmt.Errorf("remote snapshot %s (layer %s) is unavailable: no LayerFS configured: %w", rl.name, rl.digest, errdefs.ErrUnavailable)
	}
	if rl.mounted {
		err := s.layers.Check(ctx, rl.mountpoint, rl.labels)
		if err == nil {
			return nil
		}
		log.G(ctx).WithError(err).WithField("snapshot", rl.name).WithField("layer", rl.digest).Warn("remote layer unhealthy; mounting it again")
		s.unmountLayer(ctx, rl)
	}
	if err := s.layers.Mount(ctx, rl.mountpoint, rl.labels); err != nil {
		if mounted, _ := isMounted(rl.mountpoint); mounted {
			_ = detach(rl.mountpoint)
		}
		return fmt.Errorf("remote snapshot %s (layer %s) is unavailable: mount failed: %v: %w", rl.name, rl.digest, err, errdefs.ErrUnavailable)
	}
	rl.mounted = true
	return nil
}

// unmountLayer unmounts a remote layer, lazily if the LayerFS cannot.
// rl.mu must be held.
func (s *Snapshotter) unmountLayer(ctx context.Context, rl *remoteLayer) {
	rl.mounted = false
	if s.layers != nil {
		err := s.layers.Unmount(ctx, rl.mountpoint)
		if err == nil {
			return
		}
		log.G(ctx).WithError(err).WithField("mountpoint", rl.mountpoint).WithField("layer", rl.digest).Warn("failed to unmount layer; detaching it")
	}
	if mounted, err := isMounted(rl.mountpoint); err != nil || mounted {
		if err := detach(rl.mountpoint); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", rl.mountpoint).Error("failed to detach layer")
		}
	}
}

// dropRemote forgets and unmounts the remote layer of removed snapshot id,
// and reports whether it was remote.
func (s *Snapshotter) dropRemote(ctx context.Context, id string) bool {
	s.mu.Lock()
	rl := s.remotes[id]
	delete(s.remotes, id)
	s.mu.Unlock()
	if rl == nil {
		return false
	}
	rl.mu.Lock()
	defer rl.mu.Unlock()
	rl.removed = true
	if rl.mounted {
		s.unmountLayer(ctx, rl)
	}
	return true
}

// LayerSweeper is implemented by a LayerFS that keeps state for a layer
// beyond its mounts (saved TOCs, so that a restart mounts it without the
// registry). The snapshotter calls SweepLayers with itself after removing
// a remote snapshot, so that the state of layers no snapshot uses any
// more goes with their last snapshot.
type LayerSweeper interface {
	SweepLayers(ctx context.Context, sn snapshots.Snapshotter) error
}

// sweepLayers lets the LayerFS drop the state of layers no snapshot uses.
func (s *Snapshotter) sweepLayers(ctx context.Context) {
	sw, ok := s.layers.(LayerSweeper)
	if !ok {
		return
	}
	if err := sw.SweepLayers(ctx, s); err != nil {
		log.G(ctx).WithError(err).Warn("sweeping the state of layers no snapshot uses failed")
	}
}

// LayerFailed is told by the LayerFS that the remote layer mounted at
// mountpoint failed verification: it is not the layer its chain ID names.
// The committed snapshot is removed so that no other image's chain reuses
// it and the next pull of that chain unpacks the real layer; when
// snapshots on top of it are still in use it stays (its reads fail) until
// they are removed.
func (s *Snapshotter) LayerFailed(ctx context.Context, mountpoint string, cause error) {
	s.mu.Lock()
	var rl *remoteLayer
	for _, r := range s.remotes {
		if r.mountpoint == mountpoint {
			rl = r
			r.failed = true
			break
		}
	}
	s.mu.Unlock()
	if rl == nil {
		return
	}
	l := log.G(ctx).WithField("snapshot", rl.name).WithField("layer", rl.digest)
	if err := s.Remove(ctx, rl.name); err != nil {
		l.WithError(err).Warn("failed layer's snapshot is still in use: it is removed with the last snapshot on top of it; until then its reads fail")
		return
	}
	l.WithField("cause", cause.Error()).Warn("removed the snapshot of a layer that failed verification")
}

// failedParent reports whether name is a remote layer that failed
// verification.
func (s *Snapshotter) failedParent(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.remotes {
		if r.name == name && r.failed {
			return true
		}
	}
	return false
}

// adoptMounts asks a MountLister LayerFS which layers it still serves from
// before this snapshotter started: those of remote snapshots in list are
// taken as mounted (restore checks them and mounts them again only if they
// are unhealthy); the others belong to snapshots removed meanwhile and are
// unmounted. It returns the mountpoints kept.
func (s *Snapshotter) adoptMounts(ctx context.Context, list []*remoteLayer) map[string]bool {
	ml, ok := s.layers.(MountLister)
	if !ok {
		return nil
	}
	mps, err := ml.Mountpoints(ctx)
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot list the layers still mounted; mounting every remote snapshot again")
		return nil
	}
	byMP := map[string]*remoteLayer{}
	for _, rl := range list {
		byMP[rl.mountpoint] = rl
	}
	keep := map[string]bool{}
	for _, mp := range mps {
		rl := byMP[mp]
		if rl == nil {
			log.G(ctx).WithField("mountpoint", mp).Info("unmounting the layer of a snapshot removed while the daemon was down")
			if err := s.layers.Unmount(ctx, mp); err != nil {
				log.G(ctx).WithError(err).WithField("mountpoint", mp).Warn("failed to unmount the layer of a removed snapshot")
			}
			continue
		}
		rl.mounted = true
		keep[mp] = true
	}
	if len(keep) > 0 {
		log.G(ctx).WithField("count", len(keep)).Info("adopted layers still served by the fuse manager")
	}
	return keep
}
