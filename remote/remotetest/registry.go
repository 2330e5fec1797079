// Package remotetest runs a real OCI registry (distribution's, with
// in-memory storage) inside the test process, for tests of code that talks
// to registries.
//
//	reg := remotetest.NewRegistry(t)
//	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: layerBytes})
//	// img.Ref is "127.0.0.1:<port>/app:v1"
//
// The registry listens on 127.0.0.1 (plain HTTP unless [WithTLS]) and can
// require basic auth ([WithBasicAuth], htpasswd) or bearer tokens
// ([WithTokenAuth], the registry's own JWT token auth, with a token server
// served at /token). Helpers push content through the registry's handler
// directly, bypassing faults and auth.
//
// Faults ([Fault], [Registry.Inject]) sit in front of the real registry
// and can be changed at run time: error bursts, 429 with Retry-After,
// delays, throughput caps, truncated or corrupted bodies, dropped
// connections, servers that ignore Range or answer multipart/byteranges.
// [Registry.RedirectBlobs] redirects blob reads to a second "object
// storage" server with expiring signed URLs, and [Registry.Stop] makes the
// registry disappear (listener and connections closed).
//
// The registry logs every request through logrus' standard logger, which
// containerd/log shares; the first NewRegistry lowers that logger from
// info to warn, unless REMOTETEST_LOG names a level (e.g. "debug").
package remotetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	clog "github.com/containerd/log"
	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/crypto/bcrypt"

	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/auth/token"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
)

// Option configures a Registry.
type Option func(*config)

type config struct {
	auth          string // "", "htpasswd", "token"
	user, pass    string
	anonymousPull bool
	tokenTTL      time.Duration
	tls           bool
}

// WithBasicAuth makes the registry require HTTP basic auth (the registry's
// htpasswd auth) with this user.
func WithBasicAuth(user, password string) Option {
	return func(c *config) { c.auth, c.user, c.pass = "htpasswd", user, password }
}

// WithTokenAuth makes the registry require bearer tokens (the registry's
// token auth, JWTs signed by a test key) from the token server at
// URL()+"/token". The user gets every action it asks for; anonymous
// clients get tokens with pull access if anonymousPull, and tokens with no
// access otherwise. Tokens say they expire after ttl (0 means 5 minutes);
// note the registry itself accepts tokens up to a minute after expiry.
func WithTokenAuth(user, password string, anonymousPull bool, ttl time.Duration) Option {
	return func(c *config) {
		c.auth, c.user, c.pass, c.anonymousPull, c.tokenTTL = "token", user, password, anonymousPull, ttl
	}
}

// WithTLS serves HTTPS (HTTP/2 enabled) with a certificate for 127.0.0.1
// signed by a test CA; see [Registry.CACertPEM].
func WithTLS() Option {
	return func(c *config) { c.tls = true }
}

// Registry is an in-process distribution registry. Its methods are safe
// for concurrent use.
type Registry struct {
	cfg     config
	app     *handlers.App
	addr    string
	scheme  string
	tlsConf *tls.Config
	caPEM   []byte

	tokenKey  *ecdsa.PrivateKey
	tokenCert []byte // DER

	mu        sync.Mutex
	srv       *http.Server
	faults    []*faultRule
	requests  []Request
	reqGen    int // bumped by ResetRequests
	store     *ObjectStore
	oldStores []*ObjectStore
	closed    bool
}

var quietOnce sync.Once

// NewRegistry starts a registry and registers its shutdown with t.Cleanup.
func NewRegistry(t testing.TB, opts ...Option) *Registry {
	t.Helper()
	quietOnce.Do(func() {
		if lvl := os.Getenv("REMOTETEST_LOG"); lvl != "" {
			_ = clog.SetLevel(lvl)
		} else if clog.GetLevel() == clog.InfoLevel {
			_ = clog.SetLevel("warn")
		}
	})
	r := &Registry{scheme: "http"}
	for _, o := range opts {
		o(&r.cfg)
	}
	if r.cfg.tokenTTL <= 0 {
		r.cfg.tokenTTL = 5 * time.Minute
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("remotetest: listen: %v", err)
	}
	r.addr = ln.Addr().String()
	dir := t.TempDir()

	cfg := &configuration.Configuration{
		Storage: configuration.Storage{
			"inmemory":    configuration.Parameters{},
			"delete":      configuration.Parameters{"enabled": true},
			"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		},
	}
	cfg.HTTP.Secret = "remotetest-secret"
	cfg.HTTP.Host = r.scheme + "://" + r.addr
	switch r.cfg.auth {
	case "htpasswd":
		hash, err := bcrypt.GenerateFromPassword([]byte(r.cfg.pass), bcrypt.MinCost)
		if err != nil {
			t.Fatalf("remotetest: bcrypt: %v", err)
		}
		path := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(path, []byte(r.cfg.user+":"+string(hash)+"\n"), 0o600); err != nil {
			t.Fatalf("remotetest: %v", err)
		}
		cfg.Auth = configuration.Auth{"htpasswd": configuration.Parameters{"realm": "remotetest", "path": path}}
	case "token":
		key, certDER, certPEM := newCert(t, "remotetest token signer", nil, nil)
		r.tokenKey, r.tokenCert = key, certDER
		bundle := filepath.Join(dir, "token-ca.pem")
		if err := os.WriteFile(bundle, certPEM, 0o600); err != nil {
			t.Fatalf("remotetest: %v", err)
		}
		cfg.Auth = configuration.Auth{"token": configuration.Parameters{
			"realm":          "", // set below, once the scheme is known
			"service":        tokenService,
			"issuer":         tokenIssuer,
			"rootcertbundle": bundle,
		}}
	}
	if r.cfg.tls {
		r.scheme = "https"
		cfg.HTTP.Host = r.scheme + "://" + r.addr
		caKey, caDER, caPEM := newCert(t, "remotetest CA", nil, nil)
		ca, _ := x509.ParseCertificate(caDER)
		leafKey, leafDER, _ := newCert(t, "127.0.0.1", ca, caKey)
		r.caPEM = caPEM
		r.tlsConf = &tls.Config{
			Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}},
			NextProtos:   []string{"h2", "http/1.1"},
		}
	}
	if r.cfg.auth == "token" {
		cfg.Auth["token"]["realm"] = r.URL() + "/token"
	}

	r.app = handlers.NewApp(context.Background(), cfg)
	r.serve(ln)
	t.Cleanup(r.Close)
	return r
}

func (r *Registry) serve(ln net.Listener) {
	srv := &http.Server{
		Handler:           r.middleware("registry", http.HandlerFunc(r.front)),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          quietLogger(),
	}
	r.mu.Lock()
	r.srv = srv
	r.mu.Unlock()
	if r.tlsConf != nil {
		srv.TLSConfig = r.tlsConf.Clone()
		go srv.ServeTLS(ln, "", "")
		return
	}
	go srv.Serve(ln)
}

// front routes the token endpoint and blob redirects; the rest goes to
// the registry.
func (r *Registry) front(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path == "/token" && r.cfg.auth == "token" {
		r.serveToken(w, req)
		return
	}
	r.mu.Lock()
	store := r.store
	r.mu.Unlock()
	if store != nil && (req.Method == http.MethodGet || req.Method == http.MethodHead) {
		if repo, dgst, ok := parseBlobPath(req.URL.Path); ok {
			store.redirect(w, req, repo, dgst)
			return
		}
	}
	r.app.ServeHTTP(w, req)
}

// Host is the registry's host:port, e.g. "127.0.0.1:41234".
func (r *Registry) Host() string { return r.addr }

// URL is the registry's base URL, e.g. "http://127.0.0.1:41234".
func (r *Registry) URL() string { return r.scheme + "://" + r.addr }

// Ref joins the registry host, a repository and a tag ("v1") or digest
// ("sha256:...") into a reference.
func (r *Registry) Ref(repo, tagOrDigest string) string {
	if strings.Contains(tagOrDigest, ":") {
		return r.addr + "/" + repo + "@" + tagOrDigest
	}
	return r.addr + "/" + repo + ":" + tagOrDigest
}

// CACertPEM is the PEM certificate of the CA that signed the registry's
// TLS certificate ([WithTLS]); nil without TLS.
func (r *Registry) CACertPEM() []byte { return r.caPEM }

// Stop makes the registry disappear: the listener and every open
// connection are closed at once. Content is kept; see Start.
func (r *Registry) Stop() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// Start brings a stopped registry back on the same address.
func (r *Registry) Start(t testing.TB) {
	t.Helper()
	r.mu.Lock()
	running := r.srv != nil
	r.mu.Unlock()
	if running {
		return
	}
	var (
		ln  net.Listener
		err error
	)
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", r.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("remotetest: listen again on %s: %v", r.addr, err)
	}
	r.serve(ln)
}

// Close stops the registry and its object store for good.
func (r *Registry) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	stores := append([]*ObjectStore{r.store}, r.oldStores...)
	r.mu.Unlock()
	r.Stop()
	for _, s := range stores {
		if s != nil {
			s.close()
		}
	}
	_ = r.app.Shutdown()
}

// Layer is a layer for [Registry.PushImage].
type Layer struct {
	Data        []byte
	MediaType   string            // default ocispec.MediaTypeImageLayerGzip
	Annotations map[string]string // e.g. the eStargz TOC digest
	DiffID      digest.Digest     // for the config's rootfs; default the digest of Data
}

// Image is what [Registry.PushImage] pushed.
type Image struct {
	Ref          string // host/repo:tag, or host/repo@digest when pushed without a tag
	Manifest     ocispec.Manifest
	ManifestDesc ocispec.Descriptor // with Platform set
	ManifestRaw  []byte
	Config       ocispec.Image
	ConfigDesc   ocispec.Descriptor
	Layers       []ocispec.Descriptor
}

// PushImage pushes a linux/GOARCH image made of layers: the layer blobs, a
// config and an OCI manifest, tagged tag ("" pushes by digest only).
func (r *Registry) PushImage(t testing.TB, repo, tag string, layers ...Layer) Image {
	t.Helper()
	return r.PushPlatformImage(t, repo, tag, ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}, layers...)
}

// PushPlatformImage is PushImage for another platform. Pass the returned
// ManifestDesc values to [Registry.PushIndex] for a multi-platform image.
func (r *Registry) PushPlatformImage(t testing.TB, repo, tag string, p ocispec.Platform, layers ...Layer) Image {
	t.Helper()
	img := Image{}
	img.Config = ocispec.Image{Platform: p, RootFS: ocispec.RootFS{Type: "layers"}}
	img.Config.Config.Cmd = []string{"/bin/sh"}
	for _, l := range layers {
		d := r.PushBlob(t, repo, l.Data)
		d.MediaType = l.MediaType
		if d.MediaType == "" {
			d.MediaType = ocispec.MediaTypeImageLayerGzip
		}
		d.Annotations = l.Annotations
		img.Layers = append(img.Layers, d)
		diffID := l.DiffID
		if diffID == "" {
			diffID = d.Digest
		}
		img.Config.RootFS.DiffIDs = append(img.Config.RootFS.DiffIDs, diffID)
	}
	cfg, err := json.Marshal(img.Config)
	if err != nil {
		t.Fatalf("remotetest: %v", err)
	}
	img.ConfigDesc = r.PushBlob(t, repo, cfg)
	img.ConfigDesc.MediaType = ocispec.MediaTypeImageConfig
	img.Manifest = ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    img.ConfigDesc,
		Layers:    img.Layers,
	}
	if img.Manifest.Layers == nil {
		img.Manifest.Layers = []ocispec.Descriptor{}
	}
	img.ManifestRaw, err = json.Marshal(img.Manifest)
	if err != nil {
		t.Fatalf("remotetest: %v", err)
	}
	img.ManifestDesc = r.PushManifest(t, repo, tag, img.ManifestRaw)
	img.ManifestDesc.Platform = &p
	img.Ref = r.Ref(repo, tag)
	if tag == "" {
		img.Ref = r.Ref(repo, img.ManifestDesc.Digest.String())
	}
	return img
}

// PushIndex pushes an OCI index of manifests (which must be in repo
// already), tagged tag ("" pushes by digest only).
func (r *Registry) PushIndex(t testing.TB, repo, tag string, manifests ...ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: manifests}
	raw, err := json.Marshal(idx)
	if err != nil {
		t.Fatalf("remotetest: %v", err)
	}
	return r.PushManifest(t, repo, tag, raw)
}

// PushBlob uploads data to repo and returns its descriptor (media type
// application/octet-stream; set your own on the copy).
func (r *Registry) PushBlob(t testing.TB, repo string, data []byte) ocispec.Descriptor {
	t.Helper()
	desc := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromBytes(data), Size: int64(len(data))}
	rec := r.internal(repo, http.MethodPost, "/v2/"+repo+"/blobs/uploads/", nil, nil)
	if rec.Code != http.StatusAccepted {
		t.Fatalf("remotetest: start upload to %s: %d %s", repo, rec.Code, rec.Body)
	}
	loc, err := url.Parse(rec.Header().Get("Location"))
	if err != nil {
		t.Fatalf("remotetest: upload location: %v", err)
	}
	q := loc.Query()
	q.Set("digest", desc.Digest.String())
	rec = r.internal(repo, http.MethodPut, loc.Path+"?"+q.Encode(), http.Header{"Content-Type": {"application/octet-stream"}}, data)
	if rec.Code != http.StatusCreated {
		t.Fatalf("remotetest: push blob to %s: %d %s", repo, rec.Code, rec.Body)
	}
	return desc
}

// PushManifest pushes a manifest or index, given as raw JSON ([]byte) or
// as a value to marshal (ocispec.Manifest, ocispec.Index...), under tag
// ("" pushes by digest only). The media type is taken from the document's
// mediaType field.
func (r *Registry) PushManifest(t testing.TB, repo, tag string, manifest any) ocispec.Descriptor {
	t.Helper()
	raw, ok := manifest.([]byte)
	if !ok {
		var err error
		if raw, err = json.Marshal(manifest); err != nil {
			t.Fatalf("remotetest: marshal manifest: %v", err)
		}
	}
	var probe struct {
		MediaType string `json:"mediaType"`
	}
	if err := json.Unmarshal(raw, &probe); err != nil || probe.MediaType == "" {
		t.Fatalf("remotetest: manifest without a mediaType field (%v)", err)
	}
	desc := ocispec.Descriptor{MediaType: probe.MediaType, Digest: digest.FromBytes(raw), Size: int64(len(raw))}
	ref := tag
	if ref == "" {
		ref = desc.Digest.String()
	}
	rec := r.internal(repo, http.MethodPut, "/v2/"+repo+"/manifests/"+ref, http.Header{"Content-Type": {desc.MediaType}}, raw)
	if rec.Code != http.StatusCreated {
		t.Fatalf("remotetest: push manifest %s:%s: %d %s", repo, ref, rec.Code, rec.Body)
	}
	return desc
}

// Blob returns a blob's content, read through the registry's handler.
func (r *Registry) Blob(t testing.TB, repo string, d digest.Digest) []byte {
	t.Helper()
	b, err := r.blob(repo, d)
	if err != nil {
		t.Fatalf("remotetest: %v", err)
	}
	return b
}

func (r *Registry) blob(repo string, d digest.Digest) ([]byte, error) {
	rec := r.internal(repo, http.MethodGet, "/v2/"+repo+"/blobs/"+d.String(), nil, nil)
	if rec.Code != http.StatusOK {
		return nil, fmt.Errorf("get blob %s from %s: %d %s", d, repo, rec.Code, rec.Body)
	}
	return rec.Body.Bytes(), nil
}

// internal serves a request with the registry's handler in-process, with
// full access, bypassing faults.
func (r *Registry) internal(repo, method, target string, h http.Header, body []byte) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, target, bytes.NewReader(body))
	req.Host = r.addr
	req.ContentLength = int64(len(body))
	for k, v := range h {
		req.Header[k] = v
	}
	switch r.cfg.auth {
	case "htpasswd":
		req.SetBasicAuth(r.cfg.user, r.cfg.pass)
	case "token":
		tok, err := r.signToken("remotetest-admin", []access{{Type: "repository", Name: repo, Actions: []string{"pull", "push", "delete"}}}, time.Minute)
		if err == nil {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
	}
	rec := httptest.NewRecorder()
	r.app.ServeHTTP(rec, req)
	return rec
}

// newCert makes an ECDSA key and a certificate: self-signed CA when parent
// is nil, else a 127.0.0.1 server certificate signed by parent.
func newCert(t testing.TB, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("remotetest: key: %v", err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	signer, signerKey := tmpl, key
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	} else {
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		signer, signerKey = parent, parentKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatalf("remotetest: certificate: %v", err)
	}
	return key, der, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// parseBlobPath matches /v2/<repo>/blobs/<digest>.
func parseBlobPath(p string) (repo string, d digest.Digest, ok bool) {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return "", "", false
	}
	i := strings.LastIndex(rest, "/blobs/")
	if i <= 0 {
		return "", "", false
	}
	d, err := digest.Parse(rest[i+len("/blobs/"):])
	if err != nil {
		return "", "", false
	}
	return rest[:i], d, true
}

func quietLogger() *log.Logger { return log.New(io.Discard, "", 0) }
