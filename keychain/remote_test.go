package keychain

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// These tests run the keychain under the registry client against the real
// in-process registry with bearer-token auth.

func newRegistryClient(t *testing.T, k remote.CredentialSource) *remote.Registry {
	t.Helper()
	return newRegistryClientRecheck(t, k, 0)
}

func newRegistryClientRecheck(t *testing.T, k remote.CredentialSource, recheck time.Duration) *remote.Registry {
	t.Helper()
	r, err := remote.New(remote.Options{
		HostsDir:          t.TempDir(),
		DockerConfig:      filepath.Join(t.TempDir(), "none.json"),
		Keychain:          k,
		RetryBackoff:      5 * time.Millisecond,
		RequestTimeout:    5 * time.Second,
		CredentialRecheck: recheck,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.CloseIdleConnections)
	return r
}

func layerData(n int) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func readRange(t *testing.T, b *remote.Blob, data []byte, off, n int64) error {
	t.Helper()
	p := make([]byte, n)
	_, err := b.ReadAt(context.Background(), p, off)
	if err == nil && !bytes.Equal(p, data[off:off+n]) {
		t.Fatalf("wrong bytes at %d+%d", off, n)
	}
	return err
}

func tokenRequests(reg *remotetest.Registry) int {
	return reg.Count(func(q remotetest.Request) bool { return q.Path == "/token" })
}

// A credential-provider plugin hands out the password; the password
// rotates while a layer is being read lazily, and the registry starts
// refusing the old token: the next read is retried once, after the
// plugin's cached answer is dropped and the plugin run again.
func TestLazyReadSurvivesPasswordRotation(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	data := layerData(200_000)
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: data})

	pl := newPlugin(t, "test-plugin")
	pl.answers(t, response("Registry", "", map[string][2]string{reg.Host(): {"alice", "one"}}))
	cfg := strings.Replace(oneProvider, `"127.0.0.1:5000"`, `"`+reg.Host()+`"`, 1)
	providers, err := LoadProviders(context.Background(), ProvidersOptions{ConfigPath: writeConfig(t, cfg), BinDir: pl.dir})
	if err != nil {
		t.Fatal(err)
	}
	r := newRegistryClient(t, New(NewCaptured(), providers))

	b, err := r.OpenBlob(context.Background(), img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := readRange(t, b, data, 0, 1000); err != nil {
		t.Fatal(err)
	}
	if n := pl.ncalls(t); n != 1 {
		t.Fatalf("plugin runs = %d, want 1 (cached answer)", n)
	}

	// Rotation: the plugin now answers the new password, the registry
	// accepts only it, and revokes the token in use (one 401).
	reg.SetPassword("two")
	pl.answers(t, response("Registry", "", map[string][2]string{reg.Host(): {"alice", "two"}}))
	reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: http.StatusUnauthorized, Times: 1})
	reg.ResetRequests()

	if err := readRange(t, b, data, 100_000, 5000); err != nil {
		t.Fatalf("read after rotation: %v", err)
	}
	if n := pl.ncalls(t); n != 2 {
		t.Fatalf("plugin runs = %d, want 2 (re-run after the 401)", n)
	}
	if n := tokenRequests(reg); n != 1 {
		t.Fatalf("%d token requests after rotation, want 1", n)
	}
	// Later reads use the new token without more plugin runs.
	if err := readRange(t, b, data, 150_000, 5000); err != nil {
		t.Fatal(err)
	}
	if n := pl.ncalls(t); n != 2 {
		t.Fatalf("plugin runs = %d, want still 2", n)
	}
}

// countingSource returns fixed credentials and counts refreshes.
type countingSource struct {
	cred      remote.Credential
	refreshes int
	repos     []string
}

func (c *countingSource) Credentials(_ context.Context, repo, _ string) (remote.Credential, error) {
	c.repos = append(c.repos, repo)
	return c.cred, nil
}
func (c *countingSource) Refresh(string, string) { c.refreshes++ }

// Credentials that stay wrong are retried exactly once, then the read
// fails with a clear 401.
func TestWrongCredentialsRetriedOnce(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: layerData(1000)})
	src := &countingSource{cred: remote.Credential{Username: "alice", Secret: "wrong"}}
	r := newRegistryClient(t, src)
	_, err := r.Resolve(context.Background(), img.Ref, nil)
	if !errdefs.IsUnauthorized(err) {
		t.Fatalf("want unauthenticated, got %v", err)
	}
	if src.refreshes != 1 {
		t.Fatalf("%d refreshes, want 1", src.refreshes)
	}
	if strings.Contains(err.Error(), "wrong") {
		t.Fatalf("error shows the password: %v", err)
	}
	for _, repo := range src.repos {
		if repo != reg.Host()+"/private/app" {
			t.Fatalf("keychain asked for repo %q", repo)
		}
	}
	t.Log(err)
}

// Credentials captured per repository apply to that repository only.
func TestCapturedCredentialsPerRepository(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	a := reg.PushImage(t, "team/a", "v1", remotetest.Layer{Data: layerData(1000)})
	b := reg.PushImage(t, "team/b", "v1", remotetest.Layer{Data: layerData(1000)})
	captured := NewCaptured()
	if err := captured.Put(a.Ref, AuthConfig{Username: "alice", Password: "one"}); err != nil {
		t.Fatal(err)
	}
	// b was pulled anonymously before: no entry for it, but the host's
	// entry (from a) serves it too.
	r := newRegistryClient(t, New(captured))
	for _, img := range []remotetest.Image{a, b} {
		if _, err := r.Resolve(context.Background(), img.Ref, nil); err != nil {
			t.Fatalf("%s: %v", img.Ref, err)
		}
	}
	// With the host entry restricted to another server, b fails.
	captured = NewCaptured()
	captured.Put(a.Ref, AuthConfig{Username: "alice", Password: "one"})
	captured.Put(reg.Host()+"/team/b", AuthConfig{Username: "alice", Password: "one", ServerAddress: "elsewhere.example.com"})
	r = newRegistryClient(t, New(captured))
	if _, err := r.Resolve(context.Background(), a.Ref, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Resolve(context.Background(), b.Ref, nil); !errdefs.IsUnauthorized(err) {
		t.Fatalf("b with credentials for another server: %v", err)
	}
}

// A CRI registry token is sent as is: no token server round trip.
func TestRegistryTokenSentAsIs(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	data := layerData(50_000)
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: data})

	req, _ := http.NewRequest(http.MethodGet, reg.URL()+"/token?service=remotetest-registry&scope=repository:private/app:pull", nil)
	req.SetBasicAuth("alice", "one")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var tok struct{ Token string }
	if err := json.Unmarshal(body, &tok); err != nil || tok.Token == "" {
		t.Fatalf("token: %v %s", err, body)
	}

	captured := NewCaptured()
	captured.Put(img.Ref, AuthConfig{RegistryToken: tok.Token})
	r := newRegistryClient(t, New(captured))
	reg.ResetRequests()
	b, err := r.OpenBlob(context.Background(), img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := readRange(t, b, data, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	if n := tokenRequests(reg); n != 0 {
		t.Fatalf("%d token requests, want 0", n)
	}
	for _, q := range reg.Requests() {
		if q.Status == http.StatusOK || q.Status == http.StatusPartialContent {
			if q.Authorization != "Bearer "+tok.Token {
				t.Fatalf("request %s %s authorized with %q", q.Method, q.Path, q.Authorization)
			}
		}
	}
}

// A 403 to a request that carried credentials is retried once with fresh
// ones, like a 401.
func TestForbiddenWithCredentialsRetriedOnce(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	data := layerData(20_000)
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: data})
	src := &countingSource{cred: remote.Credential{Username: "alice", Secret: "one"}}
	r := newRegistryClient(t, src)
	b, err := r.OpenBlob(context.Background(), img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: http.StatusForbidden, Times: 1})
	if err := readRange(t, b, data, 0, 100); err != nil {
		t.Fatal(err)
	}
	if src.refreshes != 1 {
		t.Fatalf("%d refreshes, want 1", src.refreshes)
	}
	// Twice in a row: the second 403 is final.
	reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: http.StatusForbidden, Times: 2})
	if err := readRange(t, b, data, 200, 100); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("want permission denied, got %v", err)
	}
	if src.refreshes != 2 {
		t.Fatalf("%d refreshes, want 2", src.refreshes)
	}
}

// When a plugin's cached answer expires, a long-lived reader picks up the
// plugin's new credentials by itself, before the registry refuses the old
// ones.
func TestExpiredPluginAnswerRefreshedWhileReading(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	data := layerData(100_000)
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: data})
	pl := newPlugin(t, "test-plugin")
	pl.answers(t, response("Registry", "", map[string][2]string{reg.Host(): {"alice", "one"}}))
	cfg := strings.Replace(oneProvider, `"127.0.0.1:5000"`, `"`+reg.Host()+`"`, 1)
	clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	providers, err := LoadProviders(context.Background(), ProvidersOptions{ConfigPath: writeConfig(t, cfg), BinDir: pl.dir, Now: clock.now})
	if err != nil {
		t.Fatal(err)
	}
	const recheck = 20 * time.Millisecond
	r := newRegistryClientRecheck(t, New(providers), recheck)
	b, err := r.OpenBlob(context.Background(), img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := readRange(t, b, data, 0, 100); err != nil {
		t.Fatal(err)
	}
	// Still fresh: a recheck finds the cached answer, nothing changes.
	time.Sleep(2 * recheck)
	reg.ResetRequests()
	if err := readRange(t, b, data, 1000, 100); err != nil {
		t.Fatal(err)
	}
	if n := pl.ncalls(t); n != 1 {
		t.Fatalf("plugin runs = %d, want 1", n)
	}
	if n := tokenRequests(reg); n != 0 {
		t.Fatalf("%d token requests with unchanged credentials", n)
	}

	reg.SetPassword("two")
	pl.answers(t, response("Registry", "", map[string][2]string{reg.Host(): {"alice", "two"}}))
	clock.advance(11 * time.Minute) // the plugin's answer expires
	time.Sleep(2 * recheck)
	reg.ResetRequests()
	if err := readRange(t, b, data, 50_000, 100); err != nil {
		t.Fatal(err)
	}
	if n := pl.ncalls(t); n != 2 {
		t.Fatalf("plugin runs = %d, want 2", n)
	}
	if n := tokenRequests(reg); n != 1 {
		t.Fatalf("%d token requests, want 1 with the new password", n)
	}
	for _, q := range reg.Requests() {
		if q.Path == "/token" && q.Status != http.StatusOK {
			t.Fatalf("token request answered %d", q.Status)
		}
	}
}

// Concurrent first requests of one repository share one token fetch
// without a data race (containerd's authorizer has one when its callers
// are not serialized per scope).
func TestConcurrentFirstReads(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("alice", "one", false, time.Minute))
	data := layerData(10_000)
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: data})
	src := &lockedSource{cred: remote.Credential{Username: "alice", Secret: "one"}}
	r := newRegistryClient(t, src)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			b, err := r.OpenBlob(context.Background(), img.Ref, img.Layers[0])
			if err == nil {
				p := make([]byte, 10)
				_, err = b.ReadAt(context.Background(), p, 0)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// lockedSource is a fixed CredentialSource safe for concurrent use.
type lockedSource struct {
	mu   sync.Mutex
	cred remote.Credential
}

func (l *lockedSource) Credentials(context.Context, string, string) (remote.Credential, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cred, nil
}
func (l *lockedSource) Refresh(string, string) {}
