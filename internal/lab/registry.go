package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem" // storage driver
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"   // storage driver
)

// RegistryConfig configures StartRegistry.
type RegistryConfig struct {
	// RootDir, if set, stores blobs on disk there (filesystem driver)
	// instead of in memory. Use it for images too big to keep in memory.
	RootDir string
}

// Registry is an OCI distribution registry served in-process over plain
// HTTP on 127.0.0.1. Its storage outlives Stop, so Start serves the same
// content again on the same port.
type Registry struct {
	app  *handlers.App
	host string // 127.0.0.1:port, fixed by the first listener

	mu       sync.Mutex
	srv      *http.Server
	served   chan struct{} // closed when srv.Serve returns
	requests []Request
}

// Request is one request the registry answered.
type Request struct {
	Method string
	Path   string
	Range  string // the Range header, if any
	Status int
	Bytes  int64 // body bytes written
}

// StartRegistry starts a registry on a free port of 127.0.0.1. The caller
// must Close it.
func StartRegistry(cfg RegistryConfig) (*Registry, error) {
	storage := configuration.Storage{
		"inmemory": configuration.Parameters{},
	}
	if cfg.RootDir != "" {
		storage = configuration.Storage{
			"filesystem": configuration.Parameters{"rootdirectory": cfg.RootDir},
		}
	}
	storage["delete"] = configuration.Parameters{"enabled": true}
	storage["maintenance"] = configuration.Parameters{
		"uploadpurging": map[any]any{"enabled": false},
	}
	storage["redirect"] = configuration.Parameters{"disable": true}
	config := &configuration.Configuration{Storage: storage}
	config.HTTP.Secret = "lazypull-lab"
	config.Log.AccessLog.Disabled = true
	r := &Registry{app: handlers.NewApp(context.Background(), config)}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		r.app.Shutdown()
		return nil, err
	}
	r.host = l.Addr().String()
	r.serve(l)
	return r, nil
}

// NewRegistry starts a registry for the test and closes it when the test
// ends.
func NewRegistry(t testing.TB) *Registry {
	t.Helper()
	r, err := StartRegistry(RegistryConfig{})
	if err != nil {
		t.Fatalf("start registry: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			var b strings.Builder
			reqs := r.Requests()
			if len(reqs) > 200 {
				fmt.Fprintf(&b, "(%d earlier requests left out)\n", len(reqs)-200)
				reqs = reqs[len(reqs)-200:]
			}
			for _, req := range reqs {
				fmt.Fprintf(&b, "%s %s range=%q -> %d (%d bytes)\n", req.Method, req.Path, req.Range, req.Status, req.Bytes)
			}
			t.Logf("==== registry %s requests ====\n%s==== end of registry requests ====", r.host, b.String())
		}
		r.Close()
	})
	return r
}

func (r *Registry) serve(l net.Listener) {
	srv := &http.Server{Handler: http.HandlerFunc(r.handle), ReadHeaderTimeout: 30 * time.Second}
	served := make(chan struct{})
	r.srv, r.served = srv, served
	go func() {
		defer close(served)
		srv.Serve(l)
	}()
}

func (r *Registry) handle(w http.ResponseWriter, req *http.Request) {
	rec := &recordingWriter{ResponseWriter: w, status: http.StatusOK}
	r.app.ServeHTTP(rec, req)
	r.mu.Lock()
	r.requests = append(r.requests, Request{
		Method: req.Method,
		Path:   req.URL.Path,
		Range:  req.Header.Get("Range"),
		Status: rec.status,
		Bytes:  rec.n,
	})
	r.mu.Unlock()
}

type recordingWriter struct {
	http.ResponseWriter
	status int
	n      int64
}

func (w *recordingWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	return n, err
}

func (w *recordingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Host is the registry's host:port, e.g. "127.0.0.1:40123".
func (r *Registry) Host() string { return r.host }

// URL is the registry's base URL, e.g. "http://127.0.0.1:40123".
func (r *Registry) URL() string { return "http://" + r.host }

// Ref names an image in the registry: Ref("app:v1") is
// "127.0.0.1:40123/app:v1".
func (r *Registry) Ref(nameTag string) string { return r.host + "/" + nameTag }

// Stop closes the listener and every open connection: later requests fail
// with connection refused until Start.
func (r *Registry) Stop() error {
	r.mu.Lock()
	srv, served := r.srv, r.served
	r.srv, r.served = nil, nil
	r.mu.Unlock()
	if srv == nil {
		return nil
	}
	err := srv.Close()
	<-served
	return err
}

// Start serves again on the same port after Stop.
func (r *Registry) Start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.srv != nil {
		return errors.New("registry is already serving")
	}
	var l net.Listener
	var err error
	// The port was ours a moment ago; retry briefly if the kernel still
	// holds it.
	for i := 0; i < 50; i++ {
		if l, err = net.Listen("tcp", r.host); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("listen again on %s: %w", r.host, err)
	}
	r.serve(l)
	return nil
}

// Close stops serving and releases the storage.
func (r *Registry) Close() error {
	err := r.Stop()
	return errors.Join(err, r.app.Shutdown())
}

// Requests returns the requests answered so far, oldest first.
func (r *Registry) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.requests...)
}

// ResetRequests forgets the recorded requests.
func (r *Registry) ResetRequests() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests = nil
}

// BlobRequests returns the recorded GET requests for blobs.
func (r *Registry) BlobRequests() []Request {
	var out []Request
	for _, req := range r.Requests() {
		if req.Method == http.MethodGet && strings.Contains(req.Path, "/blobs/sha256:") {
			out = append(out, req)
		}
	}
	return out
}

// WriteHostsDir writes a containerd hosts.toml directory (certs.d layout)
// under dir that reaches this registry over plain HTTP, and returns dir.
func (r *Registry) WriteHostsDir(dir string) (string, error) {
	d := filepath.Join(dir, r.host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return "", err
	}
	toml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  skip_verify = true\n",
		r.URL(), r.URL())
	return dir, os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(toml), 0o644)
}
