package service

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazypull/lazypull/snapshot"
)

func TestSourceFromLabels(t *testing.T) {
	layer := digest.FromString("layer")
	toc := digest.FromString("toc")
	src, err := SourceFromLabels(map[string]string{
		snapshot.LabelCRIImageRef:    "registry.example/app:v1",
		snapshot.LabelCRILayerDigest: layer.String(),
		snapshot.LabelTOCDigest:      toc.String(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if src.Ref != "registry.example/app:v1" || src.Digest != layer || src.TOCDigest != toc {
		t.Fatalf("SourceFromLabels = %+v", src)
	}

	for name, labels := range map[string]map[string]string{
		"no labels":     {},
		"no layer":      {snapshot.LabelCRIImageRef: "r/a:1"},
		"no image":      {snapshot.LabelCRILayerDigest: layer.String()},
		"bad digest":    {snapshot.LabelCRIImageRef: "r/a:1", snapshot.LabelCRILayerDigest: "sha256:xyz"},
		"bad toc label": {snapshot.LabelCRIImageRef: "r/a:1", snapshot.LabelCRILayerDigest: layer.String(), snapshot.LabelTOCDigest: "md5:1"},
	} {
		if _, err := SourceFromLabels(labels); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: got %v, want an invalid-argument error", name, err)
		}
	}
}

func TestNew(t *testing.T) {
	ctx := context.Background()
	if _, err := New(ctx, Options{}); err == nil || !strings.Contains(err.Error(), "Root") {
		t.Fatalf("New without a root: got %v", err)
	}
	bad := DefaultConfig()
	bad.Fetch.Retries = -1
	if _, err := New(ctx, Options{Root: t.TempDir(), Config: bad}); err == nil || !strings.Contains(err.Error(), "fetch.retries") {
		t.Fatalf("New with a bad config: got %v", err)
	}

	root := t.TempDir()
	reg := prometheus.NewRegistry()
	svc, err := New(ctx, Options{Root: root, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	if svc.Store == nil || svc.Registry == nil || svc.Manager == nil || svc.LayerFS() == nil {
		t.Fatalf("New left parts unset: %+v", svc)
	}
	if err := svc.Close(); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	// Vectors without samples are not gathered; the gauges always are.
	for _, want := range []string{"lazypull_mounted_layers", "lazypull_cache_disk_bytes"} {
		if !names[want] {
			t.Errorf("metric %s not registered (have %v)", want, names)
		}
	}
	if fi, err := os.Stat(filepath.Join(root, "cache")); err != nil || !fi.IsDir() {
		t.Fatalf("the chunk cache is not under the root: %v", err)
	}
}

func TestNewKubernetesCredentials(t *testing.T) {
	ctx := context.Background()
	cfg := DefaultConfig()
	cfg.CredentialProviders.Config = filepath.Join(t.TempDir(), "missing.yaml")
	cfg.CredentialProviders.BinDir = t.TempDir()
	if _, err := New(ctx, Options{Root: t.TempDir(), Config: cfg}); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Fatalf("New with a missing credential provider config: %v", err)
	}

	cfg = DefaultConfig()
	cfg.CRI.Enable = true
	svc, err := New(ctx, Options{Root: t.TempDir(), Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	if svc.Captured == nil {
		t.Fatal("no credential store for the CRI proxy")
	}
	kc, err := svc.keychain(ctx, svc.Captured)
	if err != nil || kc == nil {
		t.Fatalf("keychain with [cri] enabled: %v %v", kc, err)
	}
	plain := DefaultConfig()
	s2 := &Service{Config: plain}
	if kc, err := s2.keychain(ctx, nil); err != nil || kc != nil {
		t.Fatalf("keychain without [cri] or plugins: %v %v", kc, err)
	}
}
