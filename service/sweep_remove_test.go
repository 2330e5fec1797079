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

// Removing a remote snapshot sweeps the saved TOC of its layer at once
// (not only at the next daemon start), and keeps that of a layer another
// snapshot still uses.
func TestRemoveSweepsSavedLayer(t *testing.T) {
	requireRoot(t)
	reg := remotetest.NewRegistry(t)
	a := honestLayer(t, map[string]string{"bin/x": "a"})
	b := honestLayer(t, map[string]string{"bin/x": "b"})
	reg.PushBlob(t, "a", a.blob)
	reg.PushBlob(t, "b", b.blob)
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

	saved := func(l testLayer) string {
		d := digest.FromBytes(l.blob)
		return filepath.Join(root, "svc", "layers", d.Algorithm().String()+"-"+d.Encoded())
	}
	for i, l := range []testLayer{a, b} {
		repo := []string{"a", "b"}[i]
		_, err := sn.Prepare(ctx, "extract-"+repo, "", snapshots.WithLabels(layerLabels(reg.Ref(repo, "latest"), l, l.diffID.String(), "")))
		if !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("remote Prepare of %s: %v, want already exists", repo, err)
		}
		if _, err := os.Stat(saved(l)); err != nil {
			t.Fatalf("layer %s not saved: %v", repo, err)
		}
	}
	if err := sn.Remove(ctx, a.diffID.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(saved(a)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("saved layer of the removed snapshot kept: %v", err)
	}
	if _, err := os.Stat(saved(b)); err != nil {
		t.Fatalf("saved layer of a snapshot in use swept: %v", err)
	}
}
