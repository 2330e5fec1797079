package service

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestLoadConfigMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "config.toml")
	cfg, err := LoadConfig(missing, false)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, DefaultConfig()) {
		t.Fatalf("missing default config: got %+v, want defaults", cfg)
	}
	if !cfg.FuseManager.Enable {
		t.Error("fuse_manager.enable defaults to false; the default is the fuse manager (running containers survive daemon restarts)")
	}
	if _, err := LoadConfig(missing, true); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("missing explicit config: want an error naming it, got %v", err)
	}
}

func TestLoadConfigFull(t *testing.T) {
	p := writeConfig(t.TempDir(), `
root = "/srv/lazypull"
allow_unverified = true

[cache]
max_disk_bytes = 1000
max_memory_bytes = 0
pack_max_entry_bytes = 0

[fetch]
prefetch = false
background_fetch = false
timeout = "1m30s"
retries = 0
read_timeout = "45s"
passthrough = false
busy_lane_bytes = 0
busy_lane_requests = 3

[registry]
hosts_dir = "/etc/hosts.d"
docker_config = "/root/.docker/config.json"

[verify]
policy = "off"

[limits]
memory_budget = 0

[metrics]
address = "127.0.0.1:9999"
pprof = true

[cri]
enable = true
address = "/run/lp/cri.sock"
containerd_address = "/run/k3s/containerd.sock"

[credential_providers]
config = "/etc/kubernetes/credential-providers.yaml"
bin_dir = "/usr/libexec/kubernetes/credential-providers"
timeout = "10s"

[profile]
record = false
lookup = true
push = true
dir = "/srv/profiles"

[fuse_manager]
enable = false
address = "/run/lp/fm.sock"
`)
	cfg, err := LoadConfig(p, true)
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Root:            "/srv/lazypull",
		AllowUnverified: true,
		Cache:           CacheConfig{MaxDiskBytes: 1000, MaxMemoryBytes: 0},
		Fetch:           FetchConfig{Timeout: Duration(90 * time.Second), ReadTimeout: Duration(45 * time.Second), BusyLaneRequests: 3},
		Registry:        RegistryConfig{HostsDir: "/etc/hosts.d", DockerConfig: "/root/.docker/config.json"},
		Verify:          VerifyConfig{Policy: VerifyOff},
		Limits:          LimitsConfig{MemoryBudget: 0},
		Metrics:         MetricsConfig{Address: "127.0.0.1:9999", Pprof: true},
		CRI:             CRIConfig{Enable: true, Address: "/run/lp/cri.sock", ContainerdAddress: "/run/k3s/containerd.sock"},
		CredentialProviders: CredentialProvidersConfig{
			Config:  "/etc/kubernetes/credential-providers.yaml",
			BinDir:  "/usr/libexec/kubernetes/credential-providers",
			Timeout: Duration(10 * time.Second),
		},
		Profile:     ProfileConfig{Record: false, Lookup: true, Push: true, Dir: "/srv/profiles"},
		FuseManager: FuseManagerConfig{Enable: false, Address: "/run/lp/fm.sock"},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("got %+v\nwant %+v", cfg, want)
	}
}

func TestLoadConfigPartialKeepsDefaults(t *testing.T) {
	cfg, err := LoadConfig(writeConfig(t.TempDir(), "[fetch]\nretries = 2\n"), true)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	want.Fetch.Retries = 2
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("got %+v, want %+v", cfg, want)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	for _, tc := range []struct{ content, want string }{
		{"rot = \"/x\"\n", "unknown key(s): rot"},
		{"[cache]\nmax_disk = 1\n[metrics]\naddr = \"x\"\n", "unknown key(s): cache.max_disk, metrics.addr"},
		{"[fetcher]\ntimeout = \"1s\"\n", "unknown key(s): fetcher"},
		{"[fetch]\ntimeout = \"soon\"\n", "soon"},
		{"[fetch]\ntimeout = \"0s\"\n", "fetch.timeout must be positive"},
		{"[fetch]\nretries = -1\n", "fetch.retries must not be negative"},
		{"[fetch]\nbusy_lane_bytes = -1\n", "fetch.busy_lane_bytes must not be negative"},
		{"[fetch]\nbusy_lane_requests = 0\n", "fetch.busy_lane_requests must be at least 1"},
		{"[cache]\nmax_disk_bytes = -5\n", "cache.max_disk_bytes must not be negative"},
		{"[cache]\npack_max_entry_bytes = -1\n", "cache.pack_max_entry_bytes must not be negative"},
		{"[fetch]\nretries = \"five\"\n", "retries"},
		{"[verify]\npolicy = \"sometimes\"\n", "verify.policy must be \"background\" or \"off\""},
		{"[limits]\nmemory_budget = -1\n", "limits.memory_budget must not be negative"},
		{"[limits]\nmemory_budget = 1048576\n", "limits.memory_budget must be 0 (unbounded) or at least"},
		{"this is not toml", "config"},
	} {
		p := filepath.Join(t.TempDir(), "c.toml")
		if err := os.WriteFile(p, []byte(tc.content), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := LoadConfig(p, true)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("config %q: want error naming the file and containing %q, got %v", tc.content, tc.want, err)
		}
	}
}

func TestRemoteRetries(t *testing.T) {
	// remote.Options.Retries: 0 is the default (5), negative is none.
	for in, want := range map[int]int{0: -1, 1: 1, 5: 5} {
		if got := remoteRetries(in); got != want {
			t.Errorf("remoteRetries(%d) = %d, want %d", in, got, want)
		}
	}
}

func writeConfig(dir, content string) string {
	p := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		panic(err)
	}
	return p
}

func TestKubernetesConfigValidation(t *testing.T) {
	for name, body := range map[string]string{
		"cri without address":       "[cri]\nenable = true\naddress = \"\"\n",
		"providers without bin dir": "[credential_providers]\nconfig = \"/etc/cp.yaml\"\n",
		"zero plugin timeout":       "[credential_providers]\ntimeout = \"0s\"\n",
	} {
		if _, err := LoadConfig(writeConfig(t.TempDir(), body), true); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
