package remote

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/errdefs"
)

// ErrRangeUnsupported is wrapped by the error of a range read when the
// server answers range requests with the whole blob and the blob is larger
// than [Options.MaxWholeBlob]. It is also an errdefs.ErrNotImplemented.
var ErrRangeUnsupported = fmt.Errorf("server ignores HTTP Range requests for this blob: %w", errdefs.ErrNotImplemented)

// Error is the error of a registry operation. It names what failed, and
// matches the errdefs class of the failure (errdefs.IsNotFound etc.) and its
// cause with errors.Is / errors.As.
type Error struct {
	Op       string // what was attempted, e.g. "resolve", "read", "fetch", "push blob"
	Host     string // host that answered or could not be reached
	Repo     string // repository, e.g. "docker.io/library/alpine"
	Ref      string // tag or digest concerned
	Range    string // byte range of a range read, e.g. "bytes=0-1023"
	Status   int    // HTTP status; 0 when no response was received
	Code     string // the registry's error code, e.g. "BLOB_UNKNOWN"
	Message  string // the registry's error message
	Attempts int    // attempts made, when more than one
	Err      error  // underlying cause, may be nil

	class      error // errdefs class
	retry      bool
	retryAfter time.Duration
}

// Error describes the failure in one line.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Op)
	if e.Range != "" {
		b.WriteString(" " + e.Range + " of")
	}
	if e.Repo != "" {
		b.WriteString(" " + e.Repo)
		switch {
		case strings.Contains(e.Ref, ":"):
			b.WriteString("@" + e.Ref)
		case e.Ref != "":
			b.WriteString(":" + e.Ref)
		}
	} else if e.Ref != "" {
		b.WriteString(" " + e.Ref)
	}
	if e.Host != "" {
		b.WriteString(" (host " + e.Host + ")")
	}
	if e.Status != 0 {
		fmt.Fprintf(&b, ": HTTP %d %s", e.Status, http.StatusText(e.Status))
	}
	if e.Code != "" {
		b.WriteString(": " + e.Code)
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	if e.Err != nil {
		b.WriteString(": " + e.Err.Error())
	}
	if e.Attempts > 1 {
		fmt.Fprintf(&b, " (gave up after %d attempts)", e.Attempts)
	}
	return b.String()
}

// Unwrap returns the errdefs class and the cause.
func (e *Error) Unwrap() []error {
	var errs []error
	if e.class != nil {
		errs = append(errs, e.class)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

// with fills the fields that describe the operation, without overwriting
// what is already known.
func (e *Error) with(op, host, repo, ref, rng string) *Error {
	if e.Op == "" {
		e.Op = op
	}
	if e.Host == "" {
		e.Host = host
	}
	if e.Repo == "" {
		e.Repo = repo
	}
	if e.Ref == "" {
		e.Ref = ref
	}
	if e.Range == "" {
		e.Range = rng
	}
	return e
}

// asError returns err as an *Error, wrapping it if needed.
func asError(err error) *Error {
	if e, ok := errors.AsType[*Error](err); ok {
		return e
	}
	return &Error{Err: err}
}

// registryErrors is the error body of the distribution API.
type registryErrors struct {
	Errors []struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"errors"`
}

// statusError turns an unexpected HTTP response into an *Error, reading at
// most 64 KiB of its body for the registry's error code and message.
func statusError(resp *http.Response, body []byte) *Error {
	if body == nil && resp.Body != nil {
		body, _ = io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	}
	e := &Error{Status: resp.StatusCode}
	if resp.Request != nil && resp.Request.URL != nil {
		e.Host = resp.Request.URL.Host
	}
	var re registryErrors
	if json.Unmarshal(body, &re) == nil && len(re.Errors) > 0 {
		var codes, msgs []string
		for _, x := range re.Errors {
			if x.Code != "" {
				codes = append(codes, x.Code)
			}
			if x.Message != "" {
				msgs = append(msgs, x.Message)
			}
		}
		e.Code, e.Message = strings.Join(codes, ", "), strings.Join(msgs, "; ")
	} else if s := strings.TrimSpace(string(body)); s != "" && len(s) < 512 && !strings.ContainsAny(s, "<\x00") {
		e.Message = s
	}
	e.class = classOfStatus(resp.StatusCode)
	switch resp.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
		http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		e.retry = true
		e.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	return e
}

func classOfStatus(status int) error {
	switch status {
	case http.StatusBadRequest:
		return errdefs.ErrInvalidArgument
	case http.StatusUnauthorized:
		return errdefs.ErrUnauthenticated
	case http.StatusForbidden:
		return errdefs.ErrPermissionDenied
	case http.StatusNotFound, http.StatusGone:
		return errdefs.ErrNotFound
	case http.StatusMethodNotAllowed, http.StatusNotImplemented:
		return errdefs.ErrNotImplemented
	case http.StatusConflict:
		return errdefs.ErrConflict
	case http.StatusRequestedRangeNotSatisfiable:
		return errdefs.ErrOutOfRange
	case http.StatusTooManyRequests:
		return errdefs.ErrResourceExhausted
	}
	if status >= 500 {
		return errdefs.ErrUnavailable
	}
	return errdefs.ErrUnknown
}

// parseRetryAfter reads a Retry-After value: seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0
		}
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}

// errAttemptTimeout is the cancellation cause of an attempt whose server
// stopped answering.
var errAttemptTimeout = errors.New("attempt timed out")

// transportError classifies an error from sending a request or reading a
// body. actx is the attempt's context, ctx the caller's.
func transportError(ctx, actx context.Context, err error, timeout time.Duration) *Error {
	if e, ok := errors.AsType[*Error](err); ok {
		return e
	}
	if ctx.Err() != nil {
		return &Error{Err: context.Cause(ctx)}
	}
	if actx != nil && context.Cause(actx) == errAttemptTimeout {
		return &Error{Err: fmt.Errorf("no progress for %v: %w", timeout, context.DeadlineExceeded), class: errdefs.ErrUnavailable, retry: true}
	}
	if st, ok := errors.AsType[remoteerrors.ErrUnexpectedStatus](err); ok {
		// From the token server, via containerd's authorizer.
		e := &Error{Status: st.StatusCode, Err: errors.New("token request failed"), class: classOfStatus(st.StatusCode)}
		var re registryErrors
		if json.Unmarshal(st.Body, &re) == nil && len(re.Errors) > 0 {
			e.Code, e.Message = re.Errors[0].Code, re.Errors[0].Message
		}
		if st.RequestURL != "" {
			e.Err = fmt.Errorf("token request to %s failed", st.RequestURL)
		}
		e.retry = st.StatusCode == 429 || st.StatusCode >= 500
		return e
	}
	if errdefs.IsUnauthorized(err) || errdefs.IsNotImplemented(err) || errdefs.IsInvalidArgument(err) ||
		errdefs.IsPermissionDenied(err) || errdefs.IsDataLoss(err) || errdefs.IsOutOfRange(err) {
		// Classified errors (authorizer, our own checks): keep the class.
		return &Error{Err: err}
	}
	if ue, ok := errors.AsType[*url.Error](err); ok {
		// Drop the URL: the host is named elsewhere, and the URL may be a
		// signed one, or show https where the fallback used http.
		err = fmt.Errorf("%s: %w", ue.Op, ue.Err)
	}
	if isCertError(err) {
		return &Error{Err: err, class: errdefs.ErrUnavailable}
	}
	if dns, ok := errors.AsType[*net.DNSError](err); ok && dns.IsNotFound {
		return &Error{Err: err, class: errdefs.ErrUnavailable}
	}
	// Connection refused/reset, EOF, unexpected EOF, DNS, timeouts...
	return &Error{Err: err, class: errdefs.ErrUnavailable, retry: true}
}

func isCertError(err error) bool {
	s := err.Error()
	return strings.Contains(s, "x509:") || strings.Contains(s, "tls: failed to verify")
}

// errTruncated reports a body shorter than announced.
func errTruncated(got, want int64) error {
	return fmt.Errorf("body truncated after %d of %d bytes: %w", got, want, io.ErrUnexpectedEOF)
}
