// Package keychain finds registry credentials for the images lazypull reads,
// the way a Kubernetes node has them, trying each source in this order:
//
//  1. Credentials captured from CRI PullImage requests ([Captured]): the
//     AuthConfig kubelet sent for this image's repository (from the pod's
//     imagePullSecrets or kubelet's own credential providers), else for its
//     registry host. They live in memory only and a later pull refreshes
//     them; a daemon restart forgets them.
//  2. Kubelet credential-provider exec plugins ([Providers]): the plugins
//     of a CredentialProviderConfig whose matchImages match the image, run
//     with a CredentialProviderRequest on stdin, their answers cached for
//     the cache duration they give (per image, registry or globally).
//  3. The docker config.json and its credential helpers ([DockerConfig]).
//  4. Anonymous access.
//
// The first source that has credentials for an image wins; a source that
// fails (a plugin that crashes or times out) is logged and skipped. A
// [Keychain] is a remote.CredentialSource: the registry client asks it for
// credentials when a registry challenges, and calls Refresh when the
// registry rejects them, so the next lookup re-runs plugins instead of
// serving a cached answer.
//
// Secrets are never logged and never written anywhere; Credential's
// String method redacts them.
package keychain

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/log"
	"github.com/distribution/reference"

	"github.com/lazypull/lazypull/remote"
)

// Source is one place credentials come from.
type Source interface {
	// Lookup returns the credentials for host when reading repo (a
	// normalised repository name such as "registry.example.com/team/app").
	// ok is false when the source has none for it.
	Lookup(ctx context.Context, repo, host string) (cred remote.Credential, ok bool, err error)
	// Forget drops what the source cached for repo and host.
	Forget(repo, host string)
}

// Keychain tries its sources in order. It implements
// remote.CredentialSource and is safe for concurrent use.
type Keychain struct {
	sources []Source
}

var _ remote.CredentialSource = (*Keychain)(nil)

// New returns a Keychain trying sources in the given order; nil sources
// are left out. With no source (or none answering), access is anonymous.
func New(sources ...Source) *Keychain {
	k := &Keychain{}
	for _, s := range sources {
		if s != nil {
			k.sources = append(k.sources, s)
		}
	}
	return k
}

// Credentials returns the first credentials a source has for repo and
// host, or anonymous (the zero Credential) when none has any. A source's
// failure is logged (without secrets) and the next source tried; the
// error is returned only when no source answered and one failed, so that
// the registry's 401 is not mistaken for a missing credential.
func (k *Keychain) Credentials(ctx context.Context, repo, host string) (remote.Credential, error) {
	var errs []error
	for _, s := range k.sources {
		cred, ok, err := s.Lookup(ctx, repo, host)
		if err != nil {
			log.G(ctx).WithError(err).WithField("repo", repo).WithField("host", host).
				Warn("keychain: credential source failed, trying the next one")
			errs = append(errs, err)
			continue
		}
		if ok {
			return cred, nil
		}
	}
	if len(errs) > 0 {
		return remote.Credential{}, fmt.Errorf("no credentials for %s at %s: %w", repo, host, errors.Join(errs...))
	}
	return remote.Credential{}, nil
}

// Refresh makes every source forget what it cached for repo and host.
func (k *Keychain) Refresh(repo, host string) {
	for _, s := range k.sources {
		s.Forget(repo, host)
	}
}

// DockerConfig is a Source reading a docker config.json and its credential
// helpers (path "" means $DOCKER_CONFIG/config.json or
// ~/.docker/config.json). Nothing is cached: the file is read at each
// lookup, so `docker login` takes effect at once.
func DockerConfig(path string) Source {
	return dockerSource{get: remote.DockerCredentials(path)}
}

type dockerSource struct {
	get func(host string) (string, string, error)
}

func (d dockerSource) Lookup(_ context.Context, _, host string) (remote.Credential, bool, error) {
	user, secret, err := d.get(host)
	if err != nil {
		return remote.Credential{}, false, err
	}
	if user == "" && secret == "" {
		return remote.Credential{}, false, nil
	}
	return remote.Credential{Username: user, Secret: secret}, true, nil
}

func (dockerSource) Forget(string, string) {}

// RepoName normalises an image reference ("alpine", "host:5000/a/b:tag",
// "x@sha256:...") to its repository name with domain
// ("docker.io/library/alpine", "host:5000/a/b"), the key credentials are
// kept and looked up by.
func RepoName(ref string) (string, error) {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return "", fmt.Errorf("parse image reference %q: %w", ref, err)
	}
	return named.Name(), nil
}

// domainOf returns the registry domain of a repository name.
func domainOf(repo string) string {
	named, err := reference.ParseNormalizedNamed(repo)
	if err != nil {
		return ""
	}
	return reference.Domain(named)
}

// sameHost reports whether a and b name the same registry host, treating
// Docker Hub's names as one.
func sameHost(a, b string) bool {
	return canonicalHost(a) == canonicalHost(b)
}

func canonicalHost(h string) string {
	switch h {
	case "docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/":
		return "docker.io"
	}
	return h
}
