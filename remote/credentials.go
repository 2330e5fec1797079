package remote

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/docker/docker-credential-helpers/client"
	"github.com/docker/docker-credential-helpers/credentials"
)

// dockerHubKey is the key docker uses for Docker Hub in config.json and
// with credential helpers.
const dockerHubKey = "https://index.docker.io/v1/"

// DockerCredentials returns the credential lookup a Registry uses by
// default, reading the docker config.json at path ("" means
// $DOCKER_CONFIG/config.json or ~/.docker/config.json). Its shape is the
// one containerd's docker.WithAuthCreds and config.HostOptions.Credentials
// take: host in (e.g. "registry-1.docker.io"), username and secret out; an
// empty username with a secret is an identity token, empty strings mean
// anonymous.
func DockerCredentials(path string) func(host string) (username, secret string, err error) {
	if path == "" {
		path = defaultDockerConfig()
	}
	return (&dockerCredentials{path: path}).get
}

// dockerCredentials looks credentials up in a docker config.json, the
// way the docker CLI does: credHelpers[host], else credsStore, else the
// inline "auths" entry. The file is re-read at every lookup (lookups happen
// only when a registry challenges us), so `docker login` takes effect
// without a restart.
type dockerCredentials struct {
	path string
}

type dockerConfigFile struct {
	Auths       map[string]dockerAuthEntry `json:"auths"`
	CredsStore  string                     `json:"credsStore"`
	CredHelpers map[string]string          `json:"credHelpers"`
}

type dockerAuthEntry struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

// get returns the username and secret for host (as containerd's
// authorizer asks: the host being contacted, e.g. "registry-1.docker.io").
// An empty username with a secret is an identity token.
func (d *dockerCredentials) get(host string) (string, string, error) {
	if d.path == "" {
		return "", "", nil
	}
	b, err := os.ReadFile(d.path)
	if errors.Is(err, os.ErrNotExist) {
		return "", "", nil
	}
	if err != nil {
		return "", "", fmt.Errorf("read docker config: %w", err)
	}
	var cfg dockerConfigFile
	if err := json.Unmarshal(b, &cfg); err != nil {
		return "", "", fmt.Errorf("parse docker config %s: %w: %w", d.path, err, errdefs.ErrInvalidArgument)
	}

	keys := []string{host}
	serverURL := host
	if isDockerHub(host) {
		keys = []string{dockerHubKey, "docker.io", "index.docker.io", "registry-1.docker.io"}
		serverURL = dockerHubKey
	}

	helper := cfg.CredsStore
	for _, k := range keys {
		if h, ok := cfg.CredHelpers[k]; ok {
			helper = h
			break
		}
	}
	if helper != "" {
		creds, err := client.Get(client.NewShellProgramFunc("docker-credential-"+helper), serverURL)
		switch {
		case err == nil:
			if creds.Username == "<token>" {
				return "", creds.Secret, nil
			}
			return creds.Username, creds.Secret, nil
		case credentials.IsErrCredentialsNotFound(err):
			// Fall through to inline auths.
		default:
			return "", "", fmt.Errorf("credential helper docker-credential-%s for %s: %w", helper, serverURL, err)
		}
	}

	for _, k := range keys {
		for key, entry := range cfg.Auths {
			if normalizeAuthKey(key) != normalizeAuthKey(k) {
				continue
			}
			return entry.credentials(key)
		}
	}
	return "", "", nil
}

func (e dockerAuthEntry) credentials(key string) (string, string, error) {
	if e.IdentityToken != "" {
		return "", e.IdentityToken, nil
	}
	if e.Auth != "" {
		raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(e.Auth))
		if err != nil {
			return "", "", fmt.Errorf("docker config: auths[%q].auth is not base64: %w", key, err)
		}
		user, pass, ok := strings.Cut(string(raw), ":")
		if !ok {
			return "", "", fmt.Errorf("docker config: auths[%q].auth is not user:password", key)
		}
		return user, strings.Trim(pass, "\x00"), nil
	}
	return e.Username, e.Password, nil
}

// normalizeAuthKey reduces an auths key ("https://host/v1/", "host") to a
// host name.
func normalizeAuthKey(k string) string {
	if isDockerHub(k) || k == dockerHubKey {
		return dockerHubKey
	}
	k = strings.TrimPrefix(strings.TrimPrefix(k, "https://"), "http://")
	k, _, _ = strings.Cut(k, "/")
	return strings.ToLower(k)
}

func isDockerHub(host string) bool {
	switch host {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return true
	}
	return false
}

// Credential is what a [CredentialSource] returns for one registry host.
// The zero value means anonymous access.
type Credential struct {
	// Username and Secret are a user and password, or, with an empty
	// Username, an identity (refresh) token.
	Username string
	Secret   string
	// RegistryToken, when set, is a bearer token sent as is in the
	// Authorization header of every request (CRI's registry_token); the
	// other fields are then ignored.
	RegistryToken string
}

// CredentialSource supplies credentials per image repository, for
// registries where different images need different credentials (kubelet
// pull secrets, credential-provider plugins). See [Options.Keychain].
type CredentialSource interface {
	// Credentials returns the credentials to use for host (the host being
	// contacted, a mirror or the registry) when reading repo (the
	// normalised repository name with its domain, e.g.
	// "docker.io/library/alpine").
	Credentials(ctx context.Context, repo, host string) (Credential, error)
	// Refresh drops whatever the source cached for repo and host, so that
	// the next Credentials call obtains fresh credentials. The Registry
	// calls it when a registry rejects the credentials (401 or 403).
	Refresh(repo, host string)
}

// String hides the secrets, so a Credential printed by mistake leaks
// nothing.
func (c Credential) String() string {
	switch {
	case c.RegistryToken != "":
		return "registry token (redacted)"
	case c.Username != "":
		return "user " + c.Username + " (password redacted)"
	case c.Secret != "":
		return "identity token (redacted)"
	}
	return "anonymous"
}

// GoString hides the secrets like String.
func (c Credential) GoString() string { return "remote.Credential{" + c.String() + "}" }

// authorizer authorizes the requests of one repository (or, without a
// Keychain, of every repository) to one endpoint. It wraps containerd's
// docker authorizer (challenges, token fetches and their cache) and adds
// CRI registry tokens, which that authorizer cannot send.
//
// containerd's authorizer keeps the credentials it got at the first
// challenge and refreshes expired bearer tokens with them for ever. With
// a Keychain, the authorizer therefore asks the keychain again at most
// every Options.CredentialRecheck while requests flow, and starts over
// with a fresh docker authorizer when the answer changed (a plugin's
// cached answer expired and the plugin gave new credentials, kubelet
// pulled again with new ones).
type authorizer struct {
	keychain CredentialSource // nil without Options.Keychain
	repo     string           // repository name with domain, for the keychain
	host     string           // endpoint host
	recheck  time.Duration
	build    func(a *authorizer) docker.Authorizer

	mu      sync.Mutex
	docker  docker.Authorizer
	cred    Credential // the keychain's last answer
	checked time.Time  // when cred was obtained; zero before the first challenge
	token   string     // registry token in use
	scopes  map[string]*sync.Mutex
}

// Authorize adds the Authorization header to req.
func (a *authorizer) Authorize(ctx context.Context, req *http.Request) error {
	a.maybeRecheck(ctx)
	a.mu.Lock()
	tok, d := a.token, a.docker
	a.mu.Unlock()
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
		return nil
	}
	// containerd's authorizer (2.4.2) writes a token's expiry after the
	// fetch without the lock under which concurrent callers of the same
	// scope read it: a data race. Calls for one scope are serialized here;
	// they would wait for the fetch in flight anyway.
	mu := a.scopeLock(strings.Join(docker.GetTokenScopes(ctx, nil), " "))
	mu.Lock()
	defer mu.Unlock()
	return d.Authorize(ctx, req)
}

// scopeLock returns the mutex serializing Authorize calls for scope.
func (a *authorizer) scopeLock(scope string) *sync.Mutex {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.scopes == nil {
		a.scopes = map[string]*sync.Mutex{}
	}
	mu, ok := a.scopes[scope]
	if !ok {
		mu = &sync.Mutex{}
		a.scopes[scope] = mu
	}
	return mu
}

// AddResponses answers the challenges of the last response.
func (a *authorizer) AddResponses(ctx context.Context, responses []*http.Response) error {
	if a.keychain != nil {
		c, err := a.keychain.Credentials(ctx, a.repo, a.host)
		if err == nil && c.RegistryToken != "" {
			a.mu.Lock()
			same := a.token == c.RegistryToken
			a.token, a.cred, a.checked = c.RegistryToken, c, time.Now()
			a.mu.Unlock()
			if same {
				return fmt.Errorf("the registry rejected the registry token: %w", errdefs.ErrUnauthenticated)
			}
			return nil
		}
	}
	a.mu.Lock()
	d := a.docker
	a.mu.Unlock()
	return d.AddResponses(ctx, responses)
}

// credentials is the docker authorizer's credential callback.
func (a *authorizer) credentials(host string) (string, string, error) {
	// The docker authorizer gives no context; the keychain bounds its
	// own work (plugin timeouts).
	c, err := a.keychain.Credentials(context.Background(), a.repo, host)
	if err != nil {
		return "", "", err
	}
	a.mu.Lock()
	a.cred, a.checked = c, time.Now()
	a.mu.Unlock()
	return c.Username, c.Secret, nil
}

// maybeRecheck asks the keychain again when the last answer is older than
// the recheck interval, and starts over when the credentials changed.
func (a *authorizer) maybeRecheck(ctx context.Context) {
	if a.keychain == nil {
		return
	}
	a.mu.Lock()
	due := !a.checked.IsZero() && time.Since(a.checked) >= a.recheck
	if due {
		a.checked = time.Now() // one recheck at a time
	}
	a.mu.Unlock()
	if !due {
		return
	}
	c, err := a.keychain.Credentials(ctx, a.repo, a.host)
	if err != nil {
		log.G(ctx).WithError(err).WithField("repo", a.repo).Debug("remote: credential recheck failed; keeping the current credentials")
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if c == a.cred {
		return
	}
	log.G(ctx).WithField("repo", a.repo).WithField("host", a.host).Debug("remote: credentials changed; authorizing afresh")
	a.cred, a.token = c, c.RegistryToken
	a.docker = a.build(a)
}

// authorizer returns the authorizer for requests of repo (the path,
// without domain) to ep, creating it on first use.
func (r *Registry) authorizer(ep *endpoint, repo string) *authorizer {
	key := ""
	if r.opts.Keychain != nil {
		key = repo
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	if a, ok := ep.auths[key]; ok {
		return a
	}
	a := &authorizer{
		keychain: r.opts.Keychain,
		repo:     ep.refHost + "/" + repo,
		host:     ep.host.Host,
		recheck:  r.opts.CredentialRecheck,
	}
	a.build = func(a *authorizer) docker.Authorizer {
		creds := r.creds
		if a.keychain != nil {
			creds = a.credentials
		}
		return docker.NewDockerAuthorizer(
			docker.WithAuthClient(ep.authClient),
			docker.WithAuthHeader(http.Header{"User-Agent": {r.opts.UserAgent}}),
			docker.WithAuthCreds(creds),
		)
	}
	a.docker = a.build(a)
	ep.auths[key] = a
	return a
}

// dropAuthorizer forgets a, the authorizer whose credentials the registry
// rejected, with its cached tokens, and makes the keychain forget the
// credentials behind them. When a was already replaced (another request
// saw the rejection first), nothing happens, so a burst of rejected
// requests refreshes once.
func (r *Registry) dropAuthorizer(ep *endpoint, repo string, a *authorizer) {
	key := ""
	if r.opts.Keychain != nil {
		key = repo
	}
	ep.mu.Lock()
	current := ep.auths[key] == a
	if current {
		delete(ep.auths, key)
	}
	ep.mu.Unlock()
	if current && r.opts.Keychain != nil {
		r.opts.Keychain.Refresh(a.repo, a.host)
	}
}
