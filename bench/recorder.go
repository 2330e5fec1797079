package bench

import (
	"context"
	"io"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// recorder times containerd's own registry requests (resolve, manifests,
// config, whole layers) by wrapping its resolver: the client fetches them
// in this process.
type recorder struct {
	start time.Time
	mu    sync.Mutex
	reqs  []Request
}

func (rec *recorder) add(q Request) {
	rec.mu.Lock()
	rec.reqs = append(rec.reqs, q)
	rec.mu.Unlock()
}

func (rec *recorder) requests() []Request {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]Request(nil), rec.reqs...)
}

func (rec *recorder) since(t time.Time) float64 { return t.Sub(rec.start).Seconds() }

func (rec *recorder) wrap(r remotes.Resolver) remotes.Resolver {
	return &recResolver{Resolver: r, rec: rec}
}

type recResolver struct {
	remotes.Resolver
	rec *recorder
}

func (r *recResolver) Resolve(ctx context.Context, ref string) (string, ocispec.Descriptor, error) {
	t0 := time.Now()
	name, desc, err := r.Resolver.Resolve(ctx, ref)
	q := Request{Start: r.rec.since(t0), End: r.rec.since(time.Now()), Kind: KindResolve, By: "containerd", Layer: desc.Digest.String()}
	if err != nil {
		q.Err = err.Error()
	}
	r.rec.add(q)
	return name, desc, err
}

func (r *recResolver) Fetcher(ctx context.Context, ref string) (remotes.Fetcher, error) {
	f, err := r.Resolver.Fetcher(ctx, ref)
	if err != nil {
		return nil, err
	}
	return &recFetcher{Fetcher: f, rec: r.rec}, nil
}

type recFetcher struct {
	remotes.Fetcher
	rec *recorder
}

func (f *recFetcher) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	t0 := time.Now()
	rc, err := f.Fetcher.Fetch(ctx, desc)
	kind := KindManifest
	if images.IsLayerType(desc.MediaType) {
		kind = KindLayer
	}
	q := Request{Start: f.rec.since(t0), Kind: kind, By: "containerd", Layer: desc.Digest.String(), Length: desc.Size}
	if err != nil {
		q.End, q.Err = f.rec.since(time.Now()), err.Error()
		f.rec.add(q)
		return nil, err
	}
	return &recBody{ReadCloser: rc, rec: f.rec, q: q}, nil
}

// recBody counts a body's bytes and records the request when it is read
// to the end or closed.
type recBody struct {
	io.ReadCloser
	rec  *recorder
	q    Request
	once sync.Once
}

func (b *recBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.q.Bytes += int64(n)
	if err == io.EOF {
		b.done()
	}
	return n, err
}

func (b *recBody) done() {
	b.once.Do(func() {
		b.q.End = b.rec.since(time.Now())
		b.rec.add(b.q)
	})
}

func (b *recBody) Close() error {
	b.done()
	return b.ReadCloser.Close()
}
