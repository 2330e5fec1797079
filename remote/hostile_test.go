package remote_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote"
)

// FuzzHostileServer points the client at a server that answers whatever
// the fuzzer says; nothing may panic or hang. Its seeds run with go test.
func FuzzHostileServer(f *testing.F) {
	f.Add([]byte(`{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"sha256:`+strings.Repeat("a", 64)+`","platform":{"os":"linux","architecture":"amd64"}}]}`),
		"multipart/byteranges; boundary=XX", "bytes 0-9/100",
		[]byte("--XX\r\nContent-Range: bytes 0-4/100\r\n\r\n01234\r\n--XX\r\nContent-Range: bytes 5-9/100\r\n\r\n56789\r\n--XX--\r\n"))
	f.Add([]byte(`{"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:`+strings.Repeat("b", 64)+`","size":-5},"layers":null}`),
		"application/octet-stream", "bytes 0-9/100", []byte("0123456789"))
	f.Add([]byte(`{"schemaVersion":1,"fsLayers":[]}`), "multipart/byteranges", "bytes 9-0/1", []byte("--\r\n"))
	f.Add([]byte(`{"manifests":null}`), "multipart/byteranges; boundary=B", "", []byte("--B\r\nContent-Range: bytes 0-99999999999/100\r\n\r\nxx\r\n--B--"))
	f.Add([]byte(`null`), "text/plain", "bytes 0-9/*", []byte{})
	f.Fuzz(func(t *testing.T, manifest []byte, contentType, contentRange string, rangeBody []byte) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			switch {
			case strings.Contains(req.URL.Path, "/manifests/"):
				w.Write(manifest)
			case req.Method == http.MethodHead:
				w.Header().Set("Content-Length", "100")
			case req.Header.Get("Range") != "":
				w.Header().Set("Content-Type", contentType)
				w.Header().Set("Content-Range", contentRange)
				w.WriteHeader(http.StatusPartialContent)
				w.Write(rangeBody)
			default:
				w.Write(rangeBody)
			}
		}))
		defer srv.Close()
		r, err := remote.New(remote.Options{HostsDir: t.TempDir(), DockerConfig: "/nonexistent", Retries: -1, RequestTimeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ref := strings.TrimPrefix(srv.URL, "http://") + "/x:y"
		_, _ = r.Resolve(ctx, ref, nil)
		_, _, _ = r.FetchIndexOrManifest(ctx, ref)
		b, err := r.OpenBlob(ctx, ref, ocispec.Descriptor{Digest: digest.FromString("x")})
		if err != nil {
			t.Fatalf("HEAD is fine, OpenBlob should be: %v", err)
		}
		p := make([]byte, 10)
		_, _ = b.ReadAt(ctx, p, 0)
		_, _ = b.ReadRanges(ctx, []remote.Range{{Offset: 0, Length: 3}, {Offset: 90, Length: 10}})
		if rc, err := r.Fetch(ctx, ref, ocispec.Descriptor{Digest: digest.FromString("x"), Size: 100}); err == nil {
			buf := make([]byte, 200)
			for {
				if _, err := rc.Read(buf); err != nil {
					break
				}
			}
			rc.Close()
		}
	})
}
