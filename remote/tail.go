// Opening a blob with one suffix-range GET (Range: bytes=-n): the answer
// carries the blob's last bytes (an eStargz footer and, usually, its TOC)
// and, in its Content-Range, the blob's size, so that a layer is opened in
// one round trip instead of a HEAD and then a read of its tail.

package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// errNoSuffixRange marks an answer to a suffix-range request that does not
// give the blob's tail and size in a form this client takes (no total in
// Content-Range, multipart, 416): OpenBlobTail falls back to a HEAD.
var errNoSuffixRange = errors.New("server does not answer suffix range requests usably")

// OpenBlobTail is OpenBlob with its HEAD replaced by one GET of the blob's
// last n bytes (fewer when the blob is smaller): it returns the blob and
// those bytes. The blob's size comes from the answer's Content-Range and
// must match desc.Size when that is set. When a server's answer lacks what
// is needed, it falls back to OpenBlob and a range read.
func (r *Registry) OpenBlobTail(ctx context.Context, ref string, desc ocispec.Descriptor, n int64) (*Blob, []byte, error) {
	if n <= 0 {
		return nil, nil, &Error{Op: "open blob", Err: fmt.Errorf("tail size %d", n), class: errdefs.ErrInvalidArgument}
	}
	spec, err := parseRef(ref)
	if err != nil {
		return nil, nil, err
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, nil, &Error{Op: "open blob", Repo: spec.name(), Err: fmt.Errorf("descriptor digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	eps, err := r.endpoints(spec, docker.HostCapabilityPull)
	if err != nil {
		return nil, nil, err
	}
	b := &Blob{r: r, spec: spec, desc: desc, eps: eps, flights: flightGroup{m: map[Range]*flight{}}}
	var tail []byte
	err = r.onEndpoints(ctx, eps, func(ep *endpoint, last bool) error {
		return r.retry(ctx, last, func(attempt int) error {
			var err error
			tail, err = b.suffix(ctx, ep, n, attempt)
			return err
		})
	})
	if errors.Is(err, errNoSuffixRange) && ctx.Err() == nil {
		log.G(ctx).WithError(err).WithField("digest", desc.Digest).Debug("remote: suffix range unusable, opening the blob with a HEAD")
		if b, err = r.OpenBlob(ctx, ref, desc); err != nil {
			return nil, nil, err
		}
		m := min(n, b.Size())
		tail = make([]byte, m)
		if _, err := b.ReadAt(ctx, tail, b.Size()-m); err != nil && !errors.Is(err, io.EOF) {
			return nil, nil, err
		}
		return b, tail, nil
	}
	if err != nil {
		return nil, nil, err
	}
	return b, tail, nil
}

// suffix is one attempt at GET /v2/<repo>/blobs/<digest> with
// "Range: bytes=-n". It sets b.size (and b.cur) from the answer.
func (b *Blob) suffix(ctx context.Context, ep *endpoint, n int64, attempt int) (data []byte, err error) {
	actx, wd := b.r.attempt(ctx)
	defer wd.done()
	t0 := time.Now()
	ev := FetchEvent{Op: "range", Host: ep.host.Host, Repo: b.spec.name(), Digest: b.desc.Digest, Offset: -1, Length: n, Attempt: attempt}
	var received byteCount
	defer func() {
		if err != nil && !errors.Is(err, errNoSuffixRange) {
			err = transportError(ctx, actx, err, b.r.opts.RequestTimeout).with("open blob", ev.Host, b.spec.name(), b.desc.Digest.String(), fmt.Sprintf("bytes=-%d", n))
		}
		ev.Bytes, ev.Err, ev.Duration = int64(received), err, time.Since(t0)
		b.r.emit(ev)
	}()
	q := &request{method: http.MethodGet, header: http.Header{"Range": {fmt.Sprintf("bytes=-%d", n)}},
		url: ep.url(b.spec.repo, "blobs", b.desc.Digest.String()), repo: b.spec.repo}
	wd.arm()
	resp, err := b.r.send(actx, ep, q)
	wd.disarm()
	if err != nil {
		return nil, err
	}
	defer drainClose(resp.Body)
	ev.Status, ev.Host, ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	body := io.TeeReader(wd.reader(resp.Body), &received)

	// setSize records the blob's size as the server gives it, checked
	// against the descriptor's.
	setSize := func(size int64) error {
		switch {
		case b.desc.Size > 0 && size >= 0 && size != b.desc.Size:
			return &Error{Err: fmt.Errorf("registry has %d bytes, descriptor says %d", size, b.desc.Size), class: errdefs.ErrFailedPrecondition}
		case b.desc.Size > 0:
			size = b.desc.Size
		case size < 0:
			return fmt.Errorf("%w: the answer does not give the blob's size", errNoSuffixRange)
		}
		b.mu.Lock()
		b.size = size
		b.cur = slices.Index(b.eps, ep)
		b.mu.Unlock()
		return nil
	}

	switch resp.StatusCode {
	case http.StatusPartialContent:
		if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt == "multipart/byteranges" {
			return nil, fmt.Errorf("%w: multipart answer", errNoSuffixRange)
		}
		start, end, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return nil, err
		}
		if total < 0 {
			return nil, fmt.Errorf("%w: Content-Range %q has no total", errNoSuffixRange, resp.Header.Get("Content-Range"))
		}
		length := end - start + 1
		if end != total-1 || length > n || (length < n && start != 0) {
			return nil, &Error{Err: fmt.Errorf("server answered bytes=-%d with Content-Range %q", n, resp.Header.Get("Content-Range")), retry: true}
		}
		if resp.ContentLength >= 0 && resp.ContentLength != length {
			return nil, &Error{Err: fmt.Errorf("Content-Length %d does not match Content-Range %q", resp.ContentLength, resp.Header.Get("Content-Range")), retry: true}
		}
		if err := setSize(total); err != nil {
			return nil, err
		}
		ev.Offset, ev.Length = start, length
		return readFull(body, length)
	case http.StatusOK:
		// The server ignores Range: the body is the whole blob.
		if err := setSize(resp.ContentLength); err != nil {
			return nil, err
		}
		m := min(n, b.size)
		return b.readWhole(ctx, resp.Response, body, Range{b.size - m, m})
	case http.StatusRequestedRangeNotSatisfiable:
		return nil, fmt.Errorf("%w: status %d", errNoSuffixRange, resp.StatusCode)
	default:
		return nil, statusError(resp.Response, nil)
	}
}

// OpenRangeReaderTail is OpenBlobTail for callers that only read ranges:
// with it, *Registry satisfies fs.TailOpener.
func (r *Registry) OpenRangeReaderTail(ctx context.Context, ref string, desc ocispec.Descriptor, n int64) (RangeReader, []byte, error) {
	b, tail, err := r.OpenBlobTail(ctx, ref, desc, n)
	if err != nil {
		return nil, nil, err
	}
	return b, tail, nil
}
