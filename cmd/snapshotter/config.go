package main

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
//
//	[fetch]
//	prefetch = true
//	background_fetch = true
//	timeout = "30s"
//	retries = 5
//	read_timeout = "60s"
//	passthrough = true
//
//	[registry]
//	hosts_dir = "/etc/containerd/certs.d"
//	docker_config = ""
//
//	[metrics]
//	address = ""
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
	Metrics  MetricsConfig  `toml:"metrics"`
}

// CacheConfig is the [cache] section: the chunk cache.
type CacheConfig struct {
	// MaxDiskBytes bounds the on-disk chunk cache (under root). Default
	// 10 GiB; 0 disables the disk cache.
	MaxDiskBytes int64 `toml:"max_disk_bytes"`
	// MaxMemoryBytes bounds the in-memory chunk cache. Default 32 MiB;
	// 0 disables the memory cache.
	MaxMemoryBytes int64 `toml:"max_memory_bytes"`
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
	// metrics are served at /metrics. Default "": no metrics endpoint.
	Address string `toml:"address"`
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
			MaxDiskBytes:   cache.DefaultMaxDiskBytes,
			MaxMemoryBytes: 32 << 20,
		},
		Fetch: FetchConfig{
			Prefetch:        true,
			BackgroundFetch: true,
			Timeout:         Duration(remote.DefaultRequestTimeout),
			Retries:         remote.DefaultRetries,
			ReadTimeout:     Duration(lfs.DefaultFetchTimeout),
			Passthrough:     true,
		},
		Registry: RegistryConfig{
			HostsDir: "/etc/containerd/certs.d",
		},
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
	if c.Fetch.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("fetch.timeout must be positive (%s)", time.Duration(c.Fetch.Timeout)))
	}
	if c.Fetch.ReadTimeout <= 0 {
		errs = append(errs, fmt.Errorf("fetch.read_timeout must be positive (%s)", time.Duration(c.Fetch.ReadTimeout)))
	}
	if c.Fetch.Retries < 0 {
		errs = append(errs, fmt.Errorf("fetch.retries must not be negative (%d)", c.Fetch.Retries))
	}
	return errors.Join(errs...)
}
