package remote_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// writeDockerConfig writes a docker config.json and returns its path.
func writeDockerConfig(t *testing.T, cfg map[string]any) string {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// installCredentialHelper puts docker-credential-<name> on PATH: it
// answers "get" for server with user/secret, logs the servers asked for to
// the returned file, and says "not found" for anything else.
func installCredentialHelper(t *testing.T, name, server, user, secret string) (logFile string) {
	t.Helper()
	dir := t.TempDir()
	logFile = filepath.Join(dir, "asked")
	answer, _ := json.Marshal(map[string]string{"ServerURL": server, "Username": user, "Secret": secret})
	script := `#!/bin/sh
[ "$1" = get ] || exit 1
read -r server
echo "$server" >> '` + logFile + `'
if [ "$server" = '` + server + `' ]; then
  echo '` + string(answer) + `'
else
  echo "credentials not found in native keychain"
  exit 1
fi
`
	if err := os.WriteFile(filepath.Join(dir, "docker-credential-"+name), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return logFile
}

func TestBasicAuthFromDockerConfig(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithBasicAuth("alice", "s3cret"))
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: []byte("hello")})
	ctx := context.Background()

	for name, entry := range map[string]map[string]string{
		"auth":     {"auth": base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))},
		"username": {"username": "alice", "password": "s3cret"},
	} {
		for _, key := range []string{reg.Host(), "http://" + reg.Host() + "/v2/"} {
			cfg := writeDockerConfig(t, map[string]any{"auths": map[string]any{key: entry}})
			r := newClient(t, remote.Options{DockerConfig: cfg})
			got, err := r.Resolve(ctx, img.Ref, nil)
			if err != nil || got.ManifestDesc.Digest != img.ManifestDesc.Digest {
				t.Fatalf("%s/%s: %v", name, key, err)
			}
		}
	}

	// No credentials: a clear 401.
	r := newClient(t, remote.Options{})
	_, err := r.Resolve(ctx, img.Ref, nil)
	if !errdefs.IsUnauthorized(err) {
		t.Fatalf("want unauthenticated: %v", err)
	}
	t.Log(err)
	mustContain(t, err, reg.Host()+"/private/app:v1", "HTTP 401", "UNAUTHORIZED")

	// Wrong password.
	cfg := writeDockerConfig(t, map[string]any{"auths": map[string]any{reg.Host(): map[string]string{"username": "alice", "password": "nope"}}})
	r = newClient(t, remote.Options{DockerConfig: cfg})
	_, err = r.Resolve(ctx, img.Ref, nil)
	if !errdefs.IsUnauthorized(err) {
		t.Fatalf("want unauthenticated: %v", err)
	}

	// A broken config file is named.
	bad := filepath.Join(t.TempDir(), "config.json")
	os.WriteFile(bad, []byte("{not json"), 0o600)
	r = newClient(t, remote.Options{DockerConfig: bad})
	_, err = r.Resolve(ctx, img.Ref, nil)
	mustContain(t, err, bad)
}

func TestTokenAuthAnonymousPullAndCaching(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("bob", "pw", true, 0))
	data := randomBytes(100_000, 11)
	img := reg.PushImage(t, "library/app", "v1", remotetest.Layer{Data: data})
	r := newClient(t, remote.Options{})
	ctx := context.Background()

	if _, err := r.Resolve(ctx, img.Ref, nil); err != nil {
		t.Fatal(err)
	}
	b, err := r.OpenBlob(ctx, img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		p := make([]byte, 100)
		if _, err := b.ReadAt(ctx, p, int64(i*1000)); err != nil || !bytes.Equal(p, data[i*1000:i*1000+100]) {
			t.Fatal(err)
		}
	}
	isToken := func(q remotetest.Request) bool { return q.Path == "/token" }
	if n := reg.Count(isToken); n != 1 {
		t.Fatalf("%d token requests, want 1 (cached)", n)
	}
	for _, q := range reg.Requests() {
		if q.Server == "registry" && q.Path != "/token" && q.Status != 401 && !strings.HasPrefix(q.Authorization, "Bearer ") {
			t.Fatalf("request without bearer token: %+v", q)
		}
	}

	// Anonymous push is refused, clearly.
	d := ocispec.Descriptor{Digest: digest.FromString("x"), Size: 1}
	err = r.PushBlob(ctx, img.Ref, d, strings.NewReader("x"))
	if !errdefs.IsUnauthorized(err) {
		t.Fatalf("anonymous push: %v", err)
	}
	t.Log(err)
	mustContain(t, err, "HTTP 401", "insufficient_scope")
}

func TestTokenAuthWithCredentialHelpers(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("bob", "pw", false, 0))
	img := reg.PushImage(t, "team/app", "v1", remotetest.Layer{Data: []byte("layer")})
	ctx := context.Background()

	for _, mode := range []string{"credHelpers", "credsStore"} {
		t.Run(mode, func(t *testing.T) {
			asked := installCredentialHelper(t, "fake", reg.Host(), "bob", "pw")
			cfg := map[string]any{"credsStore": "fake"}
			if mode == "credHelpers" {
				cfg = map[string]any{"credHelpers": map[string]string{reg.Host(): "fake"}, "credsStore": "absent-helper"}
			}
			r := newClient(t, remote.Options{DockerConfig: writeDockerConfig(t, cfg)})
			got, err := r.Resolve(ctx, img.Ref, nil)
			if err != nil {
				t.Fatal(err)
			}
			// Push needs the credentials (anonymous gets nothing here).
			data := []byte("pushed with helper credentials " + mode)
			d := ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data))}
			if err := r.PushBlob(ctx, reg.Ref("team/app", "v2"), d, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			if err := r.PushManifest(ctx, reg.Ref("team/app", "v2"), got.ManifestDesc, got.ManifestRaw); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(asked)
			if !strings.Contains(string(b), reg.Host()) {
				t.Fatalf("helper asked for %q", b)
			}
		})
	}

	// Wrong password from the helper: the token server says no.
	installCredentialHelper(t, "wrong", reg.Host(), "bob", "nope")
	r := newClient(t, remote.Options{DockerConfig: writeDockerConfig(t, map[string]any{"credsStore": "wrong"})})
	_, err := r.Resolve(ctx, img.Ref, nil)
	if !errdefs.IsUnauthorized(err) {
		t.Fatalf("want unauthenticated: %v", err)
	}
	t.Log(err)
	mustContain(t, err, "HTTP 401", "token")

	// A helper that cannot be run is named.
	r = newClient(t, remote.Options{DockerConfig: writeDockerConfig(t, map[string]any{"credsStore": "does-not-exist"})})
	_, err = r.Resolve(ctx, img.Ref, nil)
	mustContain(t, err, "docker-credential-does-not-exist")
}

func TestTokenExpiryRefetches(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("bob", "pw", true, time.Second))
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("layer")})
	r := newClient(t, remote.Options{})
	ctx := context.Background()
	isToken := func(q remotetest.Request) bool { return q.Path == "/token" }
	for range 3 {
		if _, err := r.Resolve(ctx, img.Ref, nil); err != nil {
			t.Fatal(err)
		}
	}
	if n := reg.Count(isToken); n != 1 {
		t.Fatalf("%d token requests before expiry, want 1", n)
	}
	time.Sleep(1100 * time.Millisecond)
	if _, err := r.Resolve(ctx, img.Ref, nil); err != nil {
		t.Fatal(err)
	}
	if n := reg.Count(isToken); n != 2 {
		t.Fatalf("%d token requests after expiry, want 2", n)
	}
}
