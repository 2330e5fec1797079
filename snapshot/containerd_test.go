package snapshot

import (
	"net"
	"path/filepath"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestRemoteThroughContainerd drives remote snapshots the way containerd
// does: through its metadata snapshotter (namespaced keys, the target
// check, the Walk for the committed target) and the proxy plugin's gRPC
// client, to the snapshotter served over a unix socket.
func TestRemoteThroughContainerd(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	tmp := t.TempDir()
	lfs := newFakeLayerFS()
	lfs.addLayer(t, digest1, map[string]string{"etc/one": "1"})
	lfs.addLayer(t, digest2, map[string]string{"bin/two": "2"})
	sn := newTestSnapshotter(t, ctx, filepath.Join(tmp, "root"), lfs)

	sock := filepath.Join(tmp, "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	backend := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazypull")

	bdb, err := bolt.Open(filepath.Join(tmp, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdb.Close() })
	cs, err := local.NewStore(filepath.Join(tmp, "content"))
	if err != nil {
		t.Fatal(err)
	}
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{"lazypull": backend})
	if err := db.Init(ctx); err != nil {
		t.Fatal(err)
	}
	csn := db.Snapshotter("lazypull")

	// What the unpacker does for each layer.
	unpack := func(ns, chain, parent, digest string) {
		t.Helper()
		ctx := namespaces.WithNamespace(ctx, ns)
		key := "extract-" + ns + " " + chain
		_, err := csn.Prepare(ctx, key, parent, snapshots.WithLabels(layerLabels(chain, digest)))
		if !errdefs.IsAlreadyExists(err) {
			t.Fatalf("[%s] Prepare %s: want ErrAlreadyExists, got %v", ns, chain, err)
		}
		info, err := csn.Stat(ctx, chain)
		if err != nil {
			t.Fatalf("[%s] Stat %s: %v", ns, chain, err)
		}
		if info.Kind != snapshots.KindCommitted || info.Parent != parent || info.Labels[LabelRemote] != "true" {
			t.Fatalf("[%s] unexpected info %+v", ns, info)
		}
	}
	unpack("default", chain1, "", digest1)
	unpack("default", chain2, chain1, digest2)
	// Another namespace shares the remote snapshots.
	unpack("k8s.io", chain1, "", digest1)
	unpack("k8s.io", chain2, chain1, digest2)
	if mc, _, _ := lfs.counts(); mc != 2 {
		t.Fatalf("LayerFS.Mount called %d times, want 2", mc)
	}

	nsctx := namespaces.WithNamespace(ctx, "k8s.io")
	m, err := csn.Prepare(nsctx, "container", chain2)
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := mountAt(t, m)
	if readFile(t, filepath.Join(dir, "etc/one")) != "1" || readFile(t, filepath.Join(dir, "bin/two")) != "2" {
		t.Fatal("container rootfs does not show the remote layers")
	}
}
