package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// request is one API request, replayable unless it has a one-shot body.
type request struct {
	method string
	url    *url.URL
	header http.Header
	body   []byte    // replayable body
	bodyR  io.Reader // one-shot body of length size (uploads)
	size   int64
	repo   string // repository path, for the auth scope
	push   bool   // ask for a push scope
}

// response is what send returns: the final response and where it came from.
type response struct {
	*http.Response
	url        *url.URL // final URL after redirects
	redirected bool     // the final URL is on another host than the endpoint
}

// send performs one attempt of q against ep: it authorizes the request,
// answers auth challenges (401) through the endpoint's authorizer, and
// follows redirects for GET and HEAD, without the registry's credentials
// when the redirect leaves the registry host. ctx is the attempt's context.
// The caller closes the returned body.
//
// When the registry rejects the credentials (401, or 403 to a request that
// carried credentials, from the registry itself rather than from a
// redirect target), the endpoint's authorizer
// for the repository is dropped, the keychain refreshed, and the request
// sent once more with freshly obtained credentials.
func (r *Registry) send(ctx context.Context, ep *endpoint, q *request) (*response, error) {
	a := r.authorizer(ep, q.repo)
	resp, err := r.sendAuthorized(ctx, ep, q, a)
	if !q.replayable() || !credentialsRejected(resp, err) || ctx.Err() != nil {
		return resp, err
	}
	if resp != nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
	}
	log.G(ctx).WithField("host", ep.host.Host).WithField("repo", ep.refHost+"/"+q.repo).
		Info("remote: registry rejected the credentials, retrying once with fresh ones")
	r.dropAuthorizer(ep, q.repo, a)
	return r.sendAuthorized(ctx, ep, q, r.authorizer(ep, q.repo))
}

// credentialsRejected reports whether send's outcome is the registry
// refusing our credentials.
func credentialsRejected(resp *response, err error) bool {
	if err != nil {
		e, ok := errors.AsType[*Error](err)
		return ok && (e.Status == http.StatusUnauthorized || errors.Is(e.class, errdefs.ErrUnauthenticated))
	}
	if resp.redirected {
		return false
	}
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		return true
	case http.StatusForbidden:
		// Only a request that carried credentials can be refused for
		// them; an anonymous 403 is the registry's policy.
		return resp.Request != nil && resp.Request.Header.Get("Authorization") != ""
	}
	return false
}

// sendAuthorized is one attempt of send with authorizer a.
func (r *Registry) sendAuthorized(ctx context.Context, ep *endpoint, q *request, a *authorizer) (*response, error) {
	scope := "repository:" + q.repo + ":pull"
	if q.push {
		scope += ",push"
	}
	ctx = docker.WithScope(ctx, scope)

	var (
		challenges []*http.Response
		resp       *http.Response
	)
	for {
		req, err := r.newRequest(ctx, q.method, q.url, q, true)
		if err != nil {
			return nil, err
		}
		for k, v := range ep.host.Header {
			req.Header[k] = append([]string(nil), v...)
		}
		if err := a.Authorize(ctx, req); err != nil {
			q.closeBody()
			return nil, authError(err)
		}
		resp, err = ep.client.Do(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusUnauthorized {
			break
		}
		// Answer the challenge, at most twice: once for the first
		// challenge, once more for an expired or insufficient token.
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if len(challenges) >= 2 || !q.replayable() {
			return nil, statusError(resp, body)
		}
		challenges = append(challenges, resp)
		if err := a.AddResponses(ctx, challenges); err != nil {
			e := statusError(resp, body)
			e.Err = fmt.Errorf("authentication failed: %w", err)
			return nil, e
		}
	}

	out := &response{Response: resp, url: resp.Request.URL}
	for hops := 0; isRedirect(resp.StatusCode) && (q.method == http.MethodGet || q.method == http.MethodHead); hops++ {
		loc, err := resp.Location()
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("redirect from %s without a usable Location: %w", out.url.Redacted(), err)
		}
		if hops >= 10 {
			return nil, fmt.Errorf("stopped after 10 redirects, at %s", loc.Redacted())
		}
		sameHost := loc.Host == ep.host.Host
		req, err := r.newRequest(ctx, q.method, loc, q, false)
		if err != nil {
			return nil, err
		}
		if sameHost {
			if err := a.Authorize(ctx, req); err != nil {
				return nil, authError(err)
			}
		}
		resp, err = ep.client.Do(req)
		if err != nil {
			return nil, err
		}
		out.Response, out.url = resp, loc
		out.redirected = out.redirected || !sameHost
	}
	return out, nil
}

// sendDirect sends q to an absolute URL outside the registry (a remembered
// redirect target), with no credentials and no redirects.
func (r *Registry) sendDirect(ctx context.Context, ep *endpoint, q *request) (*response, error) {
	req, err := r.newRequest(ctx, q.method, q.url, q, false)
	if err != nil {
		return nil, err
	}
	resp, err := ep.client.Do(req)
	if err != nil {
		return nil, err
	}
	return &response{Response: resp, url: q.url, redirected: true}, nil
}

func (r *Registry) newRequest(ctx context.Context, method string, u *url.URL, q *request, withBody bool) (*http.Request, error) {
	var body io.Reader
	if withBody {
		switch {
		case q.body != nil:
			body = bytes.NewReader(q.body)
		case q.bodyR != nil:
			body = q.bodyR
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		if withBody {
			q.closeBody()
		}
		return nil, &Error{Err: err, class: errdefs.ErrInvalidArgument}
	}
	if withBody && q.bodyR != nil {
		req.ContentLength = q.size
	}
	for k, v := range q.header {
		req.Header[k] = append([]string(nil), v...)
	}
	req.Header.Set("User-Agent", r.opts.UserAgent)
	return req, nil
}

func (q *request) replayable() bool { return q.bodyR == nil }

// closeBody closes a one-shot body that will not reach the transport
// (which otherwise closes it).
func (q *request) closeBody() {
	if c, ok := q.bodyR.(io.Closer); ok {
		c.Close()
	}
}

func isRedirect(status int) bool {
	switch status {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		return true
	}
	return false
}

// authError classifies a failure of the authorizer (token fetch,
// credential lookup).
func authError(err error) error {
	if e, ok := errors.AsType[*Error](err); ok {
		return e
	}
	e := transportError(context.Background(), nil, err, 0)
	if e.class == nil || e.class == errdefs.ErrUnavailable && !e.retry {
		e.class = errdefs.ErrUnauthenticated
	}
	e.Err = fmt.Errorf("authentication failed: %w", err)
	return e
}

// watchdog cancels an attempt whose server makes no progress for the
// request timeout. It is armed only while we wait on the network, so a
// slow consumer of a stream does not count as a stalled server.
type watchdog struct {
	timeout time.Duration
	timer   *time.Timer
	cancel  context.CancelCauseFunc
}

// attempt returns the context of one attempt and its watchdog; call done
// when the attempt (including reading its body) is over.
func (r *Registry) attempt(ctx context.Context) (context.Context, *watchdog) {
	actx, cancel := context.WithCancelCause(ctx)
	w := &watchdog{timeout: r.opts.RequestTimeout, cancel: cancel}
	w.timer = time.AfterFunc(time.Hour, func() { cancel(errAttemptTimeout) })
	w.timer.Stop()
	return actx, w
}

func (w *watchdog) arm()    { w.timer.Reset(w.timeout) }
func (w *watchdog) disarm() { w.timer.Stop() }
func (w *watchdog) done()   { w.timer.Stop(); w.cancel(context.Canceled) }

// reader wraps a body so that each Read is watched.
func (w *watchdog) reader(rd io.Reader) io.Reader { return watchedReader{rd, w} }

type watchedReader struct {
	rd io.Reader
	w  *watchdog
}

func (r watchedReader) Read(p []byte) (int, error) {
	r.w.arm()
	n, err := r.rd.Read(p)
	r.w.disarm()
	return n, err
}

// readFull reads exactly n bytes of body, reporting a short body as a
// (retryable) truncation.
func readFull(body io.Reader, n int64) ([]byte, error) {
	buf := make([]byte, n)
	got, err := io.ReadFull(body, buf)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errTruncated(int64(got), n)
		}
		return nil, err
	}
	return buf, nil
}

// readAll reads a body whose announced length is cl (-1 if unknown), up to
// limit bytes.
func readAll(body io.Reader, cl, limit int64) ([]byte, error) {
	if cl > limit {
		return nil, &Error{Err: fmt.Errorf("response of %d bytes exceeds the limit of %d", cl, limit), class: errdefs.ErrOutOfRange}
	}
	if cl >= 0 {
		return readFull(body, cl)
	}
	b, err := io.ReadAll(io.LimitReader(body, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, &Error{Err: fmt.Errorf("response exceeds the limit of %d bytes", limit), class: errdefs.ErrOutOfRange}
	}
	return b, nil
}

// retry runs fn until it succeeds, fails for good, or the attempts run
// out. fn receives the 1-based attempt number. With last false (a mirror
// that is not the last endpoint) there is a single attempt.
func (r *Registry) retry(ctx context.Context, last bool, fn func(attempt int) error) error {
	attempts := 1
	if last {
		attempts += r.opts.Retries
	}
	for i := 1; ; i++ {
		err := fn(i)
		if err == nil {
			return nil
		}
		e := asError(err)
		fl := flightOf(ctx)
		if fl != nil && ctx.Err() == nil {
			fl.failed(e)
		}
		if ctx.Err() != nil {
			if !errors.Is(e, ctx.Err()) {
				e.Err = errors.Join(context.Cause(ctx), e.Err)
			}
			return e
		}
		if !e.retry || i >= attempts {
			if e.retry && i > 1 {
				e.Attempts = i
			}
			return e
		}
		wait := r.backoff(i)
		if e.retryAfter > 0 {
			if e.retryAfter > maxRetryAfter {
				e.Err = errors.Join(e.Err, fmt.Errorf("server asked to retry after %v", e.retryAfter))
				e.Attempts = i
				return e
			}
			wait = e.retryAfter
		}
		dl, ok := ctx.Deadline()
		if !ok && fl != nil {
			dl, ok = fl.deadline()
		}
		if ok && time.Until(dl) < wait {
			e.Attempts = i
			e.Err = errors.Join(e.Err, fmt.Errorf("context deadline too close to wait %v before retrying", wait))
			return e
		}
		log.G(ctx).WithError(e).WithField("attempt", i).WithField("wait", wait).Debug("remote: retrying")
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			e.Err = errors.Join(context.Cause(ctx), e.Err)
			return e
		case <-t.C:
		}
	}
}

// backoff is the wait before retry i (1-based): RetryBackoff doubled
// each time, capped, with jitter in [d/2, d].
func (r *Registry) backoff(i int) time.Duration {
	d := r.opts.RetryBackoff
	for ; i > 1 && d < maxBackoff; i-- {
		d *= 2
	}
	d = min(d, max(maxBackoff, r.opts.RetryBackoff))
	return d/2 + rand.N(d/2+1)
}

// onEndpoints runs op on each endpoint in turn until one succeeds or fails
// for a reason another endpoint would not fix (anything but not-found and
// unavailability). The last endpoint gets the full retry budget.
func (r *Registry) onEndpoints(ctx context.Context, eps []*endpoint, op func(ep *endpoint, last bool) error) error {
	var err error
	for i, ep := range eps {
		last := i == len(eps)-1
		err = op(ep, last)
		if err == nil || last || ctx.Err() != nil {
			return err
		}
		if !errdefs.IsNotFound(err) && !errdefs.IsUnavailable(err) && !errdefs.IsResourceExhausted(err) {
			return err
		}
		log.G(ctx).WithError(err).WithField("host", ep.host.Host).Info("remote: mirror failed, trying next host")
	}
	return err
}
