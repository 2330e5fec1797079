package service

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// SweepLayers removes the saved metadata of layers that no snapshot of sn
// uses any more (see fs.Manager.SweepLayers). The daemon runs it at start,
// and the snapshotter after every removal of a remote snapshot
// (snapshot.LayerSweeper). A layer being mounted or preloaded is kept; one
// whose snapshot is still in the making may lose its saved TOC, which is
// then read from the registry again.
func (l *LayerFS) SweepLayers(ctx context.Context, sn snapshots.Snapshotter) error {
	used := map[digest.Digest]bool{}
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if src, err := SourceFromLabels(info.Labels); err == nil {
			used[src.Digest] = true
		}
		return nil
	}); err != nil {
		return fmt.Errorf("listing snapshots to sweep saved layers: %w", err)
	}
	n, err := l.mgr.SweepLayers(func(d digest.Digest) bool { return used[d] })
	if n > 0 {
		log.G(ctx).WithField("removed", n).Info("removed the saved metadata of layers no snapshot uses")
	}
	return err
}
