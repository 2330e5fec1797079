package remote

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/docker/docker-credential-helpers/client"
	"github.com/docker/docker-credential-helpers/credentials"
	"golang.org/x/sync/singleflight"
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
	return (&dockerCredentials{path: path, helperTimeout: DefaultCredentialHelperTimeout}).get
}

// dockerCredentials looks credentials up in a docker config.json, the
// way the docker CLI does: credHelpers[host], else credsStore, else the
// inline "auths" entry. The file is re-read at every lookup (lookups happen
// only when a registry challenges us), so `docker login` takes effect
// without a restart.
type dockerCredentials struct {
	path          string
	helperTimeout time.Duration
	// helpers collapses concurrent runs of one helper for one server:
	// a burst of challenged requests runs it once.
	helpers singleflight.Group
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
		creds, err := d.runHelper(helper, serverURL)
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

// runHelper asks docker-credential-<helper> for serverURL's credentials,
// killing it (and whatever it started) if it runs longer than the helper
// timeout.
func (d *dockerCredentials) runHelper(helper, serverURL string) (*credentials.Credentials, error) {
	v, err, _ := d.helpers.Do(helper+"\x00"+serverURL, func() (any, error) {
		ctx, cancel := context.WithTimeout(context.Background(), d.helperTimeout)
		defer cancel()
		creds, err := client.Get(func(args ...string) client.Program {
			return newHelperProgram(ctx, "docker-credential-"+helper, args...)
		}, serverURL)
		if err != nil && ctx.Err() != nil {
			return nil, fmt.Errorf("no answer within %v: %w", d.helperTimeout, context.DeadlineExceeded)
		}
		return creds, err
	})
	if err != nil {
		return nil, err
	}
	return v.(*credentials.Credentials), nil
}

// helperProgram is a credential helper run (client.Program) bounded by a
// context: when it ends, the helper's whole process group is killed, and
// the pipes are closed shortly after even if a grandchild holds them.
type helperProgram struct {
	cmd *exec.Cmd
}

func newHelperProgram(ctx context.Context, name string, args ...string) *helperProgram {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = os.Environ()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		if cmd.Process == nil {
			return nil
		}
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = time.Second
	return &helperProgram{cmd: cmd}
}

func (p *helperProgram) Output() ([]byte, error) { return p.cmd.Output() }
func (p *helperProgram) Input(in io.Reader)      { p.cmd.Stdin = in }

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

	// lookup finds the credentials for a host: the keychain's or the
	// registry's (docker config, credential helpers) answer. It may be
	// slow: AddResponses runs it outside any lock, bounded by the
	// request's context, and hands the docker authorizer the answer.
	lookup func(host string) (username, secret string, err error)

	mu      sync.Mutex
	answers map[string]credAnswer // the last lookup per host, for the docker authorizer's callback
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
	if err := d.Authorize(ctx, req); err != nil {
		// containerd's authorizer keeps a failed token fetch for good
		// (a token server's one 503 would fail every later request):
		// start over, so the next attempt answers the registry's
		// challenge and fetches a token afresh.
		a.mu.Lock()
		if a.docker == d {
			a.docker = a.build(a)
		}
		a.mu.Unlock()
		return err
	}
	return nil
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
	host := a.host
	if n := len(responses); n > 0 && responses[n-1].Request != nil {
		host = responses[n-1].Request.URL.Host
	}
	// containerd's authorizer asks for credentials while holding its
	// lock, so a slow lookup (a hanging credential helper) would block
	// every request of the repository: look them up first, outside any
	// lock, for no longer than this request may wait.
	ans, err := a.lookupCtx(ctx, host)
	if err != nil {
		return err
	}
	a.mu.Lock()
	if a.answers == nil {
		a.answers = map[string]credAnswer{}
	}
	a.answers[host] = ans
	d := a.docker
	a.mu.Unlock()
	return d.AddResponses(ctx, responses)
}

// credAnswer is one credential lookup's result.
type credAnswer struct {
	user, secret string
	err          error
}

// lookupCtx runs lookup for host, giving up when ctx ends (the lookup
// goes on in the background, bounded by its own timeouts).
func (a *authorizer) lookupCtx(ctx context.Context, host string) (credAnswer, error) {
	ch := make(chan credAnswer, 1)
	go func() {
		u, s, err := a.lookup(host)
		ch <- credAnswer{u, s, err}
	}()
	select {
	case ans := <-ch:
		return ans, nil
	case <-ctx.Done():
		return credAnswer{}, fmt.Errorf("waiting for the credentials for %s: %w", host, ctx.Err())
	}
}

// answer is the docker authorizer's credential callback: the answer
// AddResponses looked up, or a lookup now.
func (a *authorizer) answer(host string) (string, string, error) {
	a.mu.Lock()
	ans, ok := a.answers[host]
	a.mu.Unlock()
	if ok {
		return ans.user, ans.secret, ans.err
	}
	return a.lookup(host)
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
	a.lookup = r.creds
	if a.keychain != nil {
		a.lookup = a.credentials
	}
	a.build = func(a *authorizer) docker.Authorizer {
		return docker.NewDockerAuthorizer(
			docker.WithAuthClient(ep.authClient),
			docker.WithAuthHeader(http.Header{"User-Agent": {r.opts.UserAgent}}),
			docker.WithAuthCreds(a.answer),
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
