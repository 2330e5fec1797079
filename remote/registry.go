package remote

import (
	"context"
	_ "crypto/sha512" // sha512 digests
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Default values for the zero fields of [Options].
const (
	DefaultHostsDir       = "/etc/containerd/certs.d"
	DefaultRequestTimeout = 30 * time.Second
	DefaultRetries        = 5
	DefaultRetryBackoff   = 250 * time.Millisecond
	DefaultRangeGap       = 64 << 10
	DefaultMaxWholeBlob   = 16 << 20
	DefaultUserAgent      = "lazypull"

	DefaultCredentialRecheck = 5 * time.Second
	// DefaultCredentialHelperTimeout is Options.CredentialHelperTimeout's
	// default.
	DefaultCredentialHelperTimeout = 10 * time.Second
)

// maxBackoff caps the exponential backoff between attempts, and
// maxRetryAfter the wait a server may ask for with Retry-After; a server
// asking for longer makes the operation give up at once.
const (
	maxBackoff    = 10 * time.Second
	maxRetryAfter = time.Minute
)

// Options configures a [Registry]. The zero value is usable.
type Options struct {
	// HostsDir is containerd's hosts.toml directory
	// (<dir>/<host>/hosts.toml, <dir>/<host>_<port>_/..., <dir>/_default/...).
	// "" means DefaultHostsDir. A missing directory is fine.
	HostsDir string

	// DockerConfig is the docker config.json to take credentials from.
	// "" means $DOCKER_CONFIG/config.json, or ~/.docker/config.json.
	// A missing file means anonymous access.
	DockerConfig string

	// Credentials, when set, replaces the docker config lookup. It receives
	// the host being authenticated to (e.g. "registry-1.docker.io") and
	// returns a username and secret; an empty username with a secret means
	// an identity (refresh) token; empty strings mean anonymous.
	Credentials func(host string) (username, secret string, err error)

	// Keychain, when set, supplies credentials per repository (and wins
	// over Credentials and DockerConfig): each repository read gets its own
	// authorizer asking the keychain, and when a registry rejects the
	// credentials (401 or 403), the request is retried once after
	// Keychain.Refresh with freshly obtained credentials.
	Keychain CredentialSource

	// CredentialRecheck is how often, at most, a repository's credentials
	// are asked of the Keychain again while it is being read, so that
	// credentials that changed (expired plugin answers, a new pull with
	// new credentials) are used before the registry rejects the old ones.
	// Default DefaultCredentialRecheck.
	CredentialRecheck time.Duration

	// CredentialHelperTimeout bounds one run of a docker credential
	// helper (docker-credential-*): a helper still running then is
	// killed, with its process group, and the lookup fails. A request
	// waiting for credentials gives up sooner if its own context ends.
	// Default DefaultCredentialHelperTimeout.
	CredentialHelperTimeout time.Duration

	// PlainHTTP forces plain HTTP for every host. Without it, hosts use
	// https unless hosts.toml says otherwise, except localhost and loopback
	// addresses with a port other than 443, which try HTTPS and fall back
	// to plain HTTP at the first TLS handshake failure (containerd's rule).
	PlainHTTP bool

	// RequestTimeout bounds each HTTP attempt's wait for response headers,
	// and each body read that makes no progress. Default
	// DefaultRequestTimeout.
	RequestTimeout time.Duration

	// Retries is how many times a failed attempt is retried (so at most
	// Retries+1 attempts) on 408, 429, 5xx, connection errors, stalls and
	// truncated bodies. 0 means DefaultRetries; negative disables retries.
	Retries int

	// RetryBackoff is the wait before the first retry; it doubles each
	// retry (with jitter) up to 10s. A Retry-After header overrides it.
	// Default DefaultRetryBackoff.
	RetryBackoff time.Duration

	// RangeGap is the largest gap between two ranges passed to
	// [Blob.ReadRanges] for which they are fetched in one request (the gap
	// is downloaded and thrown away). 0 means DefaultRangeGap; negative
	// coalesces only touching or overlapping ranges.
	RangeGap int64

	// MaxWholeBlob is the largest blob kept in memory when its server
	// answers a range request with the whole blob (status 200). Such a blob
	// is downloaded once, verified, and later ranges are served from
	// memory. A larger blob makes range reads fail with ErrNotImplemented
	// (wrapped in *Error), remembered per [Blob], so the caller can fall back
	// to a full download instead of re-downloading it for every read.
	// 0 means DefaultMaxWholeBlob; negative never keeps a blob.
	MaxWholeBlob int64

	// UserAgent is sent with every request. Default DefaultUserAgent.
	UserAgent string

	// OnFetch, when set, is called after each HTTP exchange (synchronously,
	// so it must be fast and must not block).
	OnFetch func(FetchEvent)
}

// FetchEvent describes one HTTP exchange, for metrics.
type FetchEvent struct {
	Op         string        // "manifest", "blob", "range", "head", "upload", "push-manifest"
	Host       string        // host that answered; the object store's for redirected reads
	Repo       string        // repository, e.g. "docker.io/library/alpine"
	Digest     digest.Digest // blob or manifest digest, when known
	Offset     int64         // first byte requested (range reads and resumed fetches)
	Length     int64         // bytes requested (range reads); -1 when open-ended
	Status     int           // HTTP status; 0 when no response arrived
	Bytes      int64         // body bytes received, or sent for uploads
	Duration   time.Duration // from request to the end of the body (or the failure)
	Attempt    int           // 1 for the first attempt of an operation, 2 for its first retry...
	Redirected bool          // served through a redirect (e.g. to object storage)
	Err        error         // nil on success
}

// Registry talks to OCI registries. It is safe for concurrent use; create
// one per process and share it.
type Registry struct {
	opts  Options
	hosts docker.RegistryHosts
	creds func(host string) (username, secret string, err error)

	mu    sync.Mutex
	cache map[string][]*endpoint // by reference domain
}

// New returns a Registry configured by opts.
func New(opts Options) (*Registry, error) {
	if opts.HostsDir == "" {
		opts.HostsDir = DefaultHostsDir
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	switch {
	case opts.Retries == 0:
		opts.Retries = DefaultRetries
	case opts.Retries < 0:
		opts.Retries = 0
	}
	if opts.RetryBackoff <= 0 {
		opts.RetryBackoff = DefaultRetryBackoff
	}
	switch {
	case opts.RangeGap == 0:
		opts.RangeGap = DefaultRangeGap
	case opts.RangeGap < 0:
		opts.RangeGap = 0
	}
	switch {
	case opts.MaxWholeBlob == 0:
		opts.MaxWholeBlob = DefaultMaxWholeBlob
	case opts.MaxWholeBlob < 0:
		opts.MaxWholeBlob = 0
	}
	if opts.UserAgent == "" {
		opts.UserAgent = DefaultUserAgent
	}
	if opts.CredentialRecheck <= 0 {
		opts.CredentialRecheck = DefaultCredentialRecheck
	}
	if opts.CredentialHelperTimeout <= 0 {
		opts.CredentialHelperTimeout = DefaultCredentialHelperTimeout
	}
	creds := opts.Credentials
	if creds == nil {
		if opts.DockerConfig == "" {
			opts.DockerConfig = defaultDockerConfig()
		}
		creds = (&dockerCredentials{path: opts.DockerConfig, helperTimeout: opts.CredentialHelperTimeout}).get
	}

	r := &Registry{opts: opts, creds: creds, cache: map[string][]*endpoint{}}
	// Authorizers are ours (see authorizer), not the ones ConfigureHosts
	// makes.
	hostOpts := config.HostOptions{
		HostDir:      config.HostDirFromRoot(opts.HostsDir),
		UpdateClient: r.tuneClient,
	}
	if opts.PlainHTTP {
		hostOpts.DefaultScheme = "http"
	}
	r.hosts = config.ConfigureHosts(context.Background(), hostOpts)
	return r, nil
}

// CloseIdleConnections closes the idle connections of every host's
// transport. The Registry stays usable.
func (r *Registry) CloseIdleConnections() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, eps := range r.cache {
		for _, ep := range eps {
			ep.client.CloseIdleConnections()
		}
	}
}

func defaultDockerConfig() string {
	if d := os.Getenv("DOCKER_CONFIG"); d != "" {
		return filepath.Join(d, "config.json")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".docker", "config.json")
}

// tuneClient adjusts the transports containerd's config package creates
// (one per registry host, cloned for hosts with their own TLS settings) for
// many concurrent range reads.
func (r *Registry) tuneClient(c *http.Client) error {
	tr, ok := c.Transport.(*http.Transport)
	if !ok {
		return nil
	}
	tr.MaxIdleConns = 256
	tr.MaxIdleConnsPerHost = 64
	tr.IdleConnTimeout = 90 * time.Second
	tr.ForceAttemptHTTP2 = true
	// Transparent gzip would break byte ranges and length checks.
	tr.DisableCompression = true
	// Our per-attempt watchdog covers headers and body stalls.
	tr.ResponseHeaderTimeout = 0
	tr.ExpectContinueTimeout = time.Second
	return nil
}

// endpoint is one place a repository can be reached: a mirror or the
// registry itself, as hosts.toml describes it.
type endpoint struct {
	host       docker.RegistryHost
	client     *http.Client // host.Client, not following redirects
	authClient *http.Client // host.Client as configured, for token requests
	refHost    string       // the domain named in the reference

	mu    sync.Mutex
	auths map[string]*authorizer // by repository path ("" for all without a Keychain)
}

func (e *endpoint) mirror() bool {
	if e.refHost == e.host.Host {
		return false
	}
	return !(e.refHost == "docker.io" && e.host.Host == "registry-1.docker.io")
}

// url builds the API URL of kind ("manifests" or "blobs") and ref under repo.
func (e *endpoint) url(repo, kind, ref string) *url.URL {
	u := &url.URL{
		Scheme: e.host.Scheme,
		Host:   e.host.Host,
		Path:   path.Join(e.host.Path, repo, kind, ref),
	}
	if kind == "blobs/uploads" {
		u.Path += "/"
	}
	if e.mirror() {
		u.RawQuery = url.Values{"ns": {e.refHost}}.Encode()
	}
	return u
}

// endpoints returns the endpoints for spec's domain that have capability
// c, in hosts.toml order.
func (r *Registry) endpoints(spec refSpec, c docker.HostCapabilities) ([]*endpoint, error) {
	r.mu.Lock()
	all, ok := r.cache[spec.domain]
	r.mu.Unlock()
	if !ok {
		hosts, err := r.hosts(spec.domain)
		if err != nil {
			return nil, &Error{Op: "configure hosts", Repo: spec.name(), Err: err, class: errdefs.ErrInvalidArgument}
		}
		for _, h := range hosts {
			if r.opts.PlainHTTP {
				h.Scheme = "http"
			}
			client := &http.Client{Transport: http.DefaultTransport}
			authClient := http.DefaultClient
			if h.Client != nil {
				c := *h.Client
				client = &c
				authClient = h.Client
			}
			client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
			client.Timeout = 0
			h.Authorizer = nil
			all = append(all, &endpoint{host: h, client: client, authClient: authClient, refHost: spec.domain, auths: map[string]*authorizer{}})
		}
		r.mu.Lock()
		if cached, ok := r.cache[spec.domain]; ok {
			all = cached
		} else {
			r.cache[spec.domain] = all
		}
		r.mu.Unlock()
	}
	var eps []*endpoint
	for _, e := range all {
		if e.host.Capabilities.Has(c) {
			eps = append(eps, e)
		}
	}
	if len(eps) == 0 {
		what := map[docker.HostCapabilities]string{
			docker.HostCapabilityPull:    "pull",
			docker.HostCapabilityResolve: "resolve",
			docker.HostCapabilityPush:    "push",
		}[c]
		return nil, &Error{Op: what, Repo: spec.name(),
			Err:   fmt.Errorf("no host configured with the %q capability in %s", what, r.opts.HostsDir),
			class: errdefs.ErrFailedPrecondition}
	}
	return eps, nil
}

// refSpec is a parsed image reference.
type refSpec struct {
	domain string        // registry host as named, e.g. "docker.io", "127.0.0.1:5000"
	repo   string        // repository path, e.g. "library/alpine"
	tag    string        // may be empty
	dgst   digest.Digest // may be empty
}

// parseRef parses a docker-style reference, normalising short names
// ("alpine" -> "docker.io/library/alpine:latest").
func parseRef(s string) (refSpec, error) {
	named, err := reference.ParseNormalizedNamed(strings.TrimSpace(s))
	if err != nil {
		return refSpec{}, &Error{Op: "parse reference", Ref: s, Err: err, class: errdefs.ErrInvalidArgument}
	}
	spec := refSpec{domain: reference.Domain(named), repo: reference.Path(named)}
	if t, ok := named.(reference.Tagged); ok {
		spec.tag = t.Tag()
	}
	if d, ok := named.(reference.Digested); ok {
		spec.dgst = d.Digest()
	}
	if spec.tag == "" && spec.dgst == "" {
		spec.tag = "latest"
	}
	return spec, nil
}

// name is the repository with its domain, e.g. "docker.io/library/alpine".
func (s refSpec) name() string { return s.domain + "/" + s.repo }

// String is the normalised reference.
func (s refSpec) String() string {
	out := s.name()
	if s.tag != "" {
		out += ":" + s.tag
	}
	if s.dgst != "" {
		out += "@" + s.dgst.String()
	}
	return out
}

// object is the tag or digest to resolve: the digest when there is one.
func (s refSpec) object() string {
	if s.dgst != "" {
		return s.dgst.String()
	}
	return s.tag
}

func (r *Registry) emit(ev FetchEvent) {
	if r.opts.OnFetch != nil {
		r.opts.OnFetch(ev)
	}
}
