package remote

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
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
	slices.SortFunc(idx, func(a, c int) int { return cmp.Compare(ranges[a].Offset, ranges[c].Offset) })

	type group struct {
		Range
		members []int
	}
	var groups []*group
	for _, i := range idx {
		rg := ranges[i]
		if n := len(groups); n > 0 {
			g := groups[n-1]
			if end := g.Offset + g.Length; rg.Offset <= end+b.r.opts.RangeGap {
				g.Length = max(end, rg.Offset+rg.Length) - g.Offset
				g.members = append(g.members, i)
				continue
			}
		}
		groups = append(groups, &group{Range: rg, members: []int{i}})
	}

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

// fetch reads one range, failing over between endpoints.
func (b *Blob) fetch(ctx context.Context, rg Range) ([]byte, error) {
	b.mu.Lock()
	whole, noRange, cur := b.whole, b.noRange, b.cur
	b.mu.Unlock()
	if whole != nil {
		return whole[rg.Offset : rg.Offset+rg.Length], nil
	}
	if noRange != nil {
		e := *noRange
		e.Range = rg.String()
		return nil, &e
	}
	var data []byte
	err := b.r.onEndpoints(ctx, b.eps[cur:], func(ep *endpoint, last bool) error {
		err := b.r.retry(ctx, last, func(attempt int) error {
			var err error
			data, err = b.rangeAttempt(ctx, ep, rg, attempt)
			return err
		})
		if err == nil && ep != b.eps[cur] {
			b.mu.Lock()
			b.cur = slices.Index(b.eps, ep)
			b.mu.Unlock()
		}
		return err
	})
	return data, err
}

// rangeAttempt tries the remembered redirect target first, if any, then
// the registry.
func (b *Blob) rangeAttempt(ctx context.Context, ep *endpoint, rg Range, attempt int) ([]byte, error) {
	b.mu.Lock()
	u := b.redirect
	if b.redirectEp != ep {
		u = nil
	}
	b.mu.Unlock()
	if u != nil {
		data, err := b.rangeOnce(ctx, ep, u, rg, attempt)
		if err == nil || ctx.Err() != nil || errors.Is(err, ErrRangeUnsupported) {
			return data, err
		}
		log.G(ctx).WithError(err).WithField("digest", b.desc.Digest).Debug("remote: remembered blob URL failed, asking the registry again")
		b.mu.Lock()
		if b.redirect == u {
			b.redirect, b.redirectEp = nil, nil
		}
		b.mu.Unlock()
	}
	return b.rangeOnce(ctx, ep, nil, rg, attempt)
}

// rangeOnce is one GET with a Range header: to direct (a remembered
// redirect target, without credentials) or, when direct is nil, to the
// registry.
func (b *Blob) rangeOnce(ctx context.Context, ep *endpoint, direct *url.URL, rg Range, attempt int) (data []byte, err error) {
	actx, wd := b.r.attempt(ctx)
	defer wd.done()
	t0 := time.Now()
	ev := FetchEvent{Op: "range", Host: ep.host.Host, Repo: b.spec.name(), Digest: b.desc.Digest,
		Offset: rg.Offset, Length: rg.Length, Attempt: attempt, Redirected: direct != nil}
	cr := &countingReader{}
	defer func() {
		if err != nil {
			err = transportError(ctx, actx, err, b.r.opts.RequestTimeout).with("read", ev.Host, b.spec.name(), b.desc.Digest.String(), rg.String())
		}
		ev.Bytes, ev.Err, ev.Duration = cr.n, err, time.Since(t0)
		b.r.emit(ev)
	}()

	q := &request{method: http.MethodGet, header: http.Header{"Range": {rg.String()}}, repo: b.spec.repo}
	var resp *response
	wd.arm()
	if direct != nil {
		q.url = direct
		ev.Host = direct.Host
		resp, err = b.r.sendDirect(actx, ep, q)
	} else {
		q.url = ep.url(b.spec.repo, "blobs", b.desc.Digest.String())
		resp, err = b.r.send(actx, ep, q)
	}
	wd.disarm()
	if err != nil {
		return nil, err
	}
	defer drainClose(resp.Body)
	ev.Status, ev.Host, ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	cr.r = wd.reader(resp.Body)

	switch resp.StatusCode {
	case http.StatusPartialContent:
		data, err = b.readPartial(resp.Response, cr, rg)
	case http.StatusOK:
		data, err = b.readWhole(ctx, resp.Response, cr, rg)
	default:
		return nil, statusError(resp.Response, nil)
	}
	if err == nil && direct == nil && resp.redirected {
		b.mu.Lock()
		b.redirect, b.redirectEp = resp.url, ep
		b.mu.Unlock()
	}
	return data, err
}

// readPartial reads a 206 answer: one range, or multipart/byteranges.
func (b *Blob) readPartial(resp *http.Response, body io.Reader, rg Range) ([]byte, error) {
	mt, params, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if mt == "multipart/byteranges" {
		return b.readMultipart(body, params["boundary"], rg)
	}
	start, end, total, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil {
		return nil, err
	}
	if total >= 0 && total != b.size {
		return nil, &Error{Err: fmt.Errorf("server says the blob has %d bytes, expected %d", total, b.size), class: errdefs.ErrFailedPrecondition}
	}
	if start > rg.Offset || end < rg.Offset+rg.Length-1 {
		return nil, &Error{Err: fmt.Errorf("server answered with Content-Range %q", resp.Header.Get("Content-Range")), retry: true}
	}
	if resp.ContentLength >= 0 && resp.ContentLength != end-start+1 {
		return nil, &Error{Err: fmt.Errorf("Content-Length %d does not match Content-Range %q", resp.ContentLength, resp.Header.Get("Content-Range")), retry: true}
	}
	if skip := rg.Offset - start; skip > 0 {
		if n, err := io.CopyN(io.Discard, body, skip); err != nil {
			return nil, errTruncated(n, end-start+1)
		}
	}
	return readFull(body, rg.Length)
}

// readMultipart assembles rg from the parts of a multipart/byteranges
// body; the parts may split or exceed the range.
func (b *Blob) readMultipart(body io.Reader, boundary string, rg Range) ([]byte, error) {
	if boundary == "" {
		return nil, &Error{Err: errors.New("multipart/byteranges answer without a boundary"), retry: true}
	}
	out := make([]byte, rg.Length)
	var covered []Range
	mr := multipart.NewReader(body, boundary)
	for {
		part, err := mr.NextRawPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("multipart/byteranges: %w", io.ErrUnexpectedEOF)
		}
		start, end, total, err := parseContentRange(part.Header.Get("Content-Range"))
		if err != nil {
			return nil, err
		}
		if total >= 0 && total != b.size {
			return nil, &Error{Err: fmt.Errorf("server says the blob has %d bytes, expected %d", total, b.size), class: errdefs.ErrFailedPrecondition}
		}
		lo, hi := max(start, rg.Offset), min(end+1, rg.Offset+rg.Length)
		if lo >= hi {
			continue // a part we did not ask for
		}
		if n, err := io.CopyN(io.Discard, part, lo-start); err != nil {
			return nil, errTruncated(n, end-start+1)
		}
		if n, err := io.ReadFull(part, out[lo-rg.Offset:hi-rg.Offset]); err != nil {
			return nil, errTruncated(lo-start+int64(n), end-start+1)
		}
		covered = append(covered, Range{lo, hi - lo})
	}
	slices.SortFunc(covered, func(x, y Range) int { return cmp.Compare(x.Offset, y.Offset) })
	next := rg.Offset
	for _, c := range covered {
		if c.Offset > next {
			break
		}
		next = max(next, c.Offset+c.Length)
	}
	if next < rg.Offset+rg.Length {
		return nil, &Error{Err: fmt.Errorf("multipart/byteranges answer lacks bytes %d-%d", next, rg.Offset+rg.Length-1), retry: true}
	}
	return out, nil
}

// readWhole handles a 200 answer to a range request: the server ignored
// Range. A small blob is kept (verified) for all later reads; for a large
// one, range reads are marked impossible.
func (b *Blob) readWhole(ctx context.Context, resp *http.Response, body io.Reader, rg Range) ([]byte, error) {
	if resp.ContentLength >= 0 && resp.ContentLength != b.size {
		return nil, &Error{Err: fmt.Errorf("server serves %d bytes, expected %d", resp.ContentLength, b.size), class: errdefs.ErrFailedPrecondition}
	}
	full := rg.Offset == 0 && rg.Length == b.size
	if !full && b.size > b.r.opts.MaxWholeBlob {
		e := &Error{Err: fmt.Errorf("%w; the blob's %d bytes exceed the %d kept in memory", ErrRangeUnsupported, b.size, b.r.opts.MaxWholeBlob),
			Op: "read", Host: resp.Request.URL.Host, Repo: b.spec.name(), Ref: b.desc.Digest.String(), Status: resp.StatusCode}
		b.mu.Lock()
		b.noRange = e
		b.mu.Unlock()
		log.G(ctx).WithField("digest", b.desc.Digest).WithField("host", e.Host).Warn("remote: server ignores Range requests; blob too large to keep in memory")
		return nil, e
	}
	data, err := readFull(body, b.size)
	if err != nil {
		return nil, err
	}
	if err := verifyBytes(data, b.desc.Digest, b.size); err != nil {
		return nil, &Error{Err: err, class: errdefs.ErrDataLoss, retry: true}
	}
	if !full {
		b.mu.Lock()
		b.whole = data
		b.mu.Unlock()
		log.G(ctx).WithField("digest", b.desc.Digest).WithField("host", resp.Request.URL.Host).Info("remote: server ignores Range requests; keeping the whole blob in memory")
	}
	return data[rg.Offset : rg.Offset+rg.Length], nil
}

// parseContentRange parses "bytes first-last/total" (total "*" gives -1).
func parseContentRange(s string) (start, end, total int64, err error) {
	bad := func() (int64, int64, int64, error) {
		return 0, 0, 0, &Error{Err: fmt.Errorf("malformed Content-Range %q", s), retry: true}
	}
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), "bytes ")
	if !ok {
		return bad()
	}
	span, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return bad()
	}
	first, last, ok := strings.Cut(span, "-")
	if !ok {
		return bad()
	}
	start, err1 := strconv.ParseInt(strings.TrimSpace(first), 10, 64)
	end, err2 := strconv.ParseInt(strings.TrimSpace(last), 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return bad()
	}
	total = -1
	if tot = strings.TrimSpace(tot); tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= end {
			return bad()
		}
	}
	return start, end, total, nil
}

// drainClose reads a little of what is left of a body so that the
// connection can be reused, then closes it.
func drainClose(rc io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(rc, 64<<10))
	rc.Close()
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// flightGroup shares one fetch among concurrent callers asking for the
// same range. Unlike x/sync/singleflight, a caller whose context ends
// leaves without failing the others, and the fetch is cancelled only when
// every caller has left. The fetch's context carries no deadline; its retry
// loop asks the flight for the latest deadline of its callers instead.
type flightGroup struct {
	mu sync.Mutex
	m  map[Range]*flight
}

type flight struct {
	done   chan struct{}
	data   []byte
	err    error
	refs   int // under flightGroup.mu
	cancel context.CancelFunc

	mu        sync.Mutex
	last      *Error    // last failed attempt, for the callers that give up
	latest    time.Time // latest deadline among callers
	unbounded bool      // a caller has no deadline
}

type flightKey struct{}

// flightOf returns the flight a fetch runs for, if any.
func flightOf(ctx context.Context) *flight {
	f, _ := ctx.Value(flightKey{}).(*flight)
	return f
}

// join records a caller's deadline.
func (f *flight) join(ctx context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if dl, ok := ctx.Deadline(); !ok {
		f.unbounded = true
	} else if dl.After(f.latest) {
		f.latest = dl
	}
}

// deadline is the latest deadline of the callers, if they all have one.
func (f *flight) deadline() (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.latest, !f.unbounded
}

// failed records a failed attempt (a copy: the retry loop goes on
// annotating the original).
func (f *flight) failed(e *Error) {
	c := *e
	f.mu.Lock()
	f.last = &c
	f.mu.Unlock()
}

func (g *flightGroup) do(ctx context.Context, key Range, fn func(context.Context, Range) ([]byte, error)) ([]byte, error) {
	g.mu.Lock()
	f, ok := g.m[key]
	if !ok {
		f = &flight{done: make(chan struct{})}
		// Record this caller's deadline before the fetch can look at it.
		f.join(ctx)
		// The fetch keeps the first caller's values (logger...) but not
		// its cancellation.
		fctx, cancel := context.WithCancel(context.WithValue(context.WithoutCancel(ctx), flightKey{}, f))
		f.cancel = cancel
		g.m[key] = f
		go func() {
			defer cancel()
			f.data, f.err = fn(fctx, key)
			g.mu.Lock()
			if g.m[key] == f {
				delete(g.m, key)
			}
			g.mu.Unlock()
			close(f.done)
		}()
	}
	if ok {
		f.join(ctx)
	}
	f.refs++
	g.mu.Unlock()

	select {
	case <-f.done:
		return f.data, f.err
	case <-ctx.Done():
		g.mu.Lock()
		f.refs--
		last := f.refs == 0
		if last && g.m[key] == f {
			delete(g.m, key)
		}
		g.mu.Unlock()
		if last {
			f.cancel()
		}
		e := &Error{Op: "read", Range: key.String(), Err: context.Cause(ctx)}
		f.mu.Lock()
		if f.last != nil {
			e.Host, e.Status, e.Code, e.Message = f.last.Host, f.last.Status, f.last.Code, f.last.Message
			if f.last.Err != nil {
				e.Err = fmt.Errorf("%w (last attempt: %v)", e.Err, f.last.Err)
			}
		}
		f.mu.Unlock()
		return nil, e
	}
}
