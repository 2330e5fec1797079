package remote_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// newClient returns a Registry with fast retries, no hosts.toml and no
// docker config, unless opts say otherwise.
func newClient(t *testing.T, opts remote.Options) *remote.Registry {
	t.Helper()
	if opts.HostsDir == "" {
		opts.HostsDir = t.TempDir()
	}
	if opts.DockerConfig == "" && opts.Credentials == nil {
		opts.DockerConfig = filepath.Join(t.TempDir(), "no-config.json")
	}
	if opts.RetryBackoff == 0 {
		opts.RetryBackoff = 5 * time.Millisecond
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 5 * time.Second
	}
	r, err := remote.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// randomBytes returns n pseudo-random bytes (seeded, so failures repeat).
func randomBytes(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	return b[:n]
}

// events collects FetchEvents.
type events struct {
	mu  sync.Mutex
	all []remote.FetchEvent
}

func (e *events) add(ev remote.FetchEvent) {
	e.mu.Lock()
	e.all = append(e.all, ev)
	e.mu.Unlock()
}

func (e *events) list() []remote.FetchEvent {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]remote.FetchEvent(nil), e.all...)
}

func mustContain(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("expected an error containing %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not mention %q", err, p)
		}
	}
}

func TestResolveTagDigestAndFetch(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	layer := randomBytes(300_000, 1)
	img := reg.PushImage(t, "team/app", "v1", remotetest.Layer{Data: layer, Annotations: map[string]string{"a": "b"}})
	r := newClient(t, remote.Options{})
	ctx := context.Background()

	for _, ref := range []string{img.Ref, reg.Ref("team/app", img.ManifestDesc.Digest.String()), reg.Host() + "/team/app:v1@" + img.ManifestDesc.Digest.String()} {
		got, err := r.Resolve(ctx, ref, nil)
		if err != nil {
			t.Fatalf("resolve %s: %v", ref, err)
		}
		if got.ManifestDesc.Digest != img.ManifestDesc.Digest || got.ManifestDesc.MediaType != ocispec.MediaTypeImageManifest ||
			got.ManifestDesc.Size != int64(len(img.ManifestRaw)) || !bytes.Equal(got.ManifestRaw, img.ManifestRaw) {
			t.Fatalf("resolve %s: manifest desc %+v", ref, got.ManifestDesc)
		}
		if got.Index != nil || got.Name != reg.Host()+"/team/app" {
			t.Fatalf("resolve %s: index %v name %q", ref, got.Index, got.Name)
		}
		if got.ConfigDesc.Digest != img.ConfigDesc.Digest || got.Config.RootFS.DiffIDs[0] != img.Layers[0].Digest || got.Config.Architecture != runtime.GOARCH {
			t.Fatalf("resolve %s: config %+v", ref, got.Config)
		}
		if got.Manifest.Layers[0].Annotations["a"] != "b" {
			t.Fatalf("annotations lost: %+v", got.Manifest.Layers[0])
		}
	}

	desc, raw, err := r.FetchIndexOrManifest(ctx, img.Ref)
	if err != nil || desc.Digest != img.ManifestDesc.Digest || !bytes.Equal(raw, img.ManifestRaw) {
		t.Fatalf("FetchIndexOrManifest: %v %+v", err, desc)
	}

	// Fetch streams blobs and manifests, verified.
	rc, err := r.Fetch(ctx, img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(b, layer) {
		t.Fatalf("Fetch layer: %v, %d bytes", err, len(b))
	}
	rc, err = r.Fetch(ctx, img.Ref, img.ManifestDesc)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(rc)
	if !bytes.Equal(b, img.ManifestRaw) {
		t.Fatal("Fetch manifest: wrong bytes")
	}
}

func TestResolveIndexPlatforms(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	amd := reg.PushPlatformImage(t, "multi", "", ocispec.Platform{OS: "linux", Architecture: "amd64"}, remotetest.Layer{Data: []byte("amd64 layer")})
	arm := reg.PushPlatformImage(t, "multi", "", ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, remotetest.Layer{Data: []byte("arm64 layer")})
	idx := reg.PushIndex(t, "multi", "latest", amd.ManifestDesc, arm.ManifestDesc)
	r := newClient(t, remote.Options{})
	ctx := context.Background()

	got, err := r.Resolve(ctx, reg.Ref("multi", "latest"), &ocispec.Platform{OS: "linux", Architecture: "arm64"})
	if err != nil {
		t.Fatal(err)
	}
	if got.Index == nil || got.IndexDesc.Digest != idx.Digest || len(got.Index.Manifests) != 2 || len(got.IndexRaw) == 0 {
		t.Fatalf("index not reported: %+v", got.IndexDesc)
	}
	if got.ManifestDesc.Digest != arm.ManifestDesc.Digest || got.ManifestDesc.Platform == nil || got.Config.Architecture != "arm64" {
		t.Fatalf("wrong manifest for arm64: %+v", got.ManifestDesc)
	}

	// nil platform: the host's.
	got, err = r.Resolve(ctx, reg.Ref("multi", "latest"), nil)
	if runtime.GOARCH == "amd64" || runtime.GOARCH == "arm64" {
		if err != nil || got.Config.Architecture != runtime.GOARCH {
			t.Fatalf("host platform: %v %+v", err, got)
		}
	}

	_, err = r.Resolve(ctx, reg.Ref("multi", "latest"), &ocispec.Platform{OS: "linux", Architecture: "s390x"})
	if !errdefs.IsNotFound(err) {
		t.Fatalf("want not found, got %v", err)
	}
	mustContain(t, err, "linux/amd64", "linux/arm64/v8", idx.Digest.String())

	// The raw index, for converters.
	desc, raw, err := r.FetchIndexOrManifest(ctx, reg.Ref("multi", "latest"))
	if err != nil || desc.MediaType != ocispec.MediaTypeImageIndex || desc.Digest != idx.Digest {
		t.Fatalf("FetchIndexOrManifest: %v %+v", err, desc)
	}
	var parsed ocispec.Index
	if err := json.Unmarshal(raw, &parsed); err != nil || len(parsed.Manifests) != 2 {
		t.Fatalf("raw index: %v", err)
	}
}

func TestResolveDockerSchema2(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	layer := reg.PushBlob(t, "docker", []byte("layer"))
	layer.MediaType = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	cfgJSON, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "riscv64"},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer.Digest}}})
	cfg := reg.PushBlob(t, "docker", cfgJSON)
	cfg.MediaType = "application/vnd.docker.container.image.v1+json"
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: "application/vnd.docker.distribution.manifest.v2+json",
		Config: cfg, Layers: []ocispec.Descriptor{layer}}
	md := reg.PushManifest(t, "docker", "", m)
	md.Platform = &ocispec.Platform{OS: "linux", Architecture: "riscv64"}
	list := map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
		"manifests": []ocispec.Descriptor{md}}
	reg.PushManifest(t, "docker", "v2", list)

	r := newClient(t, remote.Options{})
	got, err := r.Resolve(context.Background(), reg.Ref("docker", "v2"), &ocispec.Platform{OS: "linux", Architecture: "riscv64"})
	if err != nil {
		t.Fatal(err)
	}
	if got.IndexDesc.MediaType != "application/vnd.docker.distribution.manifest.list.v2+json" ||
		got.ManifestDesc.MediaType != "application/vnd.docker.distribution.manifest.v2+json" ||
		got.Manifest.Layers[0].Digest != layer.Digest || got.Config.Architecture != "riscv64" {
		t.Fatalf("docker schema2: %+v / %+v", got.IndexDesc, got.ManifestDesc)
	}
}

func TestNotFoundErrorsNameWhatFailed(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("x")})
	r := newClient(t, remote.Options{})
	ctx := context.Background()

	_, err := r.Resolve(ctx, reg.Ref("app", "nope"), nil)
	if !errdefs.IsNotFound(err) {
		t.Fatalf("want not found: %v", err)
	}
	mustContain(t, err, reg.Host()+"/app:nope", "HTTP 404", "MANIFEST_UNKNOWN")
	var re *remote.Error
	if !errors.As(err, &re) || re.Status != 404 || re.Code != "MANIFEST_UNKNOWN" || re.Host != reg.Host() {
		t.Fatalf("error fields: %#v", re)
	}

	missing := ocispec.Descriptor{Digest: digest.FromString("missing"), Size: 7}
	_, err = r.OpenBlob(ctx, img.Ref, missing)
	if !errdefs.IsNotFound(err) {
		t.Fatalf("want not found: %v", err)
	}
	mustContain(t, err, reg.Host()+"/app@"+missing.Digest.String(), "HTTP 404")

	rc, err := r.Fetch(ctx, img.Ref, missing)
	if !errdefs.IsNotFound(err) || rc != nil {
		t.Fatalf("want not found: %v", err)
	}
	mustContain(t, err, missing.Digest.String(), "BLOB_UNKNOWN")

	_, err = r.Resolve(ctx, "UPPER/Case::bad", nil)
	if !errdefs.IsInvalidArgument(err) {
		t.Fatalf("want invalid argument: %v", err)
	}

	// Size disagreement between descriptor and registry.
	wrong := img.Layers[0]
	wrong.Size++
	_, err = r.OpenBlob(ctx, img.Ref, wrong)
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("want failed precondition: %v", err)
	}
}

func TestFetchDetectsDigestMismatch(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: randomBytes(50_000, 2)})
	r := newClient(t, remote.Options{})
	// Bytes altered on the way: refused at EOF.
	other := reg.PushBlob(t, "app", randomBytes(50_000, 3))
	reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, Corrupt: true})
	rc, err := r.Fetch(context.Background(), img.Ref, other)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	if !errdefs.IsDataLoss(err) {
		t.Fatalf("want data loss, got %v", err)
	}
	mustContain(t, err, other.Digest.String(), "expected")
}

func TestReadAtAndReadRanges(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	data := randomBytes(1<<20, 4)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: data})
	var ev events
	r := newClient(t, remote.Options{OnFetch: ev.add})
	ctx := context.Background()
	b, err := r.OpenBlob(ctx, img.Ref, ocispec.Descriptor{Digest: img.Layers[0].Digest}) // size from the registry
	if err != nil {
		t.Fatal(err)
	}
	if b.Size() != int64(len(data)) || b.Descriptor().Size != int64(len(data)) {
		t.Fatalf("size %d", b.Size())
	}

	p := make([]byte, 1000)
	if n, err := b.ReadAt(ctx, p, 5000); n != 1000 || err != nil || !bytes.Equal(p, data[5000:6000]) {
		t.Fatalf("ReadAt: %d %v", n, err)
	}
	// At the end: short read with io.EOF, like io.ReaderAt.
	if n, err := b.ReadAt(ctx, p, int64(len(data))-10); n != 10 || err != io.EOF || !bytes.Equal(p[:10], data[len(data)-10:]) {
		t.Fatalf("ReadAt at end: %d %v", n, err)
	}
	if n, err := b.ReadAt(ctx, p, int64(len(data))); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt past end: %d %v", n, err)
	}
	if _, err := b.ReadAt(ctx, p, -1); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("negative offset: %v", err)
	}
	// io.ReaderAt adapter.
	sr := io.NewSectionReader(b.ReaderAt(ctx), 100, 50)
	if got, _ := io.ReadAll(sr); !bytes.Equal(got, data[100:150]) {
		t.Fatal("ReaderAt adapter")
	}

	// ReadRanges: three near ranges and one far: two requests.
	reg.ResetRequests()
	ranges := []remote.Range{{Offset: 900_000, Length: 10}, {Offset: 100, Length: 100}, {Offset: 250, Length: 50}, {Offset: 150, Length: 200}, {Offset: 7, Length: 0}}
	out, err := b.ReadRanges(ctx, ranges)
	if err != nil {
		t.Fatal(err)
	}
	for i, rg := range ranges {
		if !bytes.Equal(out[i], data[rg.Offset:rg.Offset+rg.Length]) {
			t.Fatalf("range %d wrong", i)
		}
	}
	if n := reg.Count(remotetest.RangeGETs); n != 2 {
		t.Fatalf("coalescing: %d requests, want 2: %+v", n, reg.Requests())
	}
	// Results do not alias each other.
	out[1][0] ^= 0xff
	if out[3][0] != data[150] {
		t.Fatal("results alias")
	}

	if _, err := b.ReadRanges(ctx, []remote.Range{{Offset: int64(len(data)) - 5, Length: 6}}); !errdefs.IsOutOfRange(err) {
		t.Fatalf("out of range: %v", err)
	}

	// Metrics: every range request reported with its bytes.
	var rangeBytes int64
	for _, e := range ev.list() {
		if e.Op == "range" {
			if e.Status != 206 || e.Err != nil || e.Host != reg.Host() || e.Digest != img.Layers[0].Digest || e.Duration <= 0 {
				t.Fatalf("event %+v", e)
			}
			rangeBytes += e.Bytes
		}
	}
	if want := int64(1000 + 10 + 50 + 10 + 250); rangeBytes != want {
		t.Fatalf("range bytes %d, want %d", rangeBytes, want)
	}
}

func TestReadRangesGapSetting(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	data := randomBytes(100_000, 5)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: data})
	ctx := context.Background()
	ranges := []remote.Range{{Offset: 0, Length: 10}, {Offset: 20, Length: 10}, {Offset: 30, Length: 10}}
	for _, tc := range []struct {
		gap  int64
		want int
	}{{-1, 2}, {5, 2}, {10, 1}, {0 /* default */, 1}} {
		r := newClient(t, remote.Options{RangeGap: tc.gap})
		b, err := r.OpenBlob(ctx, img.Ref, img.Layers[0])
		if err != nil {
			t.Fatal(err)
		}
		reg.ResetRequests()
		if _, err := b.ReadRanges(ctx, ranges); err != nil {
			t.Fatal(err)
		}
		if n := reg.Count(remotetest.RangeGETs); n != tc.want {
			t.Errorf("gap %d: %d requests, want %d", tc.gap, n, tc.want)
		}
	}
}

func TestPush(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	r := newClient(t, remote.Options{})
	ctx := context.Background()
	ref := reg.Ref("pushed/app", "v1")

	layer := randomBytes(200_000, 6)
	ld := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(layer), Size: int64(len(layer))}
	if ok, err := r.BlobExists(ctx, ref, ld); ok || err != nil {
		t.Fatalf("BlobExists before push: %v %v", ok, err)
	}
	if err := r.PushBlob(ctx, ref, ld, bytes.NewReader(layer)); err != nil {
		t.Fatal(err)
	}
	if ok, err := r.BlobExists(ctx, ref, ld); !ok || err != nil {
		t.Fatalf("BlobExists after push: %v %v", ok, err)
	}
	// Second push: HEAD only, nothing read.
	reg.ResetRequests()
	if err := r.PushBlob(ctx, ref, ld, iotestErrReader{}); err != nil {
		t.Fatal(err)
	}
	if n := reg.Count(func(q remotetest.Request) bool { return q.Method != "HEAD" }); n != 0 {
		t.Fatalf("existing blob uploaded again: %+v", reg.Requests())
	}

	cfgJSON, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{ld.Digest}}})
	cd := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfgJSON), Size: int64(len(cfgJSON))}
	if err := r.PushBlob(ctx, ref, cd, bytes.NewReader(cfgJSON)); err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: cd, Layers: []ocispec.Descriptor{ld}})
	md := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(raw), Size: int64(len(raw))}
	if err := r.PushManifest(ctx, ref, md, raw); err != nil {
		t.Fatal(err)
	}
	if err := r.PushManifest(ctx, reg.Ref("pushed/app", md.Digest.String()), md, raw); err != nil {
		t.Fatalf("push by digest: %v", err)
	}
	got, err := r.Resolve(ctx, ref, nil)
	if err != nil || got.ManifestDesc.Digest != md.Digest {
		t.Fatalf("resolve pushed: %v", err)
	}

	// Bytes that do not match the descriptor are refused.
	bad := ocispec.Descriptor{Digest: digest.FromString("something else"), Size: int64(len(layer))}
	err = r.PushBlob(ctx, ref, bad, bytes.NewReader(layer))
	if !errdefs.IsDataLoss(err) {
		t.Fatalf("want data loss: %v", err)
	}
	mustContain(t, err, bad.Digest.String(), "push blob")
	if ok, _ := r.BlobExists(ctx, ref, bad); ok {
		t.Fatal("bad blob committed")
	}
	short := ocispec.Descriptor{Digest: digest.FromBytes(layer), Size: int64(len(layer)) + 10}
	if err := r.PushBlob(ctx, reg.Ref("other", "x"), short, bytes.NewReader(layer)); !errdefs.IsDataLoss(err) {
		t.Fatalf("short content: want data loss: %v", err)
	}
	if err := r.PushManifest(ctx, ref, md, append(raw, ' ')); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("manifest bytes not matching: %v", err)
	}
	// A manifest referring to a missing blob: the registry's words.
	raw2, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: cd,
		Layers: []ocispec.Descriptor{bad}})
	err = r.PushManifest(ctx, ref, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(raw2), Size: int64(len(raw2))}, raw2)
	mustContain(t, err, "HTTP 400", "MANIFEST_BLOB_UNKNOWN")
}

func TestPushRetriesOnlySeekableContent(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	r := newClient(t, remote.Options{})
	ctx := context.Background()
	data := randomBytes(10_000, 7)
	d := ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data))}
	isPut := func(q remotetest.Request) bool { return q.Method == "PUT" }

	reg.Inject(remotetest.Fault{Match: isPut, Times: 1, Status: 503})
	if err := r.PushBlob(ctx, reg.Ref("a", "x"), d, bytes.NewReader(data)); err != nil {
		t.Fatalf("seekable content not retried: %v", err)
	}
	reg.Inject(remotetest.Fault{Match: isPut, Times: 1, Status: 503})
	err := r.PushBlob(ctx, reg.Ref("b", "x"), d, io.MultiReader(bytes.NewReader(data)))
	mustContain(t, err, "HTTP 503", "cannot be rewound")
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("must not be read") }
