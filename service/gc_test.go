package service

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/remote/remotetest"
	"github.com/lazypull/lazypull/snapshot"
)

// The sweep keeps the saved TOC of a layer a remote snapshot uses, and
// removes it once the snapshot is gone.
func TestSweepLayersFollowsSnapshots(t *testing.T) {
	requireRoot(t)
	reg := remotetest.NewRegistry(t)
	l := honestLayer(t, map[string]string{"bin/x": "x"})
	reg.PushBlob(t, "app", l.blob)
	root := t.TempDir()
	svc, err := New(context.Background(), Options{Root: filepath.Join(root, "svc")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	ctx := context.Background()
	sn, err := snapshot.New(ctx, snapshot.Options{Root: filepath.Join(root, "sn"), LayerFS: svc.LayerFS()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })

	chain := l.diffID.String()
	_, err = sn.Prepare(ctx, "extract-1", "", snapshots.WithLabels(layerLabels(reg.Ref("app", "latest"), l, chain, "")))
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("remote Prepare: %v, want already exists", err)
	}
	d := digest.FromBytes(l.blob)
	saved := filepath.Join(root, "svc", "layers", d.Algorithm().String()+"-"+d.Encoded())
	if err := svc.LayerFS().SweepLayers(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(saved); err != nil {
		t.Fatalf("saved layer of a snapshot in use swept: %v", err)
	}
	if err := sn.Remove(ctx, chain); err != nil {
		t.Fatal(err)
	}
	if err := svc.LayerFS().SweepLayers(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(saved); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("saved layer of a removed snapshot kept: %v", err)
	}
}
