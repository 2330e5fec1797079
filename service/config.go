package service

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/lazypull/lazypull/cache"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/remote"
)

// minMemoryBudget is the smallest limits.memory_budget accepted: room for
// a few fetches of the largest chunks.
const minMemoryBudget = 64 << 20

// DefaultConfigPath is where the daemon looks for its configuration when
// --config is not given. A missing file there means "all defaults".
const DefaultConfigPath = "/etc/lazypull/config.toml"

// Config is the daemon's TOML configuration. Every key is optional and
// defaults to the value given in its comment; a key the daemon does not know
// is an error. Top-level keys must come before the first [section]:
//
//	root = "/var/lib/lazypull"
//	allow_unverified = false
//	record_dir = ""
//
//	[cache]
//	max_disk_bytes = 10737418240
//	max_memory_bytes = 33554432
//	pack_max_entry_bytes = 1048576
//
//	[fetch]
//	prefetch = true
//	background_fetch = true
//	timeout = "30s"
//	retries = 5
//	read_timeout = "60s"
//	passthrough = true
//	busy_lane_bytes = 131072
//	busy_lane_requests = 4
//
//	[registry]
//	hosts_dir = "/etc/containerd/certs.d"
//	docker_config = ""
//
//	[verify]
//	policy = "background"
//
//	[limits]
//	memory_budget = 536870912
//
//	[metrics]
//	address = ""
//	pprof = false
//
//	[cri]
//	enable = false
//	address = "/run/lazypull/cri.sock"
//	containerd_address = "/run/containerd/containerd.sock"
//
//	[credential_providers]
//	config = ""
//	bin_dir = ""
//	timeout = "1m"
//
//	[fuse_manager]
//	enable = true
//	address = ""
//
//	[profile]
//	record = true
//	lookup = true
//	push = false
//	dir = ""
type Config struct {
	// Root is the snapshotter's state directory (metadata.db, snapshots/).
	// Default "": the --root flag's value (/var/lib/lazypull). An explicit
	// --root wins over this key.
	Root string `toml:"root"`

	// RecordDir, when set, makes the daemon record what each image's
	// workload reads (fs.ReadLog): the files in the order they count as
	// read, one path per line, in <record_dir>/<image ref with / and :
	// replaced by _>.txt (pass it to `lazypull convert --prioritize` to
	// build an optimized image), and the chunks read in the same name plus
	// ".chunks". Passthrough is off while recording. Default "".
	RecordDir string `toml:"record_dir"`

	// AllowUnverified lets layers whose TOC cannot be checked against a
	// toc.digest label be served lazily anyway. Default false: such layers
	// fall back to a normal pull.
	AllowUnverified bool `toml:"allow_unverified"`

	Cache    CacheConfig    `toml:"cache"`
	Fetch    FetchConfig    `toml:"fetch"`
	Registry RegistryConfig `toml:"registry"`
	Verify   VerifyConfig   `toml:"verify"`
	Limits   LimitsConfig   `toml:"limits"`
	Metrics  MetricsConfig  `toml:"metrics"`

	CRI                 CRIConfig                 `toml:"cri"`
	CredentialProviders CredentialProvidersConfig `toml:"credential_providers"`
	FuseManager         FuseManagerConfig         `toml:"fuse_manager"`
	Profile             ProfileConfig             `toml:"profile"`
}

// ProfileConfig is the [profile] section: learned start-up profiles (see
// docs/profiles.md). A profile only orders fetches; it never changes what
// is served.
type ProfileConfig struct {
	// Record records, for each image, which chunks each layer served in
	// order during its start-up (from the first read until reads go quiet)
	// and saves the profile in Dir, merged with earlier runs. Default true.
	Record bool `toml:"record"`
	// Lookup, at the first mount of an image, looks for its profile (in
	// Dir, else as a referrer of the image manifest in its registry) off
	// the critical path, and fetches the chunks it names ahead of the
	// workload. Default true.
	Lookup bool `toml:"lookup"`
	// Push pushes the profile to the image's repository (an OCI artifact
	// whose subject is the image manifest) once a recording ends, with the
	// node's credentials; a failure is logged. Default false.
	Push bool `toml:"push"`
	// Dir holds the profiles. Default "": <root>/profiles.
	Dir string `toml:"dir"`
}

// FuseManagerConfig is the [fuse_manager] section: with Enable (the
// default), the layers' FUSE file systems are served by a separate
// long-lived process (the fuse manager, `lazypull-snapshotter
// fuse-manager`) that the daemon starts if it is not running and drives
// over a unix socket, so that running containers keep their layers when
// the daemon is killed, restarted or upgraded. The manager reads the same
// configuration; it reports layers that fail verification, its metrics
// and its fetch log to the daemon, and asks the daemon for the
// credentials the [cri] proxy captures. See docs/architecture.md,
// "Restarts".
type FuseManagerConfig struct {
	// Enable serves the layers from the fuse manager. Default true.
	// false makes the daemon serve them itself, in its own process: they
	// go away with it, and containers using them see "transport endpoint
	// is not connected" after a daemon restart until they are recreated.
	Enable bool `toml:"enable"`
	// Address is the manager's unix socket. Default "": <root>/fuse-manager.sock.
	Address string `toml:"address"`
}

// CRIConfig is the [cri] section: the CRI image-service proxy kubelet's
// image endpoint points at (see docs/kubernetes.md).
type CRIConfig struct {
	// Enable serves the proxy. Default false.
	Enable bool `toml:"enable"`
	// Address is the unix socket the proxy serves on. Default
	// "/run/lazypull/cri.sock".
	Address string `toml:"address"`
	// ContainerdAddress is containerd's CRI socket the proxy forwards to.
	// Default "/run/containerd/containerd.sock".
	ContainerdAddress string `toml:"containerd_address"`
}

// CredentialProvidersConfig is the [credential_providers] section: the
// kubelet credential-provider exec plugins the daemon runs itself.
type CredentialProvidersConfig struct {
	// Config is a kubelet CredentialProviderConfig file (the one
	// kubelet's --image-credential-provider-config names). Default "":
	// no plugins.
	Config string `toml:"config"`
	// BinDir holds the plugins (kubelet's
	// --image-credential-provider-bin-dir). Required with Config.
	BinDir string `toml:"bin_dir"`
	// Timeout bounds one plugin run. Default "1m"; must be positive.
	Timeout Duration `toml:"timeout"`
}

// VerifyConfig is the [verify] section: proving lazily served layers.
type VerifyConfig struct {
	// Policy is "background" (default): once a layer is mounted and its
	// reads have gone quiet, the daemon streams its whole blob once and
	// proves that the blob digest is the manifest's, that the tar stream
	// is exactly what the TOC serves, and that its DiffID gives the chain
	// ID containerd commits the snapshot under. A layer that differs is
	// failed closed: every read returns EIO, its snapshot is removed when
	// nothing uses it, and it is never served again. Until the check ends
	// a layer is served on its TOC and chunk digests. The stream also
	// fills the chunk cache, so it replaces the background fetch.
	//
	// "off" serves layers on their TOC and chunk digests alone: UNSAFE on
	// a node that runs images of more than one owner, since an image can
	// then commit a layer whose files differ from the tar its digest and
	// DiffID name, and every image sharing that layer sees its files.
	Policy string `toml:"policy"`
}

// LimitsConfig is the [limits] section: what hostile (or merely huge)
// images may make the daemon spend.
type LimitsConfig struct {
	// MemoryBudget bounds, in bytes, the memory of the TOC indexes of all
	// mounted layers (at most 3/4 of it) together with the TOCs being
	// read and parsed and the chunks being fetched and decoded. A layer
	// whose index does not fit is not mounted (containerd pulls it the
	// ordinary way); fetches wait for each other. Default 536870912
	// (512 MiB, half the systemd unit's MemoryHigh); 0 means unbounded
	// (each TOC is then bounded by the TOC limits alone: UNSAFE with
	// untrusted images). The memory chunk cache is bounded separately.
	MemoryBudget int64 `toml:"memory_budget"`
}

// CacheConfig is the [cache] section: the chunk cache.
type CacheConfig struct {
	// MaxDiskBytes bounds the on-disk chunk cache (under root). Default
	// 10 GiB; 0 disables the disk cache.
	MaxDiskBytes int64 `toml:"max_disk_bytes"`
	// MaxMemoryBytes bounds the in-memory chunk cache. Default 32 MiB;
	// 0 disables the memory cache.
	MaxMemoryBytes int64 `toml:"max_memory_bytes"`
	// PackMaxEntryBytes is the largest chunk appended to the disk cache's
	// pack files instead of getting a file of its own (a file per chunk
	// costs an inode each). Default 1 MiB; 0 gives every chunk a file.
	PackMaxEntryBytes int64 `toml:"pack_max_entry_bytes"`
}

// FetchConfig is the [fetch] section: how layer data is fetched.
type FetchConfig struct {
	// Prefetch fetches a layer's prioritized files (those before the
	// .prefetch.landmark) right after mounting it. Default true.
	Prefetch bool `toml:"prefetch"`
	// BackgroundFetch fetches the rest of each layer in the background,
	// below foreground reads. Default true.
	BackgroundFetch bool `toml:"background_fetch"`
	// Timeout bounds one registry request, as a Go duration ("30s",
	// "1m30s"). Default 30s; must be positive.
	Timeout Duration `toml:"timeout"`
	// Retries is how often a failed request is retried. Default 5.
	Retries int `toml:"retries"`
	// ReadTimeout bounds how long a read of data that is not cached may
	// wait for the registry, retries included; after it the read fails
	// with EIO instead of hanging. Default "60s"; must be positive.
	ReadTimeout Duration `toml:"read_timeout"`
	// Passthrough lets the kernel read cached single-chunk files directly
	// from the cache (FUSE passthrough, Linux >= 6.9; ignored where the
	// kernel does not support it). Default true.
	Passthrough bool `toml:"passthrough"`
	// BusyLaneBytes is the size of a speculative request (a missed file's
	// neighbourhood, the rest of a layer) that may run while reads are
	// fetching, so that the link stays busy without delaying them much:
	// a read shares the link with at most BusyLaneRequests of them.
	// Default 131072 (128 KiB); 0 turns the lane off (speculation then
	// waits until reads have been quiet for 100 ms).
	BusyLaneBytes int64 `toml:"busy_lane_bytes"`
	// BusyLaneRequests is how many such requests may be in flight at
	// once. Default 4; must be at least 1.
	BusyLaneRequests int `toml:"busy_lane_requests"`
}

// RegistryConfig is the [registry] section: reaching registries.
type RegistryConfig struct {
	// HostsDir is containerd's hosts.toml directory (mirrors, TLS,
	// per-host settings). Default "/etc/containerd/certs.d".
	HostsDir string `toml:"hosts_dir"`
	// DockerConfig is the docker config.json holding credentials.
	// Default "": the usual places ($DOCKER_CONFIG, ~/.docker/config.json).
	DockerConfig string `toml:"docker_config"`
}

// MetricsConfig is the [metrics] section.
type MetricsConfig struct {
	// Address is a TCP address ("127.0.0.1:9090") on which Prometheus
	// metrics are served at /metrics, and the log of registry requests
	// (for lazypull bench timelines) at /debug/fetches. Default "": no
	// metrics endpoint.
	Address string `toml:"address"`
	// Pprof also serves Go's profiler (net/http/pprof) under
	// /debug/pprof/ on that address, to profile the daemon's CPU during
	// a cold start. Default false: the profiler can stall the daemon and
	// shows its internals, so it is for debugging hosts only.
	Pprof bool `toml:"pprof"`
}

// Duration is a time.Duration written as a Go duration string in TOML.
type Duration time.Duration

// UnmarshalText parses a duration such as "30s".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText formats the duration like time.Duration.String.
func (d Duration) MarshalText() ([]byte, error) {
	return []byte(time.Duration(d).String()), nil
}

// DefaultConfig returns the configuration used when no file is given.
func DefaultConfig() *Config {
	return &Config{
		Cache: CacheConfig{
			MaxDiskBytes:      cache.DefaultMaxDiskBytes,
			MaxMemoryBytes:    32 << 20,
			PackMaxEntryBytes: cache.DefaultPackMaxEntry,
		},
		Fetch: FetchConfig{
			Prefetch:         true,
			BackgroundFetch:  true,
			Timeout:          Duration(remote.DefaultRequestTimeout),
			Retries:          remote.DefaultRetries,
			ReadTimeout:      Duration(lfs.DefaultFetchTimeout),
			Passthrough:      true,
			BusyLaneBytes:    lfs.DefaultBusyBytes,
			BusyLaneRequests: lfs.DefaultBusyDepth,
		},
		Registry: RegistryConfig{
			HostsDir: "/etc/containerd/certs.d",
		},
		Verify: VerifyConfig{Policy: VerifyBackground},
		Limits: LimitsConfig{MemoryBudget: lfs.DefaultMemoryBudget},
		CRI: CRIConfig{
			Address:           "/run/lazypull/cri.sock",
			ContainerdAddress: "/run/containerd/containerd.sock",
		},
		CredentialProviders: CredentialProvidersConfig{
			Timeout: Duration(time.Minute),
		},
		Profile:     ProfileConfig{Record: true, Lookup: true},
		FuseManager: FuseManagerConfig{Enable: true},
	}
}

// LoadConfig reads the configuration at path over the defaults. A missing
// file is fine unless mustExist (the path was given explicitly).
func LoadConfig(path string, mustExist bool) (*Config, error) {
	cfg := DefaultConfig()
	md, err := toml.DecodeFile(path, cfg)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && !mustExist {
			return cfg, nil
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if undecoded := md.Undecoded(); len(undecoded) > 0 {
		keys := make([]string, len(undecoded))
		for i, k := range undecoded {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("config %s: unknown key(s): %s", path, strings.Join(keys, ", "))
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Validate reports values that are out of range.
func (c *Config) Validate() error {
	var errs []error
	if c.Cache.MaxDiskBytes < 0 {
		errs = append(errs, fmt.Errorf("cache.max_disk_bytes must not be negative (%d)", c.Cache.MaxDiskBytes))
	}
	if c.Cache.MaxMemoryBytes < 0 {
		errs = append(errs, fmt.Errorf("cache.max_memory_bytes must not be negative (%d)", c.Cache.MaxMemoryBytes))
	}
	if c.Cache.PackMaxEntryBytes < 0 {
		errs = append(errs, fmt.Errorf("cache.pack_max_entry_bytes must not be negative (%d)", c.Cache.PackMaxEntryBytes))
	}
	if c.Fetch.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("fetch.timeout must be positive (%s)", time.Duration(c.Fetch.Timeout)))
	}
	if c.Fetch.ReadTimeout <= 0 {
		errs = append(errs, fmt.Errorf("fetch.read_timeout must be positive (%s)", time.Duration(c.Fetch.ReadTimeout)))
	}
	if c.Fetch.Retries < 0 {
		errs = append(errs, fmt.Errorf("fetch.retries must not be negative (%d)", c.Fetch.Retries))
	}
	if c.Fetch.BusyLaneBytes < 0 {
		errs = append(errs, fmt.Errorf("fetch.busy_lane_bytes must not be negative (%d)", c.Fetch.BusyLaneBytes))
	}
	if c.Fetch.BusyLaneRequests < 1 {
		errs = append(errs, fmt.Errorf("fetch.busy_lane_requests must be at least 1 (%d)", c.Fetch.BusyLaneRequests))
	}
	if c.Limits.MemoryBudget < 0 {
		errs = append(errs, fmt.Errorf("limits.memory_budget must not be negative (%d)", c.Limits.MemoryBudget))
	} else if c.Limits.MemoryBudget > 0 && c.Limits.MemoryBudget < minMemoryBudget {
		errs = append(errs, fmt.Errorf("limits.memory_budget must be 0 (unbounded) or at least %d (%d)", minMemoryBudget, c.Limits.MemoryBudget))
	}
	switch c.Verify.Policy {
	case VerifyBackground, VerifyOff:
	default:
		errs = append(errs, fmt.Errorf("verify.policy must be %q or %q (%q)", VerifyBackground, VerifyOff, c.Verify.Policy))
	}
	if c.CRI.Enable && (c.CRI.Address == "" || c.CRI.ContainerdAddress == "") {
		errs = append(errs, errors.New("cri.address and cri.containerd_address must be set when cri.enable is true"))
	}
	if c.CredentialProviders.Config != "" && c.CredentialProviders.BinDir == "" {
		errs = append(errs, errors.New("credential_providers.bin_dir must be set with credential_providers.config"))
	}
	if c.CredentialProviders.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("credential_providers.timeout must be positive (%s)", time.Duration(c.CredentialProviders.Timeout)))
	}
	return errors.Join(errs...)
}
