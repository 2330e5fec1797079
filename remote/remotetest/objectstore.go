package remotetest

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// ObjectStore stands for the object storage (S3, GCS...) a registry
// redirects blob reads to: once [Registry.RedirectBlobs] is on, the
// registry answers authorized GET and HEAD requests for blobs with 307 to a
// URL on this server, signed for that method and valid for a TTL. Expired,
// tampered or wrong-method URLs get 403; a request carrying an
// Authorization header gets 400, as S3 does. Range requests are served
// (single and multiple ranges). Its requests are recorded with the
// registry's, Server "objectstore", and faults apply to it too.
type ObjectStore struct {
	reg  *Registry
	srv  *http.Server
	addr string
	key  []byte

	mu    sync.Mutex
	ttl   time.Duration
	gen   int
	blobs map[string][]byte
}

// RedirectBlobs makes the registry redirect blob reads to an object store
// whose signed URLs live for ttl. Calling it again changes the TTL of the
// existing store.
func (r *Registry) RedirectBlobs(t testing.TB, ttl time.Duration) *ObjectStore {
	t.Helper()
	r.mu.Lock()
	if r.store != nil {
		s := r.store
		r.mu.Unlock()
		s.SetTTL(ttl)
		return s
	}
	r.mu.Unlock()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("remotetest: listen: %v", err)
	}
	o := &ObjectStore{reg: r, addr: ln.Addr().String(), ttl: ttl, blobs: map[string][]byte{}, key: make([]byte, 32)}
	rand.Read(o.key)
	o.srv = &http.Server{Handler: r.middleware("objectstore", http.HandlerFunc(o.serve)), ErrorLog: quietLogger()}
	go o.srv.Serve(ln)
	r.mu.Lock()
	r.store = o
	r.mu.Unlock()
	return o
}

// StopRedirects makes the registry serve blobs itself again (the object
// store keeps answering URLs it signed).
func (r *Registry) StopRedirects() {
	r.mu.Lock()
	s := r.store
	r.store = nil
	r.mu.Unlock()
	if s != nil {
		// Keep the server running until Close: clients may hold URLs.
		r.mu.Lock()
		r.oldStores = append(r.oldStores, s)
		r.mu.Unlock()
	}
}

// Host is the object store's host:port.
func (o *ObjectStore) Host() string { return o.addr }

// SetTTL changes the lifetime of URLs signed from now on.
func (o *ObjectStore) SetTTL(ttl time.Duration) {
	o.mu.Lock()
	o.ttl = ttl
	o.mu.Unlock()
}

// ExpireAll invalidates every URL signed so far.
func (o *ObjectStore) ExpireAll() {
	o.mu.Lock()
	o.gen++
	o.mu.Unlock()
}

func (o *ObjectStore) close() { o.srv.Close() }

func (o *ObjectStore) sign(repo string, d digest.Digest, method string, exp int64, gen int) string {
	m := hmac.New(sha256.New, o.key)
	fmt.Fprintf(m, "%s\n%s\n%s\n%d\n%d", repo, d, method, exp, gen)
	return hex.EncodeToString(m.Sum(nil))
}

// redirect answers a registry blob GET/HEAD: with the registry's own
// answer when that is not a success (auth challenge, unknown blob), else
// with 307 to a signed URL.
func (o *ObjectStore) redirect(w http.ResponseWriter, req *http.Request, repo string, d digest.Digest) {
	head := req.Clone(req.Context())
	head.Method = http.MethodHead
	head.Header.Del("Range")
	rec := httptest.NewRecorder()
	o.reg.app.ServeHTTP(rec, head)
	if rec.Code != http.StatusOK {
		o.reg.app.ServeHTTP(w, req)
		return
	}
	o.mu.Lock()
	exp, gen := time.Now().Add(o.ttl).UnixNano(), o.gen
	o.mu.Unlock()
	q := url.Values{
		"repo":    {repo},
		"method":  {req.Method},
		"expires": {strconv.FormatInt(exp, 10)},
		"gen":     {strconv.Itoa(gen)},
	}
	q.Set("sig", o.sign(repo, d, req.Method, exp, gen))
	u := url.URL{Scheme: "http", Host: o.addr, Path: "/blobs/" + d.String(), RawQuery: q.Encode()}
	http.Redirect(w, req, u.String(), http.StatusTemporaryRedirect)
}

func (o *ObjectStore) serve(w http.ResponseWriter, req *http.Request) {
	deny := func(code int, reason string) {
		w.Header().Set("Content-Type", "application/xml")
		w.WriteHeader(code)
		fmt.Fprintf(w, "<Error><Code>%s</Code><Message>%s</Message></Error>", reason, reason)
	}
	if req.Header.Get("Authorization") != "" {
		deny(http.StatusBadRequest, "InvalidArgument: only one auth mechanism allowed")
		return
	}
	name, _ := strings.CutPrefix(req.URL.Path, "/blobs/")
	d, err := digest.Parse(name)
	if err != nil {
		deny(http.StatusNotFound, "NoSuchKey")
		return
	}
	q := req.URL.Query()
	exp, _ := strconv.ParseInt(q.Get("expires"), 10, 64)
	gen, _ := strconv.Atoi(q.Get("gen"))
	if !hmac.Equal([]byte(q.Get("sig")), []byte(o.sign(q.Get("repo"), d, q.Get("method"), exp, gen))) || q.Get("method") != req.Method {
		deny(http.StatusForbidden, "SignatureDoesNotMatch")
		return
	}
	o.mu.Lock()
	current := o.gen
	o.mu.Unlock()
	if gen != current || time.Now().UnixNano() > exp {
		deny(http.StatusForbidden, "AccessDenied: Request has expired")
		return
	}
	key := q.Get("repo") + "@" + d.String()
	o.mu.Lock()
	data, ok := o.blobs[key]
	o.mu.Unlock()
	if !ok {
		if data, err = o.reg.blob(q.Get("repo"), d); err != nil {
			deny(http.StatusNotFound, "NoSuchKey")
			return
		}
		o.mu.Lock()
		o.blobs[key] = data
		o.mu.Unlock()
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, req, "", time.Time{}, bytes.NewReader(data))
}
