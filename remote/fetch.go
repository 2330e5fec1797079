package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Fetch returns the content desc describes, from the repository ref names
// (ref's tag or digest is ignored). Manifests and indexes (by media type)
// come from /manifests/, everything else from /blobs/.
//
// The content is verified as it streams: the Read that reaches the end
// returns an *Error matching errdefs.ErrDataLoss instead of io.EOF when the
// size or digest is wrong. A body that breaks off mid-stream is resumed
// with a Range request at the current offset (or re-read and skipped
// forward when the server ignores Range), within the retry budget.
//
// ctx governs the whole stream, not just the call. Close the reader.
func (r *Registry) Fetch(ctx context.Context, ref string, desc ocispec.Descriptor) (io.ReadCloser, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, &Error{Op: "fetch", Repo: spec.name(), Err: fmt.Errorf("descriptor digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	if isIndexType(desc.MediaType) || isManifestType(desc.MediaType) || desc.MediaType == mediaTypeDockerSchema1 {
		raw, err := r.fetchManifest(ctx, spec, desc)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(bytes.NewReader(raw)), nil
	}

	eps, err := r.endpoints(spec, docker.HostCapabilityPull)
	if err != nil {
		return nil, err
	}
	s := &blobStream{r: r, ctx: ctx, spec: spec, desc: desc, size: desc.Size, hash: desc.Digest.Algorithm().Digester()}
	if s.size <= 0 {
		s.size = -1 // unknown: rely on the digest
	}
	err = r.onEndpoints(ctx, eps, func(ep *endpoint, last bool) error {
		return r.retry(ctx, last, func(attempt int) error {
			s.ep = ep
			return s.open(attempt)
		})
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// blobStream is the verifying, resuming reader Fetch returns.
type blobStream struct {
	r    *Registry
	ctx  context.Context
	spec refSpec
	desc ocispec.Descriptor
	size int64 // -1 if unknown
	ep   *endpoint

	// The open attempt.
	actx context.Context
	wd   *watchdog
	body io.ReadCloser
	ev   FetchEvent
	t0   time.Time
	off0 int64

	off      int64 // bytes delivered (and hashed) so far
	hash     digest.Digester
	failures int   // consecutive failures without progress
	err      error // sticky
}

// open starts a GET of the blob from s.off.
func (s *blobStream) open(attempt int) (err error) {
	actx, wd := s.r.attempt(s.ctx)
	s.t0, s.off0 = time.Now(), s.off
	s.ev = FetchEvent{Op: "blob", Host: s.ep.host.Host, Repo: s.spec.name(), Digest: s.desc.Digest,
		Offset: s.off, Length: -1, Attempt: attempt}
	var resp *response
	defer func() {
		if err != nil {
			if resp != nil {
				resp.Body.Close()
			}
			wd.done()
			err = s.annotate(transportError(s.ctx, actx, err, s.r.opts.RequestTimeout))
			s.ev.Err, s.ev.Duration = err, time.Since(s.t0)
			s.r.emit(s.ev)
		}
	}()

	q := &request{method: http.MethodGet, url: s.ep.url(s.spec.repo, "blobs", s.desc.Digest.String()),
		header: http.Header{}, repo: s.spec.repo}
	if s.off > 0 {
		q.header.Set("Range", fmt.Sprintf("bytes=%d-", s.off))
	}
	wd.arm()
	resp, err = s.r.send(actx, s.ep, q)
	wd.disarm()
	if err != nil {
		return err
	}
	s.ev.Status, s.ev.Host, s.ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	switch resp.StatusCode {
	case http.StatusOK:
		if s.size >= 0 && resp.ContentLength >= 0 && resp.ContentLength != s.size {
			return &Error{Err: fmt.Errorf("registry serves %d bytes, descriptor says %d", resp.ContentLength, s.size), class: errdefs.ErrFailedPrecondition}
		}
		if s.off > 0 {
			// Range ignored: skip what was already delivered.
			if n, err := io.CopyN(io.Discard, wd.reader(resp.Body), s.off); err != nil {
				return errTruncated(n, s.off)
			}
		}
	case http.StatusPartialContent:
		start, _, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return &Error{Err: err}
		}
		if start != s.off {
			return &Error{Err: fmt.Errorf("asked for bytes from %d, got Content-Range %q", s.off, resp.Header.Get("Content-Range"))}
		}
		if s.size >= 0 && total >= 0 && total != s.size {
			return &Error{Err: fmt.Errorf("registry serves %d bytes, descriptor says %d", total, s.size), class: errdefs.ErrFailedPrecondition}
		}
	default:
		return statusError(resp.Response, nil)
	}
	s.actx, s.wd, s.body = actx, wd, resp.Body
	return nil
}

// annotate names the stream in an error.
func (s *blobStream) annotate(e *Error) *Error {
	host := ""
	if s.ep != nil {
		host = s.ep.host.Host
	}
	rng := ""
	if s.off > 0 {
		rng = fmt.Sprintf("bytes=%d-", s.off)
	}
	return e.with("fetch", host, s.spec.name(), s.desc.Digest.String(), rng)
}

// closeBody ends the current attempt and reports it.
func (s *blobStream) closeBody(err error) {
	if s.body == nil {
		return
	}
	s.body.Close()
	s.wd.done()
	s.body = nil
	s.ev.Bytes, s.ev.Duration, s.ev.Err = s.off-s.off0, time.Since(s.t0), err
	s.r.emit(s.ev)
}

// Read implements io.Reader.
func (s *blobStream) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if s.body == nil {
			if s.failures > 1 {
				t := time.NewTimer(s.r.backoff(s.failures - 1))
				select {
				case <-s.ctx.Done():
					t.Stop()
					s.err = s.annotate(&Error{Err: context.Cause(s.ctx)})
					return 0, s.err
				case <-t.C:
				}
			}
			err := s.r.retry(s.ctx, true, s.open)
			if err != nil {
				s.err = err
				return 0, err
			}
		}
		s.wd.arm()
		n, err := s.body.Read(p)
		s.wd.disarm()
		if n > 0 {
			if s.size >= 0 && s.off+int64(n) > s.size {
				s.closeBody(nil)
				s.err = s.annotate(&Error{Err: fmt.Errorf("blob is longer than the %d bytes its descriptor says", s.size), class: errdefs.ErrDataLoss})
				return 0, s.err
			}
			s.hash.Hash().Write(p[:n])
			s.off += int64(n)
			s.failures = 0
		}
		if err == nil {
			return n, nil
		}
		if errors.Is(err, io.EOF) {
			if s.size < 0 || s.off == s.size {
				s.closeBody(nil)
				s.err = s.verify()
				return n, s.err
			}
			err = errTruncated(s.off, s.size)
		}
		e := s.annotate(transportError(s.ctx, s.actx, err, s.r.opts.RequestTimeout))
		s.closeBody(e)
		if !e.retry || s.ctx.Err() != nil {
			s.err = e
			return n, e
		}
		s.failures++
		if s.failures > s.r.opts.Retries {
			e.Attempts = s.failures
			s.err = e
			return n, e
		}
		if n > 0 {
			return n, nil // resume at the next Read
		}
	}
}

// verify checks the digest once the whole blob went through.
func (s *blobStream) verify() error {
	if got := s.hash.Digest(); got != s.desc.Digest {
		return &Error{Op: "fetch", Host: s.ep.host.Host, Repo: s.spec.name(), Ref: s.desc.Digest.String(),
			Err: fmt.Errorf("content has digest %s, expected %s", got, s.desc.Digest), class: errdefs.ErrDataLoss}
	}
	return io.EOF
}

// Close implements io.Closer.
func (s *blobStream) Close() error {
	s.closeBody(nil)
	if s.err == nil {
		s.err = errors.New("remote: read after Close")
	}
	return nil
}
