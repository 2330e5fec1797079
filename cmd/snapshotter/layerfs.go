package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/userns"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazypull/lazypull/cache"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/snapshot"
)

// layerFS serves remote snapshots with package fs: it turns containerd's
// snapshot labels into layer sources for an fs.Manager.
type layerFS struct {
	mgr   *lfs.Manager
	store *cache.Store
	// allowUnverified is the config's allow_unverified: layers without a
	// TOC digest can be mounted.
	allowUnverified bool

	mu        sync.Mutex
	preloaded map[digest.Digest]bool
}

var _ snapshot.LayerFS = (*layerFS)(nil)

// newLayerFS builds the LayerFS that serves remote snapshots from the
// configuration, keeping its state (chunk cache, layer metadata) under
// root, and registers its metrics with reg; fetches, if not nil, records
// every registry request. The returned func releases it
// after the snapshotter is closed.
func newLayerFS(cfg *Config, root string, reg prometheus.Registerer, fetches *fetchLog) (snapshot.LayerFS, func() error, error) {
	store, err := cache.Open(cache.Options{
		Dir:            filepath.Join(root, "cache"),
		MaxDiskBytes:   orDisabled(cfg.Cache.MaxDiskBytes),
		MaxMemoryBytes: orDisabled(cfg.Cache.MaxMemoryBytes),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("opening the chunk cache: %w", err)
	}
	m := newMetrics(reg, store)
	var observer lfs.Observer = m
	var onFetch func(remote.FetchEvent)
	if fetches != nil {
		observer, onFetch = loggingObserver{Observer: m, log: fetches}, fetches.onFetch
	}
	regClient, err := remote.New(remote.Options{
		OnFetch:        onFetch,
		HostsDir:       cfg.Registry.HostsDir,
		DockerConfig:   cfg.Registry.DockerConfig,
		RequestTimeout: time.Duration(cfg.Fetch.Timeout),
		Retries:        remoteRetries(cfg.Fetch.Retries),
		UserAgent:      "lazypull-snapshotter/" + versionString(),
	})
	if err != nil {
		store.Close()
		return nil, nil, fmt.Errorf("registry client: %w", err)
	}
	var recorder lfs.ImageRecorder
	var readLog *lfs.ReadLog
	if cfg.RecordDir != "" {
		if readLog, err = lfs.NewReadLog(cfg.RecordDir); err != nil {
			store.Close()
			return nil, nil, err
		}
		recorder = readLog
	}
	mgr, err := lfs.NewManager(lfs.ManagerOptions{
		Recorder:        recorder,
		Root:            root,
		Registry:        regClient,
		Store:           store,
		AllowUnverified: cfg.AllowUnverified,
		Layer: lfs.LayerOptions{
			FetchTimeout: time.Duration(cfg.Fetch.ReadTimeout),
			Observer:     observer,
		},
		// Opaque directories must carry the xattr the overlay mounts
		// stacked on the layers read: the snapshotter mounts them with
		// userxattr in a user namespace (see snapshot.Options.MountOptions).
		Mount: lfs.MountOptions{Passthrough: cfg.Fetch.Passthrough, UserXattr: userns.RunningInUserNS(), OnOp: m.FuseOp},
		Fetch: lfs.FetchOptions{Prefetch: cfg.Fetch.Prefetch, Background: cfg.Fetch.BackgroundFetch},
	})
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	l := &layerFS{mgr: mgr, store: store, allowUnverified: cfg.AllowUnverified, preloaded: map[digest.Digest]bool{}}
	m.mounts = func() int { return len(mgr.Mounts()) }
	closeFn := func() error {
		err := mgr.Close()
		if cerr := store.Close(); err == nil {
			err = cerr
		}
		if readLog != nil {
			if cerr := readLog.Close(); err == nil {
				err = cerr
			}
		}
		return err
	}
	return l, closeFn, nil
}

// remoteRetries maps the config's retry count to remote.Options.Retries,
// where 0 means "the default" (5) and a negative count disables retries:
// fetch.retries = 0 must mean no retries.
func remoteRetries(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

// orDisabled maps the config's "0 disables" to the cache's "< 0 disables".
func orDisabled(n int64) int64 {
	if n == 0 {
		return -1
	}
	return n
}

func sourceFromLabels(labels map[string]string) (lfs.LayerSource, error) {
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
func (l *layerFS) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	src, err := sourceFromLabels(labels)
	if err != nil {
		return err
	}
	// A layer without a TOC digest is refused (unless allow_unverified):
	// its image is most likely not eStargz at all, and reading its
	// neighbours' footers would be wasted requests.
	if src.TOCDigest != "" || l.allowUnverified {
		l.preloadNeighbours(ctx, src, labels[snapshot.LabelCRIImageLayers])
	}
	start := time.Now()
	if _, err := l.mgr.Mount(ctx, mountpoint, src); err != nil {
		return err
	}
	log.G(ctx).WithField("layer", src.Digest).WithField("took", time.Since(start)).Info("layer mounted lazily")
	return nil
}

// preloadNeighbours reads and saves the TOCs of the image's other layers
// in parallel, so that their Prepare calls, which containerd makes one
// after the other, find them ready. The TOCs are verified when those
// layers are mounted with their toc.digest labels.
func (l *layerFS) preloadNeighbours(ctx context.Context, src lfs.LayerSource, layers string) {
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
			if err := l.mgr.Preload(pctx, n); err != nil {
				log.G(pctx).WithError(err).WithField("layer", d).Debug("preloading neighbour layer failed")
			}
		}()
	}
}

// Check implements snapshot.LayerFS.
func (l *layerFS) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	m, ok := l.mgr.Lookup(mountpoint)
	if !ok {
		return fmt.Errorf("no layer mounted at %s: %w", mountpoint, errdefs.ErrNotFound)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return m.Check(cctx)
}

// Unmount implements snapshot.LayerFS.
func (l *layerFS) Unmount(ctx context.Context, mountpoint string) error {
	return l.mgr.Unmount(ctx, mountpoint)
}
