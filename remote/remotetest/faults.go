package remotetest

import (
	"bytes"
	"errors"
	"fmt"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Request is a request the registry or its object store received.
type Request struct {
	Server        string // "registry" or "objectstore"
	Method        string
	Path          string
	RawQuery      string
	Range         string // the Range header
	Authorization string // the Authorization header
	Proto         string // "HTTP/1.1", "HTTP/2.0"
	Status        int    // status sent; 0 if the connection was dropped first
	Faulted       bool   // a Fault was applied
}

// Fault is misbehaviour injected in front of the registry and the object
// store. Zero fields do nothing; several effects can combine (a delay, then
// a throttled, corrupted and cut body).
type Fault struct {
	// Match selects the requests affected; nil matches all. See
	// BlobGETs, RangeGETs, ManifestGETs, ObjectStoreGETs.
	Match func(Request) bool
	// Times is how many matching requests are affected; 0 means every
	// one until the fault is removed.
	Times int

	// Delay waits this long before answering (stopping early if the
	// client goes away).
	Delay time.Duration
	// Drop closes the connection without answering.
	Drop bool
	// Status answers with this status and a registry-style JSON error
	// instead of serving the request.
	Status int
	// RetryAfter is sent as the Retry-After header with Status.
	RetryAfter string

	// BytesPerSecond caps the throughput of the response body.
	BytesPerSecond int
	// CutAfter, when > 0, sends only that many body bytes and then drops
	// the connection (the announced Content-Length is kept).
	CutAfter int64
	// Corrupt flips the bits of the first body byte.
	Corrupt bool

	// IgnoreRange serves the whole content with 200 to range requests.
	IgnoreRange bool
	// Multipart answers single-range requests with 206
	// multipart/byteranges, the range split in two parts.
	Multipart bool
}

// BlobGETs matches GETs of /v2/<repo>/blobs/<digest> on the registry.
func BlobGETs(q Request) bool {
	_, _, ok := parseBlobPath(q.Path)
	return q.Server == "registry" && q.Method == http.MethodGet && ok
}

// RangeGETs matches GETs with a Range header, on the registry or the
// object store.
func RangeGETs(q Request) bool { return q.Method == http.MethodGet && q.Range != "" }

// ManifestGETs matches GETs of manifests.
func ManifestGETs(q Request) bool {
	return q.Server == "registry" && q.Method == http.MethodGet && strings.Contains(q.Path, "/manifests/")
}

// ObjectStoreGETs matches GETs on the object store.
func ObjectStoreGETs(q Request) bool { return q.Server == "objectstore" && q.Method == http.MethodGet }

type faultRule struct {
	f    Fault
	left int // remaining uses; <0 means unlimited
}

// Inject adds a fault, after those already injected (the first matching
// fault with uses left applies). Call remove to take it away.
func (r *Registry) Inject(f Fault) (remove func()) {
	rule := &faultRule{f: f, left: f.Times}
	if f.Times <= 0 {
		rule.left = -1
	}
	r.mu.Lock()
	r.faults = append(r.faults, rule)
	r.mu.Unlock()
	return func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.faults = slices.DeleteFunc(r.faults, func(x *faultRule) bool { return x == rule })
	}
}

// ClearFaults removes every fault.
func (r *Registry) ClearFaults() {
	r.mu.Lock()
	r.faults = nil
	r.mu.Unlock()
}

// Requests returns the requests received so far, oldest first.
func (r *Registry) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.requests)
}

// ResetRequests forgets the requests received so far.
func (r *Registry) ResetRequests() {
	r.mu.Lock()
	r.requests = nil
	r.reqGen++
	r.mu.Unlock()
}

// Count counts the requests received so far that match (nil: all).
func (r *Registry) Count(match func(Request) bool) int {
	n := 0
	for _, q := range r.Requests() {
		if match == nil || match(q) {
			n++
		}
	}
	return n
}

func (r *Registry) takeFault(q Request) *Fault {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rule := range r.faults {
		if rule.left == 0 || (rule.f.Match != nil && !rule.f.Match(q)) {
			continue
		}
		if rule.left > 0 {
			rule.left--
		}
		f := rule.f
		return &f
	}
	return nil
}

// middleware records requests and applies faults.
func (r *Registry) middleware(server string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		q := Request{Server: server, Method: req.Method, Path: req.URL.Path, RawQuery: req.URL.RawQuery,
			Range: req.Header.Get("Range"), Authorization: req.Header.Get("Authorization"), Proto: req.Proto}
		f := r.takeFault(q)
		q.Faulted = f != nil
		// Record now (a client may count requests before the handler
		// returns); the status is filled in when it is sent.
		r.mu.Lock()
		r.requests = append(r.requests, q)
		idx, gen := len(r.requests)-1, r.reqGen
		r.mu.Unlock()
		sw := &statusWriter{ResponseWriter: w, onStatus: func(code int) {
			r.mu.Lock()
			if r.reqGen == gen && idx < len(r.requests) {
				r.requests[idx].Status = code
			}
			r.mu.Unlock()
		}}
		if f == nil {
			next.ServeHTTP(sw, req)
			return
		}
		applyFault(sw, req, f, next)
	})
}

var errCut = errors.New("remotetest: connection cut")

func applyFault(w *statusWriter, req *http.Request, f *Fault, next http.Handler) {
	if f.Delay > 0 {
		t := time.NewTimer(f.Delay)
		select {
		case <-t.C:
		case <-req.Context().Done():
			t.Stop()
			return
		}
	}
	if f.Drop {
		panic(http.ErrAbortHandler)
	}
	if f.Status != 0 {
		code := "UNKNOWN"
		switch {
		case f.Status == http.StatusTooManyRequests:
			code = "TOOMANYREQUESTS"
		case f.Status >= 500:
			code = "UNAVAILABLE"
		case f.Status == http.StatusNotFound:
			code = "BLOB_UNKNOWN"
		case f.Status == http.StatusForbidden:
			code = "DENIED"
		}
		if f.RetryAfter != "" {
			w.Header().Set("Retry-After", f.RetryAfter)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(f.Status)
		fmt.Fprintf(w, `{"errors":[{"code":%q,"message":"injected fault (HTTP %d)"}]}`, code, f.Status)
		return
	}
	if f.IgnoreRange {
		req = req.Clone(req.Context())
		req.Header.Del("Range")
	}
	fw := &faultWriter{statusWriter: w, f: f, req: req}
	if f.Multipart && req.Header.Get("Range") != "" {
		serveMultipart(fw, req, next)
	} else {
		next.ServeHTTP(fw, req)
	}
	if fw.cut {
		fw.statusWriter.Flush()
		panic(http.ErrAbortHandler)
	}
}

// serveMultipart answers a single-range request with multipart/byteranges.
func serveMultipart(w http.ResponseWriter, req *http.Request, next http.Handler) {
	start, end, ok := parseSingleRange(req.Header.Get("Range"))
	if !ok {
		next.ServeHTTP(w, req)
		return
	}
	inner := req.Clone(req.Context())
	inner.Header.Del("Range")
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, inner)
	if rec.Code != http.StatusOK {
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
		return
	}
	body := rec.Body.Bytes()
	size := int64(len(body))
	if end < 0 || end >= size {
		end = size - 1
	}
	if start >= size || start > end {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
		return
	}
	spans := [][2]int64{{start, end}}
	if end > start {
		mid := start + (end-start)/2
		spans = [][2]int64{{start, mid}, {mid + 1, end}}
	}
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, s := range spans {
		pw, _ := mw.CreatePart(textproto.MIMEHeader{
			"Content-Type":  {"application/octet-stream"},
			"Content-Range": {fmt.Sprintf("bytes %d-%d/%d", s[0], s[1], size)},
		})
		pw.Write(body[s[0] : s[1]+1])
	}
	mw.Close()
	w.Header().Set("Content-Type", "multipart/byteranges; boundary="+mw.Boundary())
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(http.StatusPartialContent)
	w.Write(buf.Bytes())
}

// parseSingleRange parses "bytes=a-b" or "bytes=a-" (end -1).
func parseSingleRange(s string) (int64, int64, bool) {
	spec, ok := strings.CutPrefix(s, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	a, b, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	end := int64(-1)
	if b != "" {
		if end, err = strconv.ParseInt(b, 10, 64); err != nil {
			return 0, 0, false
		}
	}
	return start, end, true
}

// statusWriter reports the status sent.
type statusWriter struct {
	http.ResponseWriter
	status   int
	onStatus func(int)
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
		w.onStatus(code)
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// faultWriter shapes a response body: throttle, corrupt, cut.
type faultWriter struct {
	*statusWriter
	f       *Fault
	req     *http.Request
	written int64
	cut     bool
}

func (w *faultWriter) Write(p []byte) (int, error) {
	if w.cut {
		return 0, errCut
	}
	cutNow := false
	if w.f.CutAfter > 0 {
		left := w.f.CutAfter - w.written
		if int64(len(p)) >= left {
			p, cutNow = p[:left], true
		}
	}
	if w.f.Corrupt && w.written == 0 && len(p) > 0 {
		p = bytes.Clone(p)
		p[0] ^= 0xff
	}
	n, err := w.throttled(p)
	w.written += int64(n)
	if err == nil && cutNow {
		w.cut = true
		err = errCut
	}
	return n, err
}

func (w *faultWriter) throttled(p []byte) (int, error) {
	bps := w.f.BytesPerSecond
	if bps <= 0 {
		return w.statusWriter.Write(p)
	}
	chunk := max(1, bps/20)
	done := 0
	for done < len(p) {
		n := min(chunk, len(p)-done)
		k, err := w.statusWriter.Write(p[done : done+n])
		done += k
		if err != nil {
			return done, err
		}
		w.statusWriter.Flush()
		t := time.NewTimer(time.Duration(n) * time.Second / time.Duration(bps))
		select {
		case <-t.C:
		case <-w.req.Context().Done():
			t.Stop()
			return done, w.req.Context().Err()
		}
	}
	return done, nil
}
