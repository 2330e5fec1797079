package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lazypull/lazypull/internal/fusemanager"
	"github.com/lazypull/lazypull/remote"
)

// noLayers is a fuse manager backend serving nothing.
type noLayers struct{}

func (noLayers) Mount(context.Context, string, map[string]string) error { return nil }
func (noLayers) Check(context.Context, string, map[string]string) error { return nil }
func (noLayers) Unmount(context.Context, string) error                  { return nil }
func (noLayers) LayerSize(string) (int64, bool)                         { return 0, false }
func (noLayers) Mountpoints() []string                                  { return nil }

func gauge(mfs []*dto.MetricFamily, name string) (float64, bool) {
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.Metric) == 1 {
			if g := mf.Metric[0].GetGauge(); g != nil {
				return g.GetValue(), true
			}
		}
	}
	return 0, false
}

// The daemon's /metrics carries the manager's metrics and whether it
// answered.
func TestManagerMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "lazypull_mounted_layers", Help: "test"})
	g.Set(3)
	reg.MustRegister(g)
	addr := filepath.Join(t.TempDir(), "m.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fusemanager.Serve(ctx, l, noLayers{}, fusemanager.ServerOptions{Metrics: reg}) }()
	defer func() { cancel(); <-done }()
	c, err := fusemanager.Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	daemon := prometheus.NewRegistry()
	gatherer := prometheus.Gatherers{daemon, managerMetrics{c}}
	mfs, err := gatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := gauge(mfs, "lazypull_mounted_layers"); !ok || v != 3 {
		t.Errorf("the manager's gauge: %v %v", v, ok)
	}
	if v, ok := gauge(mfs, "lazypull_fuse_manager_up"); !ok || v != 1 {
		t.Errorf("lazypull_fuse_manager_up with the manager answering: %v %v", v, ok)
	}
	cancel()
	<-done
	done <- nil
	mfs, err = gatherer.Gather()
	if err == nil {
		t.Error("no error with the manager gone")
	}
	if v, ok := gauge(mfs, "lazypull_fuse_manager_up"); !ok || v != 0 {
		t.Errorf("lazypull_fuse_manager_up with the manager gone: %v %v", v, ok)
	}
	if _, ok := gauge(mfs, "lazypull_mounted_layers"); ok {
		t.Error("the gone manager's metrics are still there")
	}
}

// The daemon's /debug/fetches serves the manager's fetch log; a manager
// that keeps none is a 404, a manager that is gone a 502.
func TestManagerFetches(t *testing.T) {
	get := func(h http.Handler) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/fetches", nil))
		return rec
	}
	start := func(opts fusemanager.ServerOptions) (*fusemanager.Client, func()) {
		addr := filepath.Join(t.TempDir(), "m.sock")
		l, err := net.Listen("unix", addr)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- fusemanager.Serve(ctx, l, noLayers{}, opts) }()
		stop := sync.OnceFunc(func() { cancel(); <-done })
		t.Cleanup(stop)
		c, err := fusemanager.Dial(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, stop
	}

	l := &fetchLog{}
	l.onFetch(remote.FetchEvent{Op: "range", Digest: digest.FromString("a"), Offset: 7, Length: 100, Bytes: 100, Attempt: 1})
	c, stop := start(fusemanager.ServerOptions{Fetches: l.JSON})
	rec := get(managerFetches{c})
	var got struct {
		Fetches []fetchRecord `json:"fetches"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); rec.Code != http.StatusOK || err != nil || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("GET /debug/fetches: %d %q, %v", rec.Code, rec.Body, err)
	}
	if len(got.Fetches) != 1 || got.Fetches[0].Offset != 7 || got.Fetches[0].Op != "range" {
		t.Fatalf("the manager's fetch log through the daemon: %+v", got.Fetches)
	}
	stop()
	if rec := get(managerFetches{c}); rec.Code != http.StatusBadGateway {
		t.Errorf("with the manager gone: %d %q, want 502", rec.Code, rec.Body)
	}

	none, _ := start(fusemanager.ServerOptions{})
	if rec := get(managerFetches{none}); rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), "[metrics]") {
		t.Errorf("a manager without a fetch log: %d %q, want 404 naming [metrics]", rec.Code, rec.Body)
	}
}
