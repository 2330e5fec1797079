// The Blob API: opening a registry blob (a HEAD that checks it is there
// and its size) and reading byte ranges of it on demand. How a range is
// fetched and its answer parsed is in ranges.go; how concurrent and
// neighbouring reads share requests is in sharing.go.

package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"
)

// parallelRanges is how many coalesced requests one ReadRanges call runs
// at a time.
const parallelRanges = 8

// Range is a byte range of a blob.
type Range struct {
	Offset int64
	Length int64
}

// String formats r as an HTTP range ("bytes=first-last").
func (r Range) String() string {
	return fmt.Sprintf("bytes=%d-%d", r.Offset, r.Offset+r.Length-1)
}

// Blob reads byte ranges of one registry blob on demand. It is safe for
// concurrent use; keep one per layer.
//
// Reads are not verified (only the whole blob has a digest): callers check
// what they read against finer-grained digests, such as a TOC's chunk
// digests.
type Blob struct {
	r    *Registry
	spec refSpec
	desc ocispec.Descriptor
	size int64
	eps  []*endpoint

	mu         sync.Mutex
	cur        int       // index in eps of the endpoint in use
	redirect   *url.URL  // remembered redirect target (object storage)
	redirectEp *endpoint // endpoint that redirected there
	whole      []byte    // whole blob, when the server ignores Range and it is small
	noRange    *Error    // set when the server ignores Range and the blob is large

	flights flightGroup
}

// OpenBlob prepares lazy range reads of the blob desc describes, in the
// repository ref names (ref's tag or digest is ignored). It checks, with a
// HEAD request, that a host has the blob and that its size matches the
// descriptor (desc.Size 0 means "take the registry's size"). The registry
// is otherwise contacted only when data is read.
func (r *Registry) OpenBlob(ctx context.Context, ref string, desc ocispec.Descriptor) (*Blob, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, &Error{Op: "open blob", Repo: spec.name(), Err: fmt.Errorf("descriptor digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	eps, err := r.endpoints(spec, docker.HostCapabilityPull)
	if err != nil {
		return nil, err
	}
	b := &Blob{r: r, spec: spec, desc: desc, eps: eps, flights: flightGroup{m: map[Range]*flight{}}}
	err = r.onEndpoints(ctx, eps, func(ep *endpoint, last bool) error {
		return r.retry(ctx, last, func(attempt int) error { return b.head(ctx, ep, attempt) })
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// head is one attempt at HEAD /v2/<repo>/blobs/<digest>. A redirect of a
// HEAD is followed but not remembered: signed URLs are often valid for one
// method only.
func (b *Blob) head(ctx context.Context, ep *endpoint, attempt int) (err error) {
	actx, wd := b.r.attempt(ctx)
	defer wd.done()
	t0 := time.Now()
	ev := FetchEvent{Op: "head", Host: ep.host.Host, Repo: b.spec.name(), Digest: b.desc.Digest, Length: -1, Attempt: attempt}
	defer func() {
		if err != nil {
			err = transportError(ctx, actx, err, b.r.opts.RequestTimeout).with("open blob", ep.host.Host, b.spec.name(), b.desc.Digest.String(), "")
		}
		ev.Err, ev.Duration = err, time.Since(t0)
		b.r.emit(ev)
	}()
	q := &request{method: http.MethodHead, url: ep.url(b.spec.repo, "blobs", b.desc.Digest.String()), repo: b.spec.repo}
	wd.arm()
	resp, err := b.r.send(actx, ep, q)
	wd.disarm()
	if err != nil {
		return err
	}
	resp.Body.Close()
	ev.Status, ev.Host, ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	if resp.StatusCode != http.StatusOK {
		return statusError(resp.Response, []byte{})
	}
	size := resp.ContentLength
	switch {
	case b.desc.Size > 0 && size >= 0 && size != b.desc.Size:
		return &Error{Err: fmt.Errorf("registry has %d bytes, descriptor says %d", size, b.desc.Size), class: errdefs.ErrFailedPrecondition}
	case b.desc.Size > 0:
		size = b.desc.Size
	case size < 0:
		return &Error{Err: errors.New("registry did not say the blob's size and the descriptor has none"), class: errdefs.ErrFailedPrecondition}
	}
	b.mu.Lock()
	b.size = size
	b.cur = slices.Index(b.eps, ep)
	b.mu.Unlock()
	return nil
}

// Size is the blob's size in bytes.
func (b *Blob) Size() int64 { return b.size }

// Descriptor is the descriptor the blob was opened with (its Size filled
// in from the registry when it was 0).
func (b *Blob) Descriptor() ocispec.Descriptor {
	d := b.desc
	d.Size = b.size
	return d
}

// ReadAt reads len(p) bytes at off, like io.ReaderAt: fewer bytes only at
// the end of the blob, with io.EOF. Concurrent reads of the same range
// share one request.
func (b *Blob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, &Error{Op: "read", Repo: b.spec.name(), Ref: b.desc.Digest.String(), Err: fmt.Errorf("negative offset %d", off), class: errdefs.ErrInvalidArgument}
	}
	if off >= b.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), b.size-off)
	if n == 0 {
		return 0, nil
	}
	data, err := b.flights.do(ctx, Range{off, n}, b.fetch)
	if err != nil {
		return 0, b.annotate(err)
	}
	copy(p, data)
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// ReadRange returns the n bytes at off, which must lie within the blob,
// without copying them: the slice is shared with concurrent readers of
// the same range (and, for a server that ignores Range, with the blob's
// in-memory copy), so it must not be modified. It saves ReadAt's copy and
// buffer for callers that only decode what they read.
func (b *Blob) ReadRange(ctx context.Context, off, n int64) ([]byte, error) {
	if off < 0 || n < 0 || off > b.size || n > b.size-off {
		return nil, &Error{Op: "read", Repo: b.spec.name(), Ref: b.desc.Digest.String(),
			Err: fmt.Errorf("range %d+%d outside the blob's %d bytes", off, n, b.size), class: errdefs.ErrOutOfRange}
	}
	if n == 0 {
		return []byte{}, nil
	}
	data, err := b.flights.do(ctx, Range{off, n}, b.fetch)
	if err != nil {
		return nil, b.annotate(err)
	}
	return data, nil
}

// ReaderAt adapts the blob to io.ReaderAt, with ctx for every read (for
// libraries such as estargz that take an io.ReaderAt or *io.SectionReader).
func (b *Blob) ReaderAt(ctx context.Context) io.ReaderAt {
	return readerAt{b, ctx}
}

type readerAt struct {
	b   *Blob
	ctx context.Context
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) { return r.b.ReadAt(r.ctx, p, off) }

// ReadRanges reads several ranges at once, returning their bytes in the
// order given. Ranges must lie within the blob. Ranges that overlap or lie
// at most Options.RangeGap apart are fetched with one request; the
// resulting requests run in parallel. Identical concurrent requests share
// one fetch.
func (b *Blob) ReadRanges(ctx context.Context, ranges []Range) ([][]byte, error) {
	out := make([][]byte, len(ranges))
	var idx []int
	for i, rg := range ranges {
		if rg.Offset < 0 || rg.Length < 0 || rg.Offset > b.size || rg.Length > b.size-rg.Offset {
			return nil, &Error{Op: "read", Repo: b.spec.name(), Ref: b.desc.Digest.String(),
				Err: fmt.Errorf("range %d+%d outside the blob's %d bytes", rg.Offset, rg.Length, b.size), class: errdefs.ErrOutOfRange}
		}
		if rg.Length == 0 {
			out[i] = []byte{}
			continue
		}
		idx = append(idx, i)
	}
	groups := coalesce(ranges, idx, b.r.opts.RangeGap)

	eg, ectx := errgroup.WithContext(ctx)
	eg.SetLimit(parallelRanges)
	for _, g := range groups {
		eg.Go(func() error {
			data, err := b.flights.do(ectx, g.Range, b.fetch)
			if err != nil {
				return err
			}
			for _, i := range g.members {
				rg := ranges[i]
				out[i] = bytes.Clone(data[rg.Offset-g.Offset : rg.Offset-g.Offset+rg.Length])
			}
			return nil
		})
	}
	if err := eg.Wait(); err != nil {
		return nil, b.annotate(err)
	}
	return out, nil
}

// annotate names the blob in an error.
func (b *Blob) annotate(err error) error {
	return asError(err).with("read", "", b.spec.name(), b.desc.Digest.String(), "")
}

// RangeReader is the part of a Blob that reads ranges, as an alias of an
// interface type literal: packages that must not import this one (fs)
// declare the identical type, so that *Registry satisfies their interfaces
// through OpenRangeReader.
type RangeReader = interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	Size() int64
}

// OpenRangeReader is OpenBlob for callers that only read ranges: with it,
// *Registry satisfies fs.BlobOpener.
func (r *Registry) OpenRangeReader(ctx context.Context, ref string, desc ocispec.Descriptor) (RangeReader, error) {
	b, err := r.OpenBlob(ctx, ref, desc)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return b, nil
}
