package keychain

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lazypull/lazypull/remote"
)

func TestMatchImage(t *testing.T) {
	for _, tc := range []struct {
		pattern, image string
		want           bool
	}{
		{"registry.io", "registry.io/app", true},
		{"registry.io", "registry.io/team/app:v1", true},
		{"*.registry.io", "a.registry.io/app", true},
		{"*.registry.io", "registry.io/app", false},     // part counts differ
		{"*.registry.io", "a.b.registry.io/app", false}, // * does not span a dot
		{"*.*.registry.io", "a.b.registry.io/app", true},
		{"*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com/app", true},
		{"*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.cn/app", false},
		{"registry.io:8080", "registry.io:8080/app", true},
		{"registry.io:8080", "registry.io/app", false},
		{"registry.io", "registry.io:8080/app", false},
		{"registry.io/team", "registry.io/team/app", true},
		{"registry.io/team", "registry.io/other/app", false},
		{"[", "registry.io/app", false},
		{"127.0.0.1:5000", "127.0.0.1:5000/private/app", true},
	} {
		if got := matchImage(tc.pattern, tc.image); got != tc.want {
			t.Errorf("matchImage(%q, %q) = %v, want %v", tc.pattern, tc.image, got, tc.want)
		}
	}
}

// plugin is a credential-provider exec plugin written as a shell script.
// Each run appends a line to calls, saves its stdin, args and one env
// variable, then prints the content of the file answer (or sleeps, or
// fails, as the test writes it there).
type plugin struct {
	dir, calls, stdin, answer string
}

func newPlugin(t *testing.T, name string) *plugin {
	t.Helper()
	dir := t.TempDir()
	p := &plugin{
		dir:    dir,
		calls:  filepath.Join(dir, "calls"),
		stdin:  filepath.Join(dir, "stdin"),
		answer: filepath.Join(dir, "answer"),
	}
	script := `#!/bin/sh
cat > '` + p.stdin + `'
echo "$* $PLUGIN_ENV" >> '` + p.calls + `'
. '` + p.answer + `'
`
	if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// answers makes the plugin print resp as JSON.
func (p *plugin) answers(t *testing.T, resp any) {
	t.Helper()
	b, err := json.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	p.script(t, "echo '"+string(b)+"'")
}

// script sets the shell code the plugin runs after recording its call.
func (p *plugin) script(t *testing.T, code string) {
	t.Helper()
	if err := os.WriteFile(p.answer, []byte(code+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (p *plugin) ncalls(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(p.calls)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

func response(cacheKey string, duration string, auth map[string][2]string) map[string]any {
	a := map[string]any{}
	for k, v := range auth {
		a[k] = map[string]string{"username": v[0], "password": v[1]}
	}
	r := map[string]any{
		"apiVersion":   PluginAPIVersion,
		"kind":         "CredentialProviderResponse",
		"cacheKeyType": cacheKey,
		"auth":         a,
	}
	if duration != "" {
		r["cacheDuration"] = duration
	}
	return r
}

// fakeClock is a settable clock for cache expiry.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const oneProvider = `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: test-plugin
    matchImages:
      - "*.example.com"
      - "127.0.0.1:5000"
    defaultCacheDuration: 10m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: ["get-credentials", "--verbose"]
    env:
      - name: PLUGIN_ENV
        value: from-config
`

func loadOne(t *testing.T, timeout time.Duration) (*Providers, *plugin, *fakeClock) {
	t.Helper()
	pl := newPlugin(t, "test-plugin")
	clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	p, err := LoadProviders(context.Background(), ProvidersOptions{
		ConfigPath: writeConfig(t, oneProvider),
		BinDir:     pl.dir,
		Timeout:    timeout,
		Now:        clock.now,
	})
	if err != nil {
		t.Fatal(err)
	}
	return p, pl, clock
}

func lookup(t *testing.T, p Source, repo string) (remote.Credential, bool) {
	t.Helper()
	cred, ok, err := p.Lookup(context.Background(), repo, domainOf(repo))
	if err != nil {
		t.Fatalf("lookup %s: %v", repo, err)
	}
	return cred, ok
}

func TestProviderRequestAndAnswer(t *testing.T) {
	p, pl, _ := loadOne(t, 0)
	pl.answers(t, response("Image", "", map[string][2]string{
		"*.example.com":        {"generic", "pw-generic"},
		"reg.example.com/team": {"team", "pw-team"},
	}))
	cred, ok := lookup(t, p, "reg.example.com/team/app")
	if !ok || cred.Username != "team" || cred.Secret != "pw-team" {
		t.Fatalf("got %v %v, want the most specific entry (team)", cred, ok)
	}
	var req map[string]any
	b, _ := os.ReadFile(pl.stdin)
	if err := json.Unmarshal(b, &req); err != nil {
		t.Fatalf("request %q: %v", b, err)
	}
	if req["kind"] != "CredentialProviderRequest" || req["apiVersion"] != PluginAPIVersion || req["image"] != "reg.example.com/team/app" {
		t.Fatalf("request = %v", req)
	}
	calls, _ := os.ReadFile(pl.calls)
	if string(calls) != "get-credentials --verbose from-config\n" {
		t.Fatalf("args/env seen by the plugin: %q", calls)
	}
	cred, ok = lookup(t, p, "other.example.com/app")
	if !ok || cred.Username != "generic" {
		t.Fatalf("got %v %v, want generic", cred, ok)
	}
	// Not matched by matchImages: the plugin is not run.
	before := pl.ncalls(t)
	if _, ok := lookup(t, p, "docker.io/library/alpine"); ok {
		t.Fatal("credentials for an image no provider matches")
	}
	if pl.ncalls(t) != before {
		t.Fatal("plugin run for an image its matchImages do not match")
	}
	// An answer with no matching auth entry: no credentials.
	pl.answers(t, response("Image", "", map[string][2]string{"elsewhere.io": {"x", "y"}}))
	if _, ok := lookup(t, p, "127.0.0.1:5000/app"); ok {
		t.Fatal("credentials from a non-matching auth key")
	}
}

func TestProviderCacheKeyTypesAndExpiry(t *testing.T) {
	for _, tc := range []struct {
		keyType, duration string
		// calls after: repo A, repo A again, repo B (same registry),
		// repo A after 11 minutes.
		want [4]int
	}{
		{"Image", "", [4]int{1, 1, 2, 3}},
		{"Registry", "", [4]int{1, 1, 1, 2}},
		{"Global", "", [4]int{1, 1, 1, 2}},
		{"Registry", "1h", [4]int{1, 1, 1, 1}}, // the answer's duration wins
		{"Registry", "0s", [4]int{1, 2, 3, 4}}, // zero: not cached
	} {
		t.Run(tc.keyType+"-"+tc.duration, func(t *testing.T) {
			p, pl, clock := loadOne(t, 0)
			pl.answers(t, response(tc.keyType, tc.duration, map[string][2]string{"*.example.com": {"u", "p"}}))
			var got [4]int
			lookup(t, p, "a.example.com/one")
			got[0] = pl.ncalls(t)
			lookup(t, p, "a.example.com/one")
			got[1] = pl.ncalls(t)
			lookup(t, p, "a.example.com/two")
			got[2] = pl.ncalls(t)
			clock.advance(11 * time.Minute)
			if _, ok := lookup(t, p, "a.example.com/one"); !ok {
				t.Fatal("no credentials after expiry")
			}
			got[3] = pl.ncalls(t)
			if got != tc.want {
				t.Fatalf("plugin runs = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestProviderForget(t *testing.T) {
	p, pl, _ := loadOne(t, 0)
	pl.answers(t, response("Registry", "", map[string][2]string{"*.example.com": {"u", "old"}}))
	lookup(t, p, "a.example.com/one")
	pl.answers(t, response("Registry", "", map[string][2]string{"*.example.com": {"u", "new"}}))
	if cred, _ := lookup(t, p, "a.example.com/one"); cred.Secret != "old" {
		t.Fatalf("cached answer not used: %v", cred.Secret)
	}
	p.Forget("a.example.com/one", "a.example.com")
	if cred, _ := lookup(t, p, "a.example.com/one"); cred.Secret != "new" {
		t.Fatalf("after Forget: %v, want the fresh answer", cred.Secret)
	}
	if n := pl.ncalls(t); n != 2 {
		t.Fatalf("plugin runs = %d, want 2", n)
	}
}

func TestProviderFailures(t *testing.T) {
	for name, code := range map[string]string{
		"exit status":   "echo 'boom' >&2; exit 3",
		"not json":      "echo 'password=hunter2'",
		"wrong kind":    `echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"Other","cacheKeyType":"Image"}'`,
		"wrong version": `echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1alpha1","kind":"CredentialProviderResponse","cacheKeyType":"Image"}'`,
		"bad key type":  `echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Pod"}'`,
		"bad auth key":  `echo '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"[":{"username":"u","password":"p"}}}'`,
		"huge answer":   `head -c 2000000 /dev/zero`,
		"timeout":       "exec sleep 30",
	} {
		t.Run(name, func(t *testing.T) {
			p, pl, _ := loadOne(t, 300*time.Millisecond)
			pl.script(t, code)
			_, ok, err := p.Lookup(context.Background(), "a.example.com/app", "a.example.com")
			if err == nil || ok {
				t.Fatalf("ok=%v err=%v, want an error", ok, err)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error quotes the plugin's output: %v", err)
			}
			if name == "timeout" && !strings.Contains(err.Error(), "timed out") {
				t.Fatalf("error %v does not say it timed out", err)
			}
			// Failures are not cached: the next lookup runs the plugin again.
			p.Lookup(context.Background(), "a.example.com/app", "a.example.com")
			if n := pl.ncalls(t); n != 2 {
				t.Fatalf("plugin runs = %d, want 2", n)
			}
		})
	}
}

func TestLoadProvidersErrors(t *testing.T) {
	pl := newPlugin(t, "test-plugin")
	base := strings.ReplaceAll(oneProvider, "    env:\n      - name: PLUGIN_ENV\n        value: from-config\n", "")
	for name, cfg := range map[string]string{
		"unknown key":     base + "    bogus: 1\n",
		"wrong kind":      strings.Replace(base, "kind: CredentialProviderConfig", "kind: Other", 1),
		"plugin version":  strings.Replace(base, "apiVersion: credentialprovider.kubelet.k8s.io/v1", "apiVersion: credentialprovider.kubelet.k8s.io/v2", 1),
		"no duration":     strings.Replace(base, "    defaultCacheDuration: 10m\n", "", 1),
		"missing plugin":  strings.Replace(base, "name: test-plugin", "name: absent", 1),
		"path in name":    strings.Replace(base, "name: test-plugin", "name: ../test-plugin", 1),
		"bad pattern":     strings.Replace(base, `"127.0.0.1:5000"`, `"["`, 1),
		"no match images": strings.Replace(strings.Replace(base, "      - \"*.example.com\"\n", "", 1), "      - \"127.0.0.1:5000\"\n", "", 1),
	} {
		if _, err := LoadProviders(context.Background(), ProvidersOptions{ConfigPath: writeConfig(t, cfg), BinDir: pl.dir}); err == nil {
			t.Errorf("%s: loaded", name)
		}
	}
	// A provider needing service account tokens is skipped, not fatal.
	withTokens := base + "    tokenAttributes:\n      serviceAccountTokenAudience: aud\n      cacheType: ServiceAccount\n      requireServiceAccount: true\n"
	p, err := LoadProviders(context.Background(), ProvidersOptions{ConfigPath: writeConfig(t, withTokens), BinDir: pl.dir})
	if err != nil || len(p.Names()) != 0 {
		t.Fatalf("tokenAttributes provider: %v %v", err, p)
	}
	// JSON works too.
	js := `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"test-plugin","matchImages":["x.io"],"defaultCacheDuration":"1m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`
	p, err = LoadProviders(context.Background(), ProvidersOptions{ConfigPath: writeConfig(t, js), BinDir: pl.dir})
	if err != nil || len(p.Names()) != 1 {
		t.Fatalf("JSON config: %v", err)
	}
}
