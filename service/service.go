package service

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/moby/sys/userns"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazypull/lazypull/cache"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/keychain"
	"github.com/lazypull/lazypull/remote"
)

// Options says where a Service keeps its state and what it talks to.
type Options struct {
	// Config is the configuration; nil means DefaultConfig(). Its Root is
	// not used: Root below is.
	Config *Config

	// Root holds the layer metadata (saved TOCs and indexes) and, unless
	// CacheDir is set, the chunk cache in Root/cache. Required.
	Root string

	// CacheDir is the chunk cache's directory; "" means Root/cache.
	CacheDir string

	// Registry is the registry client to fetch with; nil builds one from
	// Config.Registry and Config.Fetch.
	Registry *remote.Registry

	// UserAgent is sent with registry requests of a client built here.
	UserAgent string

	// Metrics, when set, receives the Prometheus metrics of fetches, the
	// cache, FUSE operations and mounts.
	Metrics prometheus.Registerer

	// OnFetch, when set, is told about every registry request of a
	// registry client built here (the daemon's fetch log).
	OnFetch func(remote.FetchEvent)

	// WrapObserver, when set, wraps the layers' fs.Observer (the metrics,
	// or nil without them), to see fetches as the layers count them.
	WrapObserver func(lfs.Observer) lfs.Observer

	// CapturedCredentials, when set, is where the registry client built
	// here looks up the credentials captured from CRI pulls instead of
	// Service.Captured: the fuse manager asks the daemon, whose CRI proxy
	// captures them.
	CapturedCredentials keychain.Source
}

// Service is one wiring of the chunk cache, the registry client and the
// layer manager.
type Service struct {
	// Config is the configuration the service runs with.
	Config *Config
	// Store is the verified chunk cache.
	Store *cache.Store
	// Registry is the registry client.
	Registry *remote.Registry
	// Manager mounts and tracks layers.
	Manager *lfs.Manager
	// Captured holds the credentials the CRI proxy captures from kubelet's
	// pulls; the registry client built here tries them first when
	// [cri] or [credential_providers] is configured.
	Captured *keychain.Captured

	readLog  *lfs.ReadLog
	profiles *profiles // nil when [profile] record and lookup are off
	verifier *verifier // nil when verify.policy is off
	layerFS  *LayerFS
}

// New opens the chunk cache, builds the registry client (unless given) and
// the layer manager. Close releases them.
func New(ctx context.Context, o Options) (*Service, error) {
	cfg := o.Config
	if cfg == nil {
		cfg = DefaultConfig()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if o.Root == "" {
		return nil, errors.New("service: no state directory (Options.Root)")
	}
	cacheDir := o.CacheDir
	if cacheDir == "" {
		cacheDir = filepath.Join(o.Root, "cache")
	}
	store, err := cache.Open(cache.Options{
		Dir:            cacheDir,
		MaxDiskBytes:   orDisabled(cfg.Cache.MaxDiskBytes),
		MaxMemoryBytes: orDisabled(cfg.Cache.MaxMemoryBytes),
		PackMaxEntry:   cfg.Cache.PackMaxEntryBytes,
	})
	if err != nil {
		return nil, fmt.Errorf("opening the chunk cache %s: %w", cacheDir, err)
	}
	s := &Service{Config: cfg, Store: store, Registry: o.Registry, Captured: keychain.NewCaptured()}
	fail := func(err error) (*Service, error) {
		if cerr := s.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, err
	}
	if s.Registry == nil {
		ua := o.UserAgent
		if ua == "" {
			ua = remote.DefaultUserAgent
		}
		var captured keychain.Source = s.Captured
		if o.CapturedCredentials != nil {
			captured = o.CapturedCredentials
		}
		kc, err := s.keychain(ctx, captured)
		if err != nil {
			return fail(err)
		}
		s.Registry, err = remote.New(remote.Options{
			HostsDir:       cfg.Registry.HostsDir,
			DockerConfig:   cfg.Registry.DockerConfig,
			Keychain:       kc,
			RequestTimeout: time.Duration(cfg.Fetch.Timeout),
			Retries:        remoteRetries(cfg.Fetch.Retries),
			UserAgent:      ua,
			OnFetch:        o.OnFetch,
		})
		if err != nil {
			return fail(fmt.Errorf("registry client: %w", err))
		}
	}
	var recorder lfs.ImageRecorder
	if cfg.RecordDir != "" {
		if s.readLog, err = lfs.NewReadLog(cfg.RecordDir); err != nil {
			return fail(err)
		}
		recorder = s.readLog
	}
	var m *metrics
	layerOpts := lfs.LayerOptions{
		FetchTimeout: time.Duration(cfg.Fetch.ReadTimeout),
		// One Scheduler for all layers: the busy lane bounds speculation
		// beside reads across the whole link.
		Scheduler: lfs.NewScheduler(lfs.DefaultMaxBackground,
			lfs.WithBusyBackground(cfg.Fetch.BusyLaneBytes), lfs.WithBusyDepth(cfg.Fetch.BusyLaneRequests)),
	}
	if cfg.Profile.Record || cfg.Profile.Lookup {
		dir := cfg.Profile.Dir
		if dir == "" {
			dir = filepath.Join(o.Root, "profiles")
		}
		if s.profiles, err = newProfiles(cfg.Profile, dir, s.Registry, s.mountedLayers); err != nil {
			return fail(err)
		}
		if cfg.Profile.Record {
			// A layer recorder keeps passthrough on (cheap); an image
			// recorder (record_dir) turns it off and gets the reads too.
			if recorder != nil {
				recorder = imageRecorder{p: s.profiles, also: recorder}
			} else {
				layerOpts.Recorder = s.profiles
			}
		}
	}
	// Opaque directories must carry the xattr the overlay mounts stacked
	// on the layers read: the snapshotter mounts them with userxattr in a
	// user namespace (see snapshot.Options.MountOptions).
	mountOpts := lfs.MountOptions{Passthrough: cfg.Fetch.Passthrough, UserXattr: userns.RunningInUserNS()}
	if o.Metrics != nil {
		m = newMetrics(o.Metrics, store)
		layerOpts.Observer = m
		mountOpts.OnOp = m.FuseOp
	}
	if o.WrapObserver != nil {
		layerOpts.Observer = o.WrapObserver(layerOpts.Observer)
	}
	fetch := lfs.FetchOptions{Prefetch: cfg.Fetch.Prefetch, Background: cfg.Fetch.BackgroundFetch}
	if cfg.Verify.Policy == VerifyBackground {
		s.verifier, err = newVerifier(filepath.Join(o.Root, "verify"), s.Registry, store, m)
		if err != nil {
			return fail(err)
		}
		s.verifier.observer = layerOpts.Observer
		// The verification stream brings every chunk into the cache:
		// a chunk-by-chunk background fetch would fetch them twice.
		fetch.Background = false
	}
	s.Manager, err = lfs.NewManager(lfs.ManagerOptions{
		Recorder:        recorder,
		Root:            o.Root,
		Registry:        s.Registry,
		Store:           store,
		AllowUnverified: cfg.AllowUnverified,
		Budget:          lfs.NewMemoryBudget(cfg.Limits.MemoryBudget),
		Layer:           layerOpts,
		Mount:           mountOpts,
		Fetch:           fetch,
	})
	if err != nil {
		return fail(err)
	}
	if m != nil {
		m.mounts = func() int { return len(s.Manager.Mounts()) }
	}
	return s, nil
}

// mountedLayers lists the layers mounted now.
func (s *Service) mountedLayers() []*lfs.Layer {
	if s.Manager == nil {
		return nil
	}
	var out []*lfs.Layer
	for _, m := range s.Manager.Mounts() {
		if l := m.Layer(); l != nil {
			out = append(out, l)
		}
	}
	return out
}

// keychain returns the Kubernetes credential chain (CRI-captured, then
// credential-provider plugins, then the docker config) when the config
// asks for CRI or plugins, and nil (the docker config alone) otherwise.
func (s *Service) keychain(ctx context.Context, captured keychain.Source) (remote.CredentialSource, error) {
	cfg := s.Config
	if !cfg.CRI.Enable && cfg.CredentialProviders.Config == "" {
		return nil, nil
	}
	var providers keychain.Source
	if cfg.CredentialProviders.Config != "" {
		p, err := keychain.LoadProviders(ctx, keychain.ProvidersOptions{
			ConfigPath: cfg.CredentialProviders.Config,
			BinDir:     cfg.CredentialProviders.BinDir,
			Timeout:    time.Duration(cfg.CredentialProviders.Timeout),
		})
		if err != nil {
			return nil, err
		}
		providers = p
	}
	return keychain.New(captured, providers, keychain.DockerConfig(cfg.Registry.DockerConfig)), nil
}

// LayerFS returns the adapter the snapshotter mounts remote snapshots with.
func (s *Service) LayerFS() *LayerFS {
	if s.layerFS == nil {
		s.layerFS = NewLayerFS(s.Manager, s.Config.AllowUnverified)
		s.layerFS.verifier = s.verifier
		s.layerFS.profiles = s.profiles
		s.layerFS.manifests = s.Registry
	}
	return s.layerFS
}

// OnLayerFailed sets what is told about a layer that failed verification
// (the snapshotter, which stops offering its snapshot for reuse).
func (s *Service) OnLayerFailed(fn func(ctx context.Context, mountpoint string, err error)) {
	s.OnLayerFailure(func(ctx context.Context, f LayerFailure) { fn(ctx, f.Mountpoint, f.Err) })
}

// LayerFailure describes a layer that failed whole-layer verification.
type LayerFailure struct {
	// Mountpoint is where the layer is mounted.
	Mountpoint string
	// Image is the image reference it was mounted for, Layer its blob
	// digest and ChainID the chain ID containerd commits it under.
	Image   string
	Layer   digest.Digest
	ChainID string
	// Err says how it differs from what its image commits to.
	Err error
}

// OnLayerFailure is OnLayerFailed with what names the layer (the fuse
// manager reports it to the daemon). It replaces what OnLayerFailed set.
func (s *Service) OnLayerFailure(fn func(ctx context.Context, f LayerFailure)) {
	if s.verifier != nil {
		h := failureHandler(fn)
		s.verifier.onFail.Store(&h)
	}
}

// Close unmounts every layer and closes the cache and the read log.
func (s *Service) Close() error {
	var errs []error
	// Recordings in progress are saved before their layers go away.
	s.profiles.close()
	if s.verifier != nil {
		s.verifier.close()
	}
	if s.Manager != nil {
		if err := s.Manager.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing the layer manager: %w", err))
		}
	}
	if err := s.Store.Close(); err != nil {
		errs = append(errs, fmt.Errorf("closing the chunk cache: %w", err))
	}
	if s.readLog != nil {
		if err := s.readLog.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing the read log: %w", err))
		}
	}
	return errors.Join(errs...)
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
