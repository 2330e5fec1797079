package keychain

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazypull/lazypull/remote"
)

func TestCaptured(t *testing.T) {
	c := NewCaptured()
	if err := c.Put("127.0.0.1:5000/team/app:v1", AuthConfig{Username: "alice", Password: "pw1"}); err != nil {
		t.Fatal(err)
	}
	check := func(repo, host string, want remote.Credential, wantOK bool) {
		t.Helper()
		got, ok, err := c.Lookup(context.Background(), repo, host)
		if err != nil || ok != wantOK || got != want {
			t.Fatalf("Lookup(%s, %s) = %v %v %v, want %v %v", repo, host, got, ok, err, want, wantOK)
		}
	}
	alice := remote.Credential{Username: "alice", Secret: "pw1"}
	check("127.0.0.1:5000/team/app", "127.0.0.1:5000", alice, true)
	// Another repository of the same host gets the host's credentials.
	check("127.0.0.1:5000/other", "127.0.0.1:5000", alice, true)
	check("127.0.0.1:5001/team/app", "127.0.0.1:5001", remote.Credential{}, false)

	// A later pull refreshes them, also given as base64 auth.
	auth := base64.StdEncoding.EncodeToString([]byte("alice:pw2"))
	if err := c.Put("127.0.0.1:5000/team/app@sha256:"+strings.Repeat("a", 64), AuthConfig{Auth: auth}); err != nil {
		t.Fatal(err)
	}
	check("127.0.0.1:5000/team/app", "127.0.0.1:5000", remote.Credential{Username: "alice", Secret: "pw2"}, true)

	// Per-repository entries win over the host's.
	c.Put("127.0.0.1:5000/other", AuthConfig{IdentityToken: "idtok"})
	c.Put("127.0.0.1:5000/third", AuthConfig{Username: "bob", Password: "b"})
	check("127.0.0.1:5000/other", "127.0.0.1:5000", remote.Credential{Secret: "idtok"}, true)
	check("127.0.0.1:5000/team/app", "127.0.0.1:5000", remote.Credential{Username: "alice", Secret: "pw2"}, true)

	// A server address restricts them to that host (not a mirror).
	c.Put("docker.io/library/alpine", AuthConfig{RegistryToken: "rt", ServerAddress: "https://index.docker.io/v1/"})
	check("docker.io/library/alpine", "registry-1.docker.io", remote.Credential{RegistryToken: "rt"}, true)
	check("docker.io/library/alpine", "mirror.local:5000", remote.Credential{}, false)

	// An anonymous pull removes the repository's entry.
	c.Put("127.0.0.1:5000/other:v2", AuthConfig{})
	check("127.0.0.1:5000/other", "127.0.0.1:5000", remote.Credential{Username: "bob", Secret: "b"}, true)

	for _, bad := range []AuthConfig{{Auth: "!!!"}, {Auth: base64.StdEncoding.EncodeToString([]byte("nocolon"))}} {
		if err := c.Put("x.io/a", bad); err == nil {
			t.Fatalf("Put(%+v) accepted", bad)
		} else if strings.Contains(err.Error(), bad.Auth) {
			t.Fatalf("error quotes the auth field: %v", err)
		}
	}
	if err := c.Put("UPPER/Case", AuthConfig{Username: "u"}); err == nil {
		t.Fatal("invalid reference accepted")
	}
}

func TestCredentialStringRedacts(t *testing.T) {
	c := remote.Credential{Username: "alice", Secret: "topsecret", RegistryToken: ""}
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%v %+v %#v", c, c, c)} {
		if strings.Contains(s, "topsecret") {
			t.Fatalf("%q shows the secret", s)
		}
	}
}

// stub is a Source answering from a map, counting Forget calls.
type stub struct {
	creds  map[string]remote.Credential
	err    error
	forgot int
}

func (s *stub) Lookup(_ context.Context, repo, _ string) (remote.Credential, bool, error) {
	if s.err != nil {
		return remote.Credential{}, false, s.err
	}
	c, ok := s.creds[repo]
	return c, ok, nil
}
func (s *stub) Forget(string, string) { s.forgot++ }

func TestKeychainOrder(t *testing.T) {
	ctx := context.Background()
	captured := NewCaptured()
	captured.Put("reg.example.com/app", AuthConfig{Username: "cri", Password: "1"})

	pl := newPlugin(t, "test-plugin")
	pl.answers(t, response("Image", "", map[string][2]string{"*.example.com": {"plugin", "2"}}))
	providers, err := LoadProviders(ctx, ProvidersOptions{ConfigPath: writeConfig(t, oneProvider), BinDir: pl.dir})
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(t.TempDir(), "config.json")
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{
		"reg.example.com":   map[string]string{"username": "docker", "password": "3"},
		"other.example.org": map[string]string{"username": "docker", "password": "3"},
	}})
	os.WriteFile(cfgPath, b, 0o600)

	k := New(captured, providers, DockerConfig(cfgPath))
	for repo, want := range map[string]string{
		"reg.example.com/app":   "cri",    // captured first
		"reg2.example.com/app":  "plugin", // plugin matches
		"other.example.org/app": "docker", // only docker config has it
		"nowhere.io/app":        "",       // anonymous
	} {
		got, err := k.Credentials(ctx, repo, domainOf(repo))
		if err != nil || got.Username != want {
			t.Errorf("%s: got %v %v, want user %q", repo, got, err, want)
		}
	}

	// A failing source is skipped; its error is returned only when no
	// other source answers.
	failing := &stub{err: fmt.Errorf("plugin crashed")}
	good := &stub{creds: map[string]remote.Credential{"a.io/x": {Username: "u"}}}
	k = New(failing, nil, good)
	if got, err := k.Credentials(ctx, "a.io/x", "a.io"); err != nil || got.Username != "u" {
		t.Fatalf("got %v %v", got, err)
	}
	if _, err := k.Credentials(ctx, "a.io/y", "a.io"); err == nil || !strings.Contains(err.Error(), "plugin crashed") {
		t.Fatalf("err = %v", err)
	}
	k.Refresh("a.io/x", "a.io")
	if failing.forgot != 1 || good.forgot != 1 {
		t.Fatal("Refresh did not reach every source")
	}
}

func TestCapturedSwapUndo(t *testing.T) {
	ctx := context.Background()
	c := NewCaptured()
	lookup := func(repo string) string {
		t.Helper()
		got, _, _ := c.Lookup(ctx, repo, "reg.io")
		return got.Secret
	}
	c.Put("reg.io/app", AuthConfig{Username: "u", Password: "good"})
	undo, err := c.Swap("reg.io/app:v2", AuthConfig{Username: "u", Password: "bad"})
	if err != nil || lookup("reg.io/app") != "bad" || lookup("reg.io/other") != "bad" {
		t.Fatalf("after Swap: %q %q %v", lookup("reg.io/app"), lookup("reg.io/other"), err)
	}
	undo()
	if lookup("reg.io/app") != "good" || lookup("reg.io/other") != "good" {
		t.Fatalf("after undo: %q %q", lookup("reg.io/app"), lookup("reg.io/other"))
	}

	// A newer pull wins over an older pull's undo.
	undo, _ = c.Swap("reg.io/app", AuthConfig{Username: "u", Password: "bad"})
	c.Put("reg.io/app", AuthConfig{Username: "u", Password: "newer"})
	undo()
	if lookup("reg.io/app") != "newer" {
		t.Fatalf("undo clobbered a newer pull: %q", lookup("reg.io/app"))
	}

	// Undoing a first pull leaves nothing.
	undo, _ = c.Swap("reg.io/fresh", AuthConfig{Username: "u", Password: "x"})
	undo()
	if got, ok, _ := c.Lookup(ctx, "reg.io/fresh", "reg.io"); ok && got.Secret == "x" {
		t.Fatal("undo of a first pull left its credentials")
	}
}
