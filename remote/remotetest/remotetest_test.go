package remotetest_test

import (
	"bytes"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/lazypull/lazypull/remote/remotetest"
)

func get(t *testing.T, url string, h http.Header) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	for k, v := range h {
		req.Header[k] = v
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func TestRegistryBasics(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "a/b", "v1", remotetest.Layer{Data: []byte("hello world")})
	if img.Ref != reg.Host()+"/a/b:v1" || len(img.Layers) != 1 || img.ManifestDesc.Platform == nil {
		t.Fatalf("%+v", img)
	}
	resp, body := get(t, reg.URL()+"/v2/a/b/blobs/"+img.Layers[0].Digest.String(), http.Header{"Range": {"bytes=6-10"}})
	if resp.StatusCode != 206 || string(body) != "world" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	if got := reg.Blob(t, "a/b", img.ConfigDesc.Digest); !bytes.Contains(got, []byte(`"rootfs"`)) {
		t.Fatalf("config %s", got)
	}

	// Faults apply in order, for their number of uses, and can be removed.
	remove := reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, Status: 500})
	reg.Inject(remotetest.Fault{Times: 1, Status: 429, RetryAfter: "2"})
	if resp, _ := get(t, reg.URL()+"/v2/a/b/blobs/"+img.Layers[0].Digest.String(), nil); resp.StatusCode != 500 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	remove()
	if resp, _ := get(t, reg.URL()+"/v2/", nil); resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "2" {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if resp, _ := get(t, reg.URL()+"/v2/", nil); resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	reqs := reg.Requests()
	if len(reqs) != 4 || reqs[0].Range != "bytes=6-10" || reqs[0].Status != 206 || !reqs[1].Faulted || reqs[3].Faulted {
		t.Fatalf("%+v", reqs)
	}

	// Stop and Start.
	reg.Stop()
	if _, err := http.Get(reg.URL() + "/v2/"); err == nil {
		t.Fatal("still answering")
	}
	reg.Start(t)
	if resp, _ := get(t, reg.URL()+"/v2/a/b/blobs/"+img.Layers[0].Digest.String(), nil); resp.StatusCode != 200 {
		t.Fatalf("after restart: %d", resp.StatusCode)
	}
}

func TestObjectStoreSignedURLs(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "a", "v1", remotetest.Layer{Data: []byte("0123456789")})
	store := reg.RedirectBlobs(t, time.Minute)
	resp, _ := get(t, reg.URL()+"/v2/a/blobs/"+img.Layers[0].Digest.String(), nil)
	loc := resp.Header.Get("Location")
	if resp.StatusCode != 307 || loc == "" {
		t.Fatalf("no redirect: %d", resp.StatusCode)
	}
	if resp, body := get(t, loc, http.Header{"Range": {"bytes=2-4"}}); resp.StatusCode != 206 || string(body) != "234" {
		t.Fatalf("signed URL: %d %q", resp.StatusCode, body)
	}
	if resp, _ := get(t, loc, http.Header{"Authorization": {"Bearer x"}}); resp.StatusCode != 400 {
		t.Fatalf("with Authorization: %d", resp.StatusCode)
	}
	if resp, _ := get(t, loc+"x", nil); resp.StatusCode != 403 {
		t.Fatalf("tampered: %d", resp.StatusCode)
	}
	store.ExpireAll()
	if resp, body := get(t, loc, nil); resp.StatusCode != 403 || !bytes.Contains(body, []byte("expired")) {
		t.Fatalf("expired: %d %s", resp.StatusCode, body)
	}
	// Unknown blobs are not redirected.
	if resp, _ := get(t, reg.URL()+"/v2/a/blobs/sha256:"+string(bytes.Repeat([]byte("0"), 64)), nil); resp.StatusCode != 404 {
		t.Fatalf("unknown blob: %d", resp.StatusCode)
	}
	reg.StopRedirects()
	if resp, _ := get(t, reg.URL()+"/v2/a/blobs/"+img.Layers[0].Digest.String(), nil); resp.StatusCode != 200 {
		t.Fatalf("after StopRedirects: %d", resp.StatusCode)
	}
}

func TestTokenAuthRejectsForgedTokens(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("u", "p", false, 0))
	resp, _ := get(t, reg.URL()+"/v2/", nil)
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Fatalf("no challenge: %d", resp.StatusCode)
	}
	resp, _ = get(t, reg.URL()+"/v2/", http.Header{"Authorization": {"Bearer e30.e30.AAAA"}})
	if resp.StatusCode != 401 {
		t.Fatalf("forged token accepted: %d", resp.StatusCode)
	}
}
