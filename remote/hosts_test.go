package remote_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// writeHostsToml writes <dir>/<host>/hosts.toml (and extra files there).
func writeHostsToml(t *testing.T, dir, host, toml string, files map[string][]byte) {
	t.Helper()
	hd := filepath.Join(dir, host)
	if err := os.MkdirAll(hd, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(hd, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(hd, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestHostsTomlTLSMirror(t *testing.T) {
	mirror := remotetest.NewRegistry(t, remotetest.WithTLS())
	data := randomBytes(50_000, 21)
	img := mirror.PushImage(t, "app", "v1", remotetest.Layer{Data: data})
	dir := t.TempDir()
	writeHostsToml(t, dir, "upstream.invalid:5000", `
server = "https://upstream.invalid:5000"

[host."https://`+mirror.Host()+`"]
  capabilities = ["pull", "resolve"]
  ca = "mirror-ca.pem"
`, map[string][]byte{"mirror-ca.pem": mirror.CACertPEM()})
	r := newClient(t, remote.Options{HostsDir: dir, Retries: 1})
	ctx := context.Background()
	ref := "upstream.invalid:5000/app:v1"

	got, err := r.Resolve(ctx, ref, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.ManifestDesc.Digest != img.ManifestDesc.Digest {
		t.Fatal("wrong manifest")
	}
	b, err := r.OpenBlob(ctx, ref, got.Manifest.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1000)
	if _, err := b.ReadAt(ctx, p, 100); err != nil {
		t.Fatal(err)
	}
	for _, q := range mirror.Requests() {
		if q.Proto != "HTTP/2.0" {
			t.Errorf("mirror spoken to over %s, want HTTP/2", q.Proto)
		}
		if !strings.Contains(q.RawQuery, "ns=upstream.invalid%3A5000") {
			t.Errorf("mirror request without ns: %+v", q)
		}
	}

	// Pushing goes to the server, never to a pull-only mirror.
	err = r.PushManifest(ctx, ref, got.ManifestDesc, got.ManifestRaw)
	t.Log(err)
	mustContain(t, err, "upstream.invalid:5000")
	if n := mirror.Count(func(q remotetest.Request) bool { return q.Method == "PUT" || q.Method == "POST" }); n != 0 {
		t.Fatalf("pushed to the mirror: %+v", mirror.Requests())
	}
}

func TestHostsTomlMirrorFailover(t *testing.T) {
	server := remotetest.NewRegistry(t)
	mirror := remotetest.NewRegistry(t) // empty
	img := server.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("layer")})
	dir := t.TempDir()
	writeHostsToml(t, dir, "example.test", `
server = "http://`+server.Host()+`"

[host."http://`+mirror.Host()+`"]
  capabilities = ["pull", "resolve"]
`, nil)
	r := newClient(t, remote.Options{HostsDir: dir})
	ctx := context.Background()
	got, err := r.Resolve(ctx, "example.test/app:v1", nil)
	if err != nil || got.ManifestDesc.Digest != img.ManifestDesc.Digest {
		t.Fatalf("failover: %v", err)
	}
	if mirror.Count(remotetest.ManifestGETs) != 1 || server.Count(remotetest.ManifestGETs) != 1 {
		t.Fatalf("mirror %d, server %d manifest requests", mirror.Count(remotetest.ManifestGETs), server.Count(remotetest.ManifestGETs))
	}

	// A mirror that is down costs one attempt, not the retry budget.
	mirror.Stop()
	r = newClient(t, remote.Options{HostsDir: dir, RetryBackoff: 5 * time.Second})
	start := time.Now()
	if _, err := r.Resolve(ctx, "example.test/app:v1", nil); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("failover over a dead mirror took %v", d)
	}
}

func TestTLSVerification(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTLS())
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("layer")})
	ctx := context.Background()
	dir := t.TempDir()

	// Unknown CA: a prompt, unretried failure naming the problem.
	writeHostsToml(t, dir, "secure.test", `server = "https://`+reg.Host()+`"`, nil)
	r := newClient(t, remote.Options{HostsDir: dir, RetryBackoff: 5 * time.Second})
	start := time.Now()
	_, err := r.Resolve(ctx, "secure.test/app:v1", nil)
	if !errdefs.IsUnavailable(err) || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt unavailable: %v after %v", err, time.Since(start))
	}
	t.Log(err)
	mustContain(t, err, "certificate", reg.Host())

	// skip_verify.
	writeHostsToml(t, dir, "insecure.test", `server = "https://`+reg.Host()+`"
skip_verify = true`, nil)
	r = newClient(t, remote.Options{HostsDir: dir})
	if _, err := r.Resolve(ctx, "insecure.test/app:v1", nil); err != nil {
		t.Fatal(err)
	}

	// A TLS registry on 127.0.0.1 without any configuration works too
	// (containerd's localhost rule: HTTPS without verification first).
	r = newClient(t, remote.Options{})
	if got, err := r.Resolve(ctx, img.Ref, nil); err != nil || got.ManifestDesc.Digest != img.ManifestDesc.Digest {
		t.Fatal(err)
	}
}

func TestPlainHTTP(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("layer")})
	ctx := context.Background()

	// 127.0.0.1 and localhost: plain HTTP without configuration.
	for _, ref := range []string{img.Ref, strings.Replace(img.Ref, "127.0.0.1", "localhost", 1)} {
		r := newClient(t, remote.Options{})
		if _, err := r.Resolve(ctx, ref, nil); err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
	}

	// PlainHTTP forces it even where hosts.toml says https.
	dir := t.TempDir()
	writeHostsToml(t, dir, "plain.test", `server = "https://`+reg.Host()+`"`, nil)
	r := newClient(t, remote.Options{HostsDir: dir, PlainHTTP: true})
	if _, err := r.Resolve(ctx, "plain.test/app:v1", nil); err != nil {
		t.Fatal(err)
	}
}
