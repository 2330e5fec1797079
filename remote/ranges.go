// Range requests: one range fetched with a GET and a Range header, failing
// over between endpoints and retrying, following (and remembering)
// redirects to object storage, and parsing what servers answer — a single
// 206 range, multipart/byteranges, or a 200 with the whole blob when the
// server ignores Range.

package remote

import (
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
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

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
	var received byteCount
	defer func() {
		if err != nil {
			err = transportError(ctx, actx, err, b.r.opts.RequestTimeout).with("read", ev.Host, b.spec.name(), b.desc.Digest.String(), rg.String())
		}
		ev.Bytes, ev.Err, ev.Duration = int64(received), err, time.Since(t0)
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
	body := io.TeeReader(wd.reader(resp.Body), &received)

	switch resp.StatusCode {
	case http.StatusPartialContent:
		data, err = b.readPartial(resp.Response, body, rg)
	case http.StatusOK:
		data, err = b.readWhole(ctx, resp.Response, body, rg)
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

// byteCount counts the bytes written to it (the other end of an
// io.TeeReader).
type byteCount int64

func (c *byteCount) Write(p []byte) (int, error) {
	*c += byteCount(len(p))
	return len(p), nil
}
