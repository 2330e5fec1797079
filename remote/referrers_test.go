package remote_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

const testArtifactType = "application/vnd.lazypull.test.v1+json"

// referrersFront serves the referrers API in front of a real registry
// (distribution has none): it forwards everything, notes the subject of
// every manifest pushed through it (answering with OCI-Subject, as the
// spec asks of registries that index referrers), and answers GET
// /v2/<repo>/referrers/<digest> from those notes.
type referrersFront struct {
	mu   sync.Mutex
	refs map[string][]ocispec.Descriptor // "<repo>@<subject>"
	srv  *httptest.Server
}

func newReferrersFront(t *testing.T, reg *remotetest.Registry) *referrersFront {
	u, err := url.Parse(reg.URL())
	if err != nil {
		t.Fatal(err)
	}
	f := &referrersFront{refs: map[string][]ocispec.Descriptor{}}
	proxy := httputil.NewSingleHostReverseProxy(u)
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		p := strings.TrimPrefix(req.URL.Path, "/v2/")
		if i := strings.LastIndex(p, "/referrers/"); i > 0 && req.Method == http.MethodGet {
			f.serveReferrers(w, req, p[:i], p[i+len("/referrers/"):])
			return
		}
		if i := strings.LastIndex(p, "/manifests/"); i > 0 && req.Method == http.MethodPut {
			body, _ := io.ReadAll(req.Body)
			req.Body = io.NopCloser(bytes.NewReader(body))
			var m ocispec.Manifest
			if json.Unmarshal(body, &m) == nil && m.Subject != nil {
				rec := httptest.NewRecorder()
				proxy.ServeHTTP(rec, req)
				if rec.Code == http.StatusCreated {
					d := ocispec.Descriptor{MediaType: m.MediaType, ArtifactType: m.ArtifactType, Digest: digest.FromBytes(body), Size: int64(len(body)), Annotations: m.Annotations}
					f.mu.Lock()
					key := p[:i] + "@" + m.Subject.Digest.String()
					f.refs[key] = append(f.refs[key], d)
					f.mu.Unlock()
					rec.Header().Set("OCI-Subject", m.Subject.Digest.String())
				}
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				_, _ = w.Write(rec.Body.Bytes())
				return
			}
		}
		proxy.ServeHTTP(w, req)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *referrersFront) serveReferrers(w http.ResponseWriter, req *http.Request, repo, subject string) {
	f.mu.Lock()
	all := f.refs[repo+"@"+subject]
	f.mu.Unlock()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{}}
	at := req.URL.Query().Get("artifactType")
	for _, d := range all {
		if at == "" || d.ArtifactType == at {
			idx.Manifests = append(idx.Manifests, d)
		}
	}
	if at != "" {
		w.Header().Set("OCI-Filters-Applied", "artifactType")
	}
	w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
	_ = json.NewEncoder(w).Encode(idx)
}

func (f *referrersFront) host() string { return strings.TrimPrefix(f.srv.URL, "http://") }

// pushAndList pushes two artifacts (and one of another type) for img's
// manifest through client at host and checks what Referrers and
// FetchArtifact give back.
func pushAndList(t *testing.T, client *remote.Registry, host string, img remotetest.Image) {
	ctx := context.Background()
	ref := host + "/app:v1"
	subject := img.ManifestDesc
	subject.Platform = nil
	var pushed []ocispec.Descriptor
	for i, data := range []string{`{"n":1}`, `{"n":2}`} {
		d, err := client.PushReferrer(ctx, ref, remote.Artifact{
			ArtifactType: testArtifactType, MediaType: testArtifactType, Data: []byte(data),
			Subject: subject, Annotations: map[string]string{"n": string(rune('1' + i))},
		})
		if err != nil {
			t.Fatal(err)
		}
		pushed = append(pushed, d)
	}
	if _, err := client.PushReferrer(ctx, ref, remote.Artifact{
		ArtifactType: "application/vnd.other", MediaType: "application/vnd.other", Data: []byte("x"), Subject: subject,
	}); err != nil {
		t.Fatal(err)
	}
	got, err := client.Referrers(ctx, ref, subject.Digest, testArtifactType)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Digest != pushed[0].Digest || got[1].Digest != pushed[1].Digest {
		t.Fatalf("referrers %+v, want %v", got, pushed)
	}
	if got[1].Annotations["n"] != "2" || got[1].Annotations[ocispec.AnnotationCreated] == "" || got[1].ArtifactType != testArtifactType {
		t.Fatalf("referrer entry lost its annotations or type: %+v", got[1])
	}
	all, err := client.Referrers(ctx, ref, subject.Digest, "")
	if err != nil || len(all) != 3 {
		t.Fatalf("all referrers: %d, %v", len(all), err)
	}
	data, err := client.FetchArtifact(ctx, ref, got[1], testArtifactType, testArtifactType, 1<<10)
	if err != nil || string(data) != `{"n":2}` {
		t.Fatalf("FetchArtifact: %q, %v", data, err)
	}
	// Bounded, and typed.
	if _, err := client.FetchArtifact(ctx, ref, got[1], testArtifactType, testArtifactType, 3); !errdefs.IsOutOfRange(err) {
		t.Fatalf("FetchArtifact over the limit: %v", err)
	}
	if _, err := client.FetchArtifact(ctx, ref, got[1], "application/vnd.other", testArtifactType, 1<<10); err == nil {
		t.Fatal("FetchArtifact took an artifact of another type")
	}
	// No referrers for another subject.
	none, err := client.Referrers(ctx, ref, digest.FromString("nothing"), testArtifactType)
	if err != nil || len(none) != 0 {
		t.Fatalf("referrers of an unknown subject: %v, %v", none, err)
	}
}

func TestReferrersTagSchema(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: randomBytes(1000, 1)})
	client := newClient(t, remote.Options{PlainHTTP: true})
	pushAndList(t, client, reg.Host(), img)

	// distribution has no referrers API: the client asked it, then used
	// the tag, which holds an index of the artifacts.
	// Once per lookup: a 404 is not retried.
	if n := reg.Count(func(q remotetest.Request) bool { return strings.Contains(q.Path, "/referrers/") }); n != 3 {
		t.Fatalf("the referrers API was asked %d times for 3 lookups", n)
	}
	desc, raw, err := client.FetchIndexOrManifest(context.Background(), reg.Ref("app", remote.ReferrersTag(img.ManifestDesc.Digest)))
	if err != nil {
		t.Fatal(err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(raw, &idx); err != nil || desc.MediaType != ocispec.MediaTypeImageIndex || len(idx.Manifests) != 3 {
		t.Fatalf("referrers tag: %s %d entries %v", desc.MediaType, len(idx.Manifests), err)
	}
	// The artifact manifest is an OCI 1.1 artifact: artifactType, empty
	// config, subject.
	_, raw, err = client.FetchIndexOrManifest(context.Background(), reg.Ref("app", idx.Manifests[0].Digest.String()))
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	if m.ArtifactType != testArtifactType || m.Config.Digest != ocispec.DescriptorEmptyJSON.Digest ||
		m.Subject == nil || m.Subject.Digest != img.ManifestDesc.Digest || len(m.Layers) != 1 {
		t.Fatalf("artifact manifest %s", raw)
	}
}

func TestReferrersAPI(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: randomBytes(1000, 2)})
	front := newReferrersFront(t, reg)
	client := newClient(t, remote.Options{PlainHTTP: true})
	pushAndList(t, client, front.host(), img)
	// The registry indexed them: no referrers tag was written.
	_, _, err := client.FetchIndexOrManifest(context.Background(), reg.Ref("app", remote.ReferrersTag(img.ManifestDesc.Digest)))
	if !errdefs.IsNotFound(err) {
		t.Fatalf("referrers tag written although the registry has the API: %v", err)
	}
}

func TestReferrersHostile(t *testing.T) {
	subject := digest.FromString("image")
	var answer func(w http.ResponseWriter)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if strings.Contains(req.URL.Path, "/referrers/") {
			answer(w)
			return
		}
		http.NotFound(w, req)
	}))
	t.Cleanup(srv.Close)
	client := newClient(t, remote.Options{PlainHTTP: true, Retries: -1})
	ref := strings.TrimPrefix(srv.URL, "http://") + "/app:v1"
	ctx := context.Background()

	answer = func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
		_, _ = w.Write([]byte(`{"manifests": [`))
	}
	if _, err := client.Referrers(ctx, ref, subject, testArtifactType); err == nil {
		t.Fatal("a truncated referrers index was accepted")
	}

	answer = func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
		_, _ = w.Write([]byte(`{"schemaVersion":2,"manifests":[
			{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:nothex","size":10,"artifactType":"` + testArtifactType + `"},
			{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + subject.String() + `","size":-1,"artifactType":"` + testArtifactType + `"},
			{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + subject.String() + `","size":99999999,"artifactType":"` + testArtifactType + `"},
			{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + subject.String() + `","size":10,"artifactType":"other"},
			{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + subject.String() + `","size":10,"artifactType":"` + testArtifactType + `"}]}`))
	}
	got, err := client.Referrers(ctx, ref, subject, testArtifactType)
	if err != nil || len(got) != 1 || got[0].Size != 10 {
		t.Fatalf("bad entries not filtered: %+v %v", got, err)
	}

	answer = func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
		_, _ = w.Write(bytes.Repeat([]byte(" "), 5<<20))
	}
	if _, err := client.Referrers(ctx, ref, subject, testArtifactType); err == nil {
		t.Fatal("a referrers answer over the size bound was read")
	}

	// An HTML answer is no referrers API; the tag is not there either.
	answer = func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", "text/html")
		_, _ = w.Write([]byte("<html>hello</html>"))
	}
	if got, err := client.Referrers(ctx, ref, subject, testArtifactType); err != nil || len(got) != 0 {
		t.Fatalf("HTML answer: %v, %v", got, err)
	}
}
