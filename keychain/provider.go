package keychain

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sync/singleflight"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubeletconfig "k8s.io/kubelet/config/v1"
	credentialprovider "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
	"sigs.k8s.io/yaml"

	"github.com/lazypull/lazypull/remote"
)

// API versions and kinds of the kubelet credential-provider protocol.
const (
	ConfigAPIVersion   = "kubelet.config.k8s.io/v1"
	ConfigKind         = "CredentialProviderConfig"
	PluginAPIVersion   = "credentialprovider.kubelet.k8s.io/v1"
	requestKind        = "CredentialProviderRequest"
	responseKind       = "CredentialProviderResponse"
	maxPluginOutput    = 1 << 20
	maxPluginStderr    = 512
	maxCacheBeforeGC   = 256
	globalCacheKey     = "global"
	DefaultExecTimeout = time.Minute
)

// ProvidersOptions configures [LoadProviders].
type ProvidersOptions struct {
	// ConfigPath is a CredentialProviderConfig file (YAML or JSON), the
	// one kubelet's --image-credential-provider-config names.
	ConfigPath string
	// BinDir holds the plugin executables, named like the providers
	// (kubelet's --image-credential-provider-bin-dir).
	BinDir string
	// Timeout bounds one plugin run. Default DefaultExecTimeout.
	Timeout time.Duration
	// Now is the clock for cache expiry. Default time.Now.
	Now func() time.Time
}

// Providers runs kubelet credential-provider exec plugins. It is a
// Source, safe for concurrent use. Plugins run outside any lock; concurrent
// lookups of the same image share one run.
type Providers struct {
	providers []*provider
	timeout   time.Duration
	now       func() time.Time
}

type provider struct {
	name       string
	path       string
	apiVersion string
	match      []string
	args       []string
	env        []string
	defaultTTL time.Duration

	group singleflight.Group
	mu    sync.Mutex
	cache map[string]cacheEntry
}

type cacheEntry struct {
	auth    map[string]credentialprovider.AuthConfig
	expires time.Time
}

// LoadProviders reads a CredentialProviderConfig and checks that each
// provider's plugin exists in BinDir. Providers that need service account
// tokens (tokenAttributes) are left out with a warning: they need a pod,
// which the snapshotter does not have.
func LoadProviders(ctx context.Context, opts ProvidersOptions) (*Providers, error) {
	b, err := os.ReadFile(opts.ConfigPath)
	if err != nil {
		return nil, fmt.Errorf("credential provider config: %w", err)
	}
	var cfg kubeletconfig.CredentialProviderConfig
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", opts.ConfigPath, err)
	}
	if cfg.Kind != ConfigKind || (cfg.APIVersion != ConfigAPIVersion && cfg.APIVersion != "kubelet.config.k8s.io/v1beta1") {
		return nil, fmt.Errorf("credential provider config %s: want kind %s, apiVersion %s; got %q, %q",
			opts.ConfigPath, ConfigKind, ConfigAPIVersion, cfg.Kind, cfg.APIVersion)
	}
	p := &Providers{timeout: opts.Timeout, now: opts.Now}
	if p.timeout <= 0 {
		p.timeout = DefaultExecTimeout
	}
	if p.now == nil {
		p.now = time.Now
	}
	seen := map[string]bool{}
	for i, c := range cfg.Providers {
		prov, err := newProvider(c, opts.BinDir)
		if err != nil {
			return nil, fmt.Errorf("credential provider config %s: providers[%d]: %w", opts.ConfigPath, i, err)
		}
		if seen[c.Name] {
			return nil, fmt.Errorf("credential provider config %s: provider %q appears twice", opts.ConfigPath, c.Name)
		}
		seen[c.Name] = true
		if c.TokenAttributes != nil {
			log.G(ctx).WithField("provider", c.Name).Warn("keychain: credential provider needs service account tokens (tokenAttributes), which lazypull cannot supply; skipped")
			continue
		}
		p.providers = append(p.providers, prov)
	}
	return p, nil
}

func newProvider(c kubeletconfig.CredentialProvider, binDir string) (*provider, error) {
	if c.Name == "" || c.Name == "." || c.Name == ".." || strings.ContainsAny(c.Name, `/\`) {
		return nil, fmt.Errorf("invalid provider name %q", c.Name)
	}
	if len(c.MatchImages) == 0 {
		return nil, fmt.Errorf("provider %q: matchImages is empty", c.Name)
	}
	for _, m := range c.MatchImages {
		if err := validPattern(m); err != nil {
			return nil, fmt.Errorf("provider %q: %w", c.Name, err)
		}
	}
	if c.DefaultCacheDuration == nil || c.DefaultCacheDuration.Duration < 0 {
		return nil, fmt.Errorf("provider %q: defaultCacheDuration must be set and not negative", c.Name)
	}
	if c.APIVersion != PluginAPIVersion {
		return nil, fmt.Errorf("provider %q: apiVersion %q is not supported (want %s)", c.Name, c.APIVersion, PluginAPIVersion)
	}
	if binDir == "" {
		return nil, fmt.Errorf("provider %q: no plugin directory configured", c.Name)
	}
	path := filepath.Join(binDir, c.Name)
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("provider %q: plugin: %w", c.Name, err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("provider %q: plugin %s is not an executable file", c.Name, path)
	}
	p := &provider{
		name:       c.Name,
		path:       path,
		apiVersion: c.APIVersion,
		match:      c.MatchImages,
		args:       c.Args,
		defaultTTL: c.DefaultCacheDuration.Duration,
		cache:      map[string]cacheEntry{},
	}
	for _, e := range c.Env {
		if e.Name == "" || strings.Contains(e.Name, "=") {
			return nil, fmt.Errorf("provider %q: invalid env name %q", c.Name, e.Name)
		}
		p.env = append(p.env, e.Name+"="+e.Value)
	}
	return p, nil
}

// Names lists the providers in use, in order.
func (p *Providers) Names() []string {
	var out []string
	for _, prov := range p.providers {
		out = append(out, prov.name)
	}
	return out
}

// Lookup asks the providers whose matchImages match repo, in
// configuration order, and returns the credentials of the first answer
// with an auth entry matching repo (the most specific entry when several
// match). Answers come from the cache while it is fresh.
func (p *Providers) Lookup(ctx context.Context, repo, _ string) (remote.Credential, bool, error) {
	var errs []error
	for _, prov := range p.providers {
		if !slices.ContainsFunc(prov.match, func(m string) bool { return matchImage(m, repo) }) {
			continue
		}
		auth, err := p.auth(ctx, prov, repo)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if a, ok := pickAuth(auth, repo); ok {
			return remote.Credential{Username: a.Username, Secret: a.Password}, true, nil
		}
	}
	return remote.Credential{}, false, errors.Join(errs...)
}

// Forget drops the cached answers that would serve repo: its image entry,
// its registry's entry and the global one, in every provider.
func (p *Providers) Forget(repo, _ string) {
	for _, prov := range p.providers {
		prov.mu.Lock()
		delete(prov.cache, imageKey(repo))
		delete(prov.cache, registryKey(repo))
		delete(prov.cache, globalCacheKey)
		prov.mu.Unlock()
	}
}

func imageKey(repo string) string    { return "image:" + repo }
func registryKey(repo string) string { return "registry:" + canonicalHost(domainOf(repo)) }

// auth returns prov's answer for repo, cached or from a fresh run.
func (p *Providers) auth(ctx context.Context, prov *provider, repo string) (map[string]credentialprovider.AuthConfig, error) {
	if a, ok := prov.cached(repo, p.now()); ok {
		return a, nil
	}
	ch := prov.group.DoChan(repo, func() (any, error) {
		// Detached from the first caller's context: the run is shared.
		return p.run(context.WithoutCancel(ctx), prov, repo)
	})
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(map[string]credentialprovider.AuthConfig), nil
	}
}

func (prov *provider) cached(repo string, now time.Time) (map[string]credentialprovider.AuthConfig, bool) {
	prov.mu.Lock()
	defer prov.mu.Unlock()
	for _, k := range []string{imageKey(repo), registryKey(repo), globalCacheKey} {
		e, ok := prov.cache[k]
		if !ok {
			continue
		}
		if !now.Before(e.expires) {
			delete(prov.cache, k)
			continue
		}
		return e.auth, true
	}
	return nil, false
}

// run executes the plugin for repo, validates its answer and caches it.
func (p *Providers) run(ctx context.Context, prov *provider, repo string) (map[string]credentialprovider.AuthConfig, error) {
	req, err := json.Marshal(credentialprovider.CredentialProviderRequest{
		TypeMeta: metav1.TypeMeta{APIVersion: prov.apiVersion, Kind: requestKind},
		Image:    repo,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, prov.path, prov.args...)
	cmd.Env = append(os.Environ(), prov.env...)
	cmd.Stdin = bytes.NewReader(req)
	stdout := &limitedBuffer{max: maxPluginOutput}
	stderr := &limitedBuffer{max: maxPluginStderr}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.WaitDelay = time.Second
	runErr := cmd.Run()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("credential provider %s: timed out after %v", prov.name, p.timeout)
	}
	if runErr != nil {
		return nil, fmt.Errorf("credential provider %s: %w (stderr: %q)", prov.name, runErr, stderr.String())
	}
	if stdout.overflow {
		return nil, fmt.Errorf("credential provider %s: answer larger than %d bytes", prov.name, maxPluginOutput)
	}
	var resp credentialprovider.CredentialProviderResponse
	if err := json.Unmarshal(stdout.Bytes(), &resp); err != nil {
		// The output may hold secrets: do not quote it.
		return nil, fmt.Errorf("credential provider %s: answer is not a JSON CredentialProviderResponse: %w", prov.name, errors.Unwrap(err))
	}
	if resp.Kind != responseKind || resp.APIVersion != prov.apiVersion {
		return nil, fmt.Errorf("credential provider %s: answer has kind %q, apiVersion %q; want %s, %s",
			prov.name, resp.Kind, resp.APIVersion, responseKind, prov.apiVersion)
	}
	var key string
	switch resp.CacheKeyType {
	case credentialprovider.ImagePluginCacheKeyType:
		key = imageKey(repo)
	case credentialprovider.RegistryPluginCacheKeyType:
		key = registryKey(repo)
	case credentialprovider.GlobalPluginCacheKeyType:
		key = globalCacheKey
	default:
		return nil, fmt.Errorf("credential provider %s: invalid cacheKeyType %q", prov.name, resp.CacheKeyType)
	}
	for k := range resp.Auth {
		if err := validPattern(k); err != nil {
			return nil, fmt.Errorf("credential provider %s: auth key: %w", prov.name, err)
		}
	}
	ttl := prov.defaultTTL
	if resp.CacheDuration != nil {
		ttl = resp.CacheDuration.Duration
	}
	if ttl > 0 {
		now := p.now()
		prov.mu.Lock()
		if len(prov.cache) >= maxCacheBeforeGC {
			for k, e := range prov.cache {
				if !now.Before(e.expires) {
					delete(prov.cache, k)
				}
			}
		}
		prov.cache[key] = cacheEntry{auth: resp.Auth, expires: now.Add(ttl)}
		prov.mu.Unlock()
	}
	return resp.Auth, nil
}

// pickAuth returns the entry of auth matching repo, preferring the most
// specific key (kubelet's keyring order: keys sorted in reverse).
func pickAuth(auth map[string]credentialprovider.AuthConfig, repo string) (credentialprovider.AuthConfig, bool) {
	keys := make([]string, 0, len(auth))
	for k := range auth {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	slices.Reverse(keys)
	for _, k := range keys {
		if matchImage(k, repo) {
			return auth[k], true
		}
	}
	return credentialprovider.AuthConfig{}, false
}

// limitedBuffer keeps the first max bytes written to it and notes
// whether more came.
type limitedBuffer struct {
	bytes.Buffer
	max      int
	overflow bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.max - b.Len(); len(p) > room {
		p = p[:max(room, 0)]
		b.overflow = true
	}
	b.Buffer.Write(p)
	return n, nil
}

var _ io.Writer = (*limitedBuffer)(nil)
