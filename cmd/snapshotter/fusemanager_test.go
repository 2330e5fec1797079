package main

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lazypull/lazypull/internal/fusemanager"
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
