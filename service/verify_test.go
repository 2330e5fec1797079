package service

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/forge"
	"github.com/lazypull/lazypull/remote/remotetest"
	"github.com/lazypull/lazypull/snapshot"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts FUSE file systems: run it as root (make test does)")
	}
}

// testLayer is an eStargz blob and what an image says of it.
type testLayer struct {
	blob   []byte
	toc    digest.Digest
	diffID digest.Digest // of the tar the blob really holds
}

func tarOf(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, name := range []string{"bin/x", "zz/y"} {
		data, ok := files[name]
		if !ok {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: int64(len(data)), ModTime: time.Unix(1700000000, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func honestLayer(t *testing.T, files map[string]string) testLayer {
	t.Helper()
	var out bytes.Buffer
	res, err := estargz.Build(context.Background(), &out, bytes.NewReader(tarOf(t, files)), estargz.BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return testLayer{blob: out.Bytes(), toc: res.TOCDigest, diffID: res.DiffID}
}

// forgedLayer is the attack of issue 9: its tar holds bin/x = "good" (so
// its DiffID is an honest image's), while its TOC points bin/x at the
// member of zz/y = "evil". Every chunk digest matches what is served.
func forgedLayer(t *testing.T) testLayer {
	t.Helper()
	honest := honestLayer(t, map[string]string{"bin/x": "good", "zz/y": "evil"})
	blob, toc, err := forge.ServeOtherFile(honest.blob, "bin/x", "zz/y")
	if err != nil {
		t.Fatal(err)
	}
	return testLayer{blob: blob, toc: toc, diffID: honest.diffID}
}

type failure struct {
	mountpoint string
	err        error
}

func newVerifyingService(t *testing.T) (*Service, *prometheus.Registry, chan failure) {
	t.Helper()
	reg := prometheus.NewRegistry()
	svc, err := New(context.Background(), Options{Root: t.TempDir(), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := svc.Close(); err != nil {
			t.Error(err)
		}
	})
	svc.verifier.quiet, svc.verifier.maxWait = 10*time.Millisecond, 100*time.Millisecond
	svc.verifier.yieldQuiet, svc.verifier.maxPause = 10*time.Millisecond, 100*time.Millisecond
	failed := make(chan failure, 4)
	svc.OnLayerFailed(func(_ context.Context, mp string, err error) { failed <- failure{mp, err} })
	return svc, reg, failed
}

func layerLabels(ref string, l testLayer, chain, parent string) map[string]string {
	return map[string]string{
		snapshot.LabelCRIImageRef:    ref,
		snapshot.LabelCRILayerDigest: digest.FromBytes(l.blob).String(),
		snapshot.LabelTOCDigest:      l.toc.String(),
		snapshots.LabelSnapshotRef:   chain,
		snapshot.LabelParentChainID:  parent,
	}
}

func readX(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "bin/x"))
	return string(b), err
}

// A layer whose TOC serves other files than its tar is failed closed once
// its verification ends: reads fail, the snapshotter is told, the failure
// is saved and counted, and the layer is never mounted lazily again.
func TestVerifyFailsForgedLayerClosed(t *testing.T) {
	requireRoot(t)
	reg := remotetest.NewRegistry(t)
	forged := forgedLayer(t)
	reg.PushBlob(t, "evil", forged.blob)
	svc, metricsReg, failed := newVerifyingService(t)
	lfs := svc.LayerFS()
	// containerd commits the layer under the chain of the honest DiffID.
	labels := layerLabels(reg.Ref("evil", "latest"), forged, forged.diffID.String(), "")
	mp := filepath.Join(t.TempDir(), "mnt")
	start := time.Now()
	if err := lfs.Mount(context.Background(), mp, labels); err != nil {
		t.Fatal(err)
	}
	defer lfs.Unmount(context.Background(), mp)

	var f failure
	select {
	case f = <-failed:
	case <-time.After(30 * time.Second):
		t.Fatal("the forged layer was not failed within 30 s")
	}
	t.Logf("forged layer failed %v after its mount: %v", time.Since(start).Round(time.Millisecond), f.err)
	if f.mountpoint != mp || !errors.Is(f.err, estargz.ErrLayerMismatch) || !strings.Contains(f.err.Error(), "bin/x") {
		t.Fatalf("failure %+v: want the mountpoint and a mismatch naming bin/x", f)
	}
	if got, err := readX(mp); err == nil {
		t.Fatalf("bin/x of the failed layer still reads %q", got)
	}
	if err := lfs.Check(context.Background(), mp, labels); err == nil {
		t.Error("Check of a failed layer reports it healthy")
	}
	if n := counterValue(t, metricsReg, "lazypull_layer_verifications_total", "failed"); n != 1 {
		t.Errorf("lazypull_layer_verifications_total{result=failed} = %v, want 1", n)
	}
	// Saved: the layer is refused, now and after a restart.
	if err := lfs.Unmount(context.Background(), mp); err != nil {
		t.Fatal(err)
	}
	err := lfs.Mount(context.Background(), mp, labels)
	if !errdefs.IsDataLoss(err) || !strings.Contains(err.Error(), "failed verification") {
		t.Fatalf("mounting a failed layer again: got %v, want a data-loss error", err)
	}
}

// Honest layers verify clean, and the saved result spares a second
// verification; a chain ID that the blob's DiffID does not give fails.
func TestVerifyHonestLayerAndChain(t *testing.T) {
	requireRoot(t)
	reg := remotetest.NewRegistry(t)
	base := honestLayer(t, map[string]string{"bin/x": "base"})
	top := honestLayer(t, map[string]string{"zz/y": "top"})
	reg.PushBlob(t, "app", base.blob)
	reg.PushBlob(t, "app", top.blob)
	svc, _, failed := newVerifyingService(t)
	lfs := svc.LayerFS()
	ref := reg.Ref("app", "latest")
	baseChain := base.diffID.String()
	topChain := ChainID(baseChain, top.diffID).String()
	dir := t.TempDir()

	var wg sync.WaitGroup
	for i, c := range []struct {
		l             testLayer
		chain, parent string
	}{{base, baseChain, ""}, {top, topChain, baseChain}} {
		mp := filepath.Join(dir, fmt.Sprint(i))
		if err := lfs.Mount(context.Background(), mp, layerLabels(ref, c.l, c.chain, c.parent)); err != nil {
			t.Fatal(err)
		}
		defer lfs.Unmount(context.Background(), mp)
		wg.Add(1)
		go func() {
			defer wg.Done()
			deadline := time.Now().Add(30 * time.Second)
			for time.Now().Before(deadline) {
				if st := svc.verifier.load(digest.FromBytes(c.l.blob), c.chain); st != nil {
					if st.Result != "verified" || st.DiffID != c.l.diffID {
						t.Errorf("layer %d: state %+v", i, st)
					}
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			t.Errorf("layer %d was not verified within 30 s", i)
		}()
	}
	wg.Wait()
	select {
	case f := <-failed:
		t.Fatalf("an honest layer failed: %v", f.err)
	default:
	}
	if got, err := readX(filepath.Join(dir, "0")); err != nil || got != "base" {
		t.Fatalf("verified layer reads %q, %v", got, err)
	}

	// The top layer claimed on another parent: its DiffID does not give
	// that chain ID. With the verified state saved this is known at once.
	mp := filepath.Join(dir, "wrong-parent")
	err := lfs.Mount(context.Background(), mp, layerLabels(ref, top, topChain, digest.FromString("other").String()))
	if !errdefs.IsDataLoss(err) || !strings.Contains(err.Error(), "does not give chain") {
		t.Fatalf("mounting a verified layer under a chain its DiffID does not give: got %v", err)
	}
	// Not verified yet: the verification finds it.
	svc2, _, failed2 := newVerifyingService(t)
	lfs2 := svc2.LayerFS()
	if err := lfs2.Mount(context.Background(), mp, layerLabels(ref, top, topChain, digest.FromString("other").String())); err != nil {
		t.Fatal(err)
	}
	defer lfs2.Unmount(context.Background(), mp)
	select {
	case f := <-failed2:
		if !strings.Contains(f.err.Error(), "gives chain") {
			t.Fatalf("wrong chain: %v", f.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a layer committed under a chain its DiffID does not give was not failed")
	}
}

// counterValue returns the value of the counter name whose one label has
// the given value.
func counterValue(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetValue() == label {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
