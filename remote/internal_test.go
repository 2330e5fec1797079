package remote

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		in               string
		start, end, size int64
		ok               bool
	}{
		{"bytes 0-99/1000", 0, 99, 1000, true},
		{"bytes 5-5/*", 5, 5, -1, true},
		{" bytes 10-19/20 ", 10, 19, 20, true},
		{"bytes 10-19/19", 0, 0, 0, false},
		{"bytes 20-10/100", 0, 0, 0, false},
		{"bytes -1-10/100", 0, 0, 0, false},
		{"bytes */100", 0, 0, 0, false},
		{"items 0-1/2", 0, 0, 0, false},
		{"", 0, 0, 0, false},
		{"bytes 0-99", 0, 0, 0, false},
	} {
		s, e, n, err := parseContentRange(tc.in)
		if (err == nil) != tc.ok || (tc.ok && (s != tc.start || e != tc.end || n != tc.size)) {
			t.Errorf("%q: %d %d %d %v", tc.in, s, e, n, err)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"7":                             7 * time.Second,
		"-3":                            0,
		"soon":                          0,
		"Thu, 02 Jan 2025 03:04:15 GMT": 10 * time.Second,
		"Thu, 02 Jan 2025 03:00:00 GMT": 0,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("%q: %v, want %v", in, got, want)
		}
	}
}

func TestStatusErrorParsesRegistryErrors(t *testing.T) {
	req, _ := http.NewRequest("GET", "https://reg.example/v2/x/blobs/sha256:00", nil)
	resp := &http.Response{StatusCode: 404, Request: req, Header: http.Header{}}
	e := statusError(resp, []byte(`{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:00"},{"code":"X","message":"y"}]}`))
	if e.Code != "BLOB_UNKNOWN, X" || e.Message != "blob unknown to registry; y" || e.Host != "reg.example" || !errdefs.IsNotFound(e) || e.retry {
		t.Fatalf("%#v", e)
	}
	resp = &http.Response{StatusCode: 503, Request: req, Header: http.Header{"Retry-After": {"3"}}}
	e = statusError(resp, []byte("<html>busy</html>"))
	if e.Message != "" || !e.retry || e.retryAfter != 3*time.Second || !errdefs.IsUnavailable(e) {
		t.Fatalf("%#v", e)
	}
	e = statusError(&http.Response{StatusCode: 403, Request: req, Header: http.Header{}}, []byte("denied by policy"))
	if e.Message != "denied by policy" || !errdefs.IsPermissionDenied(e) {
		t.Fatalf("%#v", e)
	}
	e.Op, e.Repo, e.Ref, e.Range, e.Err, e.Attempts = "read", "reg.example/x", "sha256:00", "bytes=0-9", errors.New("cause"), 3
	want := "read bytes=0-9 of reg.example/x@sha256:00 (host reg.example): HTTP 403 Forbidden: denied by policy: cause (gave up after 3 attempts)"
	if e.Error() != want {
		t.Fatalf("got  %s\nwant %s", e.Error(), want)
	}
}

func TestDockerCredentials(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.json")
	write := func(v any) {
		b, _ := json.Marshal(v)
		os.WriteFile(cfg, b, 0o600)
	}
	d := &dockerCredentials{path: cfg}

	write(map[string]any{"auths": map[string]any{
		"https://index.docker.io/v1/": map[string]string{"auth": "aHViOnB3"}, // hub:pw
		"ghcr.io":                     map[string]string{"identitytoken": "refresh"},
		"https://Quay.io/v2/":         map[string]string{"username": "q", "password": "p:w"},
		"colon.example":               map[string]string{"auth": "dTpwOnc="}, // u:p:w
	}})
	for host, want := range map[string][2]string{
		"registry-1.docker.io": {"hub", "pw"},
		"docker.io":            {"hub", "pw"},
		"ghcr.io":              {"", "refresh"},
		"quay.io":              {"q", "p:w"},
		"colon.example":        {"u", "p:w"},
		"unknown.example":      {"", ""},
	} {
		u, s, err := d.get(host)
		if err != nil || u != want[0] || s != want[1] {
			t.Errorf("%s: %q %q %v", host, u, s, err)
		}
	}

	write(map[string]any{"auths": map[string]any{"bad.example": map[string]string{"auth": "%%%"}}})
	if _, _, err := d.get("bad.example"); err == nil || !strings.Contains(err.Error(), "base64") {
		t.Errorf("bad base64: %v", err)
	}
	os.Remove(cfg)
	if u, s, err := d.get("x"); u != "" || s != "" || err != nil {
		t.Errorf("missing file: %q %q %v", u, s, err)
	}
}

func TestManifestMediaType(t *testing.T) {
	for _, tc := range []struct{ ct, body, want string }{
		{"", `{"mediaType":"application/vnd.oci.image.index.v1+json"}`, ocispec.MediaTypeImageIndex},
		{"application/json", `{"schemaVersion":2,"manifests":[]}`, ocispec.MediaTypeImageIndex},
		{"application/json", `{"schemaVersion":2,"config":{},"layers":[]}`, ocispec.MediaTypeImageManifest},
		{mediaTypeDockerManifest + "; charset=utf-8", `{"schemaVersion":2,"config":{}}`, mediaTypeDockerManifest},
		{"text/plain", `{"schemaVersion":1,"fsLayers":[]}`, mediaTypeDockerSchema1},
		{"application/octet-stream", `garbage`, "application/octet-stream"},
	} {
		if got := manifestMediaType(tc.ct, []byte(tc.body)); got != tc.want {
			t.Errorf("%s %s: %s", tc.ct, tc.body, got)
		}
	}
}

func TestSelectManifest(t *testing.T) {
	idx := ocispec.Index{Manifests: []ocispec.Descriptor{
		{Digest: "sha256:a", Platform: &ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v6"}},
		{Digest: "sha256:b", Platform: &ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}},
		{Digest: "sha256:c", Platform: &ocispec.Platform{OS: "unknown", Architecture: "unknown"}},
	}}
	d, err := selectManifest(idx, platforms.Only(ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}))
	if err != nil || d.Digest != "sha256:b" {
		t.Fatalf("v7: %v %v", d.Digest, err)
	}
	d, err = selectManifest(idx, platforms.Only(ocispec.Platform{OS: "linux", Architecture: "arm", Variant: "v6"}))
	if err != nil || d.Digest != "sha256:a" {
		t.Fatalf("v6: %v %v", d.Digest, err)
	}
	if _, err := selectManifest(idx, platforms.Only(ocispec.Platform{OS: "windows", Architecture: "amd64"})); err == nil ||
		!strings.Contains(err.Error(), "linux/arm/v6, linux/arm/v7, unknown/unknown") {
		t.Fatalf("no match: %v", err)
	}
	// A single entry without platform (nested index) is taken.
	d, err = selectManifest(ocispec.Index{Manifests: []ocispec.Descriptor{{Digest: "sha256:n"}}}, platforms.Default())
	if err != nil || d.Digest != "sha256:n" {
		t.Fatalf("single: %v", err)
	}
}

func TestParseRef(t *testing.T) {
	for in, want := range map[string]string{
		"alpine":                    "docker.io/library/alpine:latest",
		"127.0.0.1:5000/a/b:v1":     "127.0.0.1:5000/a/b:v1",
		"localhost/x@sha256:" + sha: "localhost/x@sha256:" + sha,
		"r.io/x:t@sha256:" + sha:    "r.io/x:t@sha256:" + sha,
	} {
		spec, err := parseRef(in)
		if err != nil || spec.String() != want {
			t.Errorf("%s: %s %v", in, spec, err)
		}
	}
	spec, _ := parseRef("r.io/x:t@sha256:" + sha)
	if spec.object() != "sha256:"+sha || spec.tag != "t" {
		t.Errorf("object %s", spec.object())
	}
	for _, bad := range []string{"", "UPPER", "a::b", "x@sha256:short"} {
		if _, err := parseRef(bad); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

const sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestBackoff(t *testing.T) {
	r := &Registry{opts: Options{RetryBackoff: 100 * time.Millisecond}}
	for i, want := range []time.Duration{100, 200, 400, 800} {
		want *= time.Millisecond
		for range 20 {
			if d := r.backoff(i + 1); d < want/2 || d > want {
				t.Fatalf("backoff(%d) = %v, want in [%v, %v]", i+1, d, want/2, want)
			}
		}
	}
	if d := r.backoff(30); d > maxBackoff {
		t.Fatalf("uncapped: %v", d)
	}
}
