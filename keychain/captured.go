package keychain

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"sync"

	"github.com/lazypull/lazypull/remote"
)

// AuthConfig is the credential part of a CRI PullImageRequest
// (runtime.v1.AuthConfig), copied so that this package does not depend on
// the CRI API.
type AuthConfig struct {
	Username      string
	Password      string
	Auth          string // base64 of "user:password"
	ServerAddress string // when set, the only registry host these are for
	IdentityToken string
	RegistryToken string
}

// Captured keeps the credentials of CRI pulls in memory, by repository
// and by registry host. It is a Source, safe for concurrent use. Nothing
// is written anywhere or logged.
type Captured struct {
	mu     sync.RWMutex
	byRepo map[string]capturedCred
	byHost map[string]capturedCred
}

type capturedCred struct {
	cred   remote.Credential
	server string // host restriction, "" for any
}

// NewCaptured returns an empty store.
func NewCaptured() *Captured {
	return &Captured{byRepo: map[string]capturedCred{}, byHost: map[string]capturedCred{}}
}

// Put records the credentials a pull of image (any reference form) used,
// replacing what an earlier pull of the same repository (and registry
// host) left. An empty AuthConfig (an anonymous pull) removes the
// repository's entry but leaves the host's: another image of the host may
// have been pulled with credentials. A malformed auth field is an error
// and stores nothing.
func (c *Captured) Put(image string, a AuthConfig) error {
	_, err := c.Swap(image, a)
	return err
}

// Swap is Put, returning a function that puts back what the pull
// replaced, for a pull that failed (its credentials may be wrong, and must
// not displace working ones). The function does nothing when another pull
// replaced the entries meanwhile.
func (c *Captured) Swap(image string, a AuthConfig) (undo func(), err error) {
	repo, err := RepoName(image)
	if err != nil {
		return nil, err
	}
	cred, err := a.credential()
	if err != nil {
		return nil, fmt.Errorf("pull of %s: %w", repo, err)
	}
	host := canonicalHost(domainOf(repo))
	c.mu.Lock()
	defer c.mu.Unlock()
	oldRepo, hadRepo := c.byRepo[repo]
	oldHost, hadHost := c.byHost[host]
	e := capturedCred{cred: cred, server: normalizeServer(a.ServerAddress)}
	if cred == (remote.Credential{}) {
		delete(c.byRepo, repo)
	} else {
		c.byRepo[repo] = e
		c.byHost[host] = e
	}
	undo = func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if cur, ok := c.byRepo[repo]; (ok && cur == e) || (!ok && cred == (remote.Credential{})) {
			if hadRepo {
				c.byRepo[repo] = oldRepo
			} else {
				delete(c.byRepo, repo)
			}
		}
		if cur, ok := c.byHost[host]; ok && cur == e && cred != (remote.Credential{}) {
			if hadHost {
				c.byHost[host] = oldHost
			} else {
				delete(c.byHost, host)
			}
		}
	}
	return undo, nil
}

// Lookup returns the credentials captured for repo, else for its registry
// host, provided their server address (if any) is host.
func (c *Captured) Lookup(_ context.Context, repo, host string) (remote.Credential, bool, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	e, ok := c.byRepo[repo]
	if !ok {
		e, ok = c.byHost[canonicalHost(domainOf(repo))]
	}
	if !ok || (e.server != "" && !sameHost(e.server, host)) {
		return remote.Credential{}, false, nil
	}
	return e.cred, true, nil
}

// Forget keeps captured credentials: they cannot be re-obtained without a
// new pull, and a 401 with them is worth reporting as such.
func (c *Captured) Forget(string, string) {}

// Len is the number of repositories with captured credentials.
func (c *Captured) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.byRepo)
}

// credential converts a CRI AuthConfig the way containerd's CRI plugin
// does: identity token, else username and password, else auth; plus the
// registry token, which containerd ignores but we send as a bearer token.
func (a AuthConfig) credential() (remote.Credential, error) {
	switch {
	case a.RegistryToken != "":
		return remote.Credential{RegistryToken: a.RegistryToken}, nil
	case a.IdentityToken != "":
		return remote.Credential{Secret: a.IdentityToken}, nil
	case a.Username != "":
		return remote.Credential{Username: a.Username, Secret: a.Password}, nil
	case a.Auth != "":
		raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(a.Auth))
		if err != nil {
			return remote.Credential{}, fmt.Errorf("auth config: auth is not base64")
		}
		user, pass, ok := strings.Cut(string(raw), ":")
		if !ok || user == "" {
			return remote.Credential{}, fmt.Errorf("auth config: auth is not user:password")
		}
		return remote.Credential{Username: user, Secret: strings.Trim(pass, "\x00")}, nil
	}
	return remote.Credential{}, nil
}

// normalizeServer reduces a server address ("https://host:5000/v1/") to
// a host.
func normalizeServer(s string) string {
	if s == "" {
		return ""
	}
	if canonicalHost(s) == "docker.io" {
		return "docker.io"
	}
	s = strings.TrimPrefix(strings.TrimPrefix(s, "https://"), "http://")
	s, _, _ = strings.Cut(s, "/")
	return strings.ToLower(s)
}
