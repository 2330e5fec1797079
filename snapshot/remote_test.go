package snapshot

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// fakeLayerFS is a LayerFS that "serves" a layer by bind-mounting,
// read-only, a directory prepared by the test for its digest. The mounts
// are real, so overlays on top of them behave like on FUSE layers.
type fakeLayerFS struct {
	mu       sync.Mutex
	layers   map[string]string // digest -> directory with the layer's files
	fail     map[string]error  // digest -> error Mount returns
	sick     map[string]bool   // mountpoint -> Check fails
	block    chan struct{}     // if set, Mount waits for it to close
	mounted  map[string]string // mountpoint -> digest
	labels   []map[string]string
	mounts   int
	checks   int
	unmounts int
}

func newFakeLayerFS() *fakeLayerFS {
	return &fakeLayerFS{
		layers:  map[string]string{},
		fail:    map[string]error{},
		sick:    map[string]bool{},
		mounted: map[string]string{},
	}
}

func (f *fakeLayerFS) Mount(ctx context.Context, mp string, labels map[string]string) error {
	f.mu.Lock()
	block := f.block
	f.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mounts++
	f.labels = append(f.labels, maps.Clone(labels))
	_, digest, ok := LayerRef(labels)
	if !ok {
		return errors.New("fake: labels name no layer")
	}
	if err := f.fail[digest]; err != nil {
		return err
	}
	src, ok := f.layers[digest]
	if !ok {
		return fmt.Errorf("fake: unknown layer %s", digest)
	}
	if err := unix.Mount(src, mp, "", unix.MS_BIND, ""); err != nil {
		return err
	}
	if err := unix.Mount("", mp, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		_ = unix.Unmount(mp, 0)
		return err
	}
	f.mounted[mp] = digest
	return nil
}

func (f *fakeLayerFS) Check(ctx context.Context, mp string, labels map[string]string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.checks++
	if _, ok := f.mounted[mp]; !ok {
		return fmt.Errorf("fake: nothing mounted at %s", mp)
	}
	if f.sick[mp] {
		return errors.New("fake: layer is sick")
	}
	return nil
}

func (f *fakeLayerFS) Unmount(ctx context.Context, mp string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unmounts++
	delete(f.mounted, mp)
	delete(f.sick, mp)
	return unix.Unmount(mp, 0)
}

func (f *fakeLayerFS) counts() (mounts, checks, unmounts int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounts, f.checks, f.unmounts
}

// addLayer creates a layer directory with files (path -> content).
func (f *fakeLayerFS) addLayer(t *testing.T, digest string, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for p, content := range files {
		p = filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.Lock()
	f.layers[digest] = dir
	f.mu.Unlock()
	return dir
}

const testImage = "registry.example.com/app:1"

var (
	digest1 = "sha256:" + strings.Repeat("1", 64)
	digest2 = "sha256:" + strings.Repeat("2", 64)
	chain1  = "sha256:" + strings.Repeat("a", 64)
	chain2  = "sha256:" + strings.Repeat("b", 64)
)

// layerLabels are the labels containerd's unpacker (with CRI's handler)
// passes when preparing the layer digest as chain.
func layerLabels(chain, digest string) map[string]string {
	return map[string]string{
		snapshots.LabelSnapshotRef: chain,
		LabelCRIImageRef:           testImage,
		LabelCRILayerDigest:        digest,
		LabelCRIImageLayers:        digest1 + "," + digest2,
		LabelUncompressedSize:      "1234",
	}
}

func testContext(t *testing.T) context.Context {
	return logtest.WithT(context.Background(), t)
}

func newTestSnapshotter(t *testing.T, ctx context.Context, root string, lfs LayerFS) *Snapshotter {
	t.Helper()
	sn, err := New(ctx, Options{Root: root, LayerFS: lfs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	return sn
}

// prepareRemote prepares layer digest as chain on parent and expects it to
// be committed remotely.
func prepareRemote(t *testing.T, ctx context.Context, sn *Snapshotter, chain, parent, digest string) {
	t.Helper()
	key := fmt.Sprintf(snapshots.UnpackKeyFormat, "k"+digest[7:15], chain)
	_, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(layerLabels(chain, digest)))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of remote layer %s: want ErrAlreadyExists, got %v", digest, err)
	}
	if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
		t.Fatalf("active key %q should be gone, Stat: %v", key, err)
	}
}

// walkTarget runs containerd's metadata Walk for a target chain on parent.
func walkTarget(t *testing.T, ctx context.Context, sn snapshots.Snapshotter, chain, parent string) []snapshots.Info {
	t.Helper()
	var found []snapshots.Info
	filter := fmt.Sprintf(`labels.%q==%s,parent==%q`, snapshots.LabelSnapshotRef, chain, parent)
	if err := sn.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		found = append(found, info)
		return nil
	}, filter); err != nil {
		t.Fatal(err)
	}
	return found
}

// mountAt mounts m on a new directory and returns it; it is unmounted
// when the test ends (or by the returned func).
func mountAt(t *testing.T, m []mount.Mount) (string, func()) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(m, dir); err != nil {
		t.Fatalf("mount %+v: %v", m, err)
	}
	var once sync.Once
	unmount := func() {
		once.Do(func() {
			if err := mount.UnmountAll(dir, 0); err != nil {
				t.Errorf("unmount %s: %v", dir, err)
			}
		})
	}
	t.Cleanup(unmount)
	return dir, unmount
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func mountCount(t *testing.T, mp string) int {
	t.Helper()
	infos, err := mountinfo.GetMounts(func(i *mountinfo.Info) (bool, bool) { return i.Mountpoint != mp, false })
	if err != nil {
		t.Fatal(err)
	}
	return len(infos)
}

func idOf(t *testing.T, ctx context.Context, sn *Snapshotter, name string) string {
	t.Helper()
	info, err := sn.Stat(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	sn.mu.Lock()
	defer sn.mu.Unlock()
	for id, rl := range sn.remotes {
		if rl.name == info.Name {
			return id
		}
	}
	t.Fatalf("%s is not a remote snapshot", name)
	return ""
}

func TestRemotePrepare(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	lfs := newFakeLayerFS()
	src1 := lfs.addLayer(t, digest1, map[string]string{"etc/one": "1"})
	lfs.addLayer(t, digest2, map[string]string{"bin/two": "2"})
	sn := newTestSnapshotter(t, ctx, t.TempDir(), lfs)

	prepareRemote(t, ctx, sn, chain1, "", digest1)
	info, err := sn.Stat(ctx, chain1)
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindCommitted || info.Parent != "" || info.Labels[LabelRemote] != "true" || info.Labels[LabelCRILayerDigest] != digest1 {
		t.Fatalf("unexpected info of remote snapshot: %+v", info)
	}
	if found := walkTarget(t, ctx, sn, chain1, ""); len(found) != 1 || found[0].Name != chain1 {
		t.Fatalf("Walk for %s found %+v", chain1, found)
	}

	prepareRemote(t, ctx, sn, chain2, chain1, digest2)
	if found := walkTarget(t, ctx, sn, chain2, chain1); len(found) != 1 || found[0].Name != chain2 {
		t.Fatalf("Walk for %s on %s found %+v", chain2, chain1, found)
	}
	if found := walkTarget(t, ctx, sn, chain2, ""); len(found) != 0 {
		t.Fatalf("Walk for %s on no parent found %+v", chain2, found)
	}

	// The target exists: ErrAlreadyExists without mounting anything.
	_, err = sn.Prepare(ctx, "extract-again "+chain1, "", snapshots.WithLabels(layerLabels(chain1, digest1)))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of existing target: want ErrAlreadyExists, got %v", err)
	}
	if m, _, _ := lfs.counts(); m != 2 {
		t.Fatalf("LayerFS.Mount called %d times, want 2", m)
	}
	if u, err := sn.Usage(ctx, chain1); err != nil || u.Size != 1234 {
		t.Fatalf("Usage of remote snapshot = %+v, %v; want size 1234", u, err)
	}

	// A container's rootfs on top of both remote layers.
	m, err := sn.Prepare(ctx, "rootfs", chain2)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || m[0].Type != "overlay" || slices.Contains(m[0].Options, "ro") {
		t.Fatalf("want one writable overlay mount, got %+v", m)
	}
	_, checksBefore, _ := lfs.counts()
	dir, unmount := mountAt(t, m)
	if got := readFile(t, filepath.Join(dir, "etc/one")); got != "1" {
		t.Fatalf("etc/one = %q", got)
	}
	if got := readFile(t, filepath.Join(dir, "bin/two")); got != "2" {
		t.Fatalf("bin/two = %q", got)
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/one"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	unmount()
	if got := readFile(t, filepath.Join(src1, "etc/one")); got != "1" {
		t.Fatalf("the layer itself changed: %q", got)
	}
	if _, err := sn.Mounts(ctx, "rootfs"); err != nil {
		t.Fatal(err)
	}
	if _, checks, _ := lfs.counts(); checks < checksBefore+2 {
		t.Fatalf("Mounts did not check the remote lowers (%d checks, had %d)", checks, checksBefore)
	}

	// A view of one remote layer is a read-only bind mount of it.
	m, err = sn.View(ctx, "view", chain1)
	if err != nil {
		t.Fatal(err)
	}
	dir, unmount = mountAt(t, m)
	if got := readFile(t, filepath.Join(dir, "etc/one")); got != "1" {
		t.Fatalf("view: etc/one = %q", got)
	}
	if err := os.WriteFile(filepath.Join(dir, "x"), nil, 0o644); err == nil {
		t.Fatal("view is writable")
	}
	unmount()
	if err := sn.Remove(ctx, "view"); err != nil {
		t.Fatal(err)
	}

	// Remove unmounts.
	mp2 := sn.fsPath(idOf(t, ctx, sn, chain2))
	if err := sn.Remove(ctx, chain2); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Remove of a parent: want ErrFailedPrecondition, got %v", err)
	}
	if err := sn.Remove(ctx, "rootfs"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Remove(ctx, chain2); err != nil {
		t.Fatal(err)
	}
	if _, _, u := lfs.counts(); u != 1 {
		t.Fatalf("LayerFS.Unmount called %d times, want 1", u)
	}
	if n := mountCount(t, mp2); n != 0 {
		t.Fatalf("%s still mounted after Remove", mp2)
	}
	if _, err := os.Stat(filepath.Dir(mp2)); !os.IsNotExist(err) {
		t.Fatalf("snapshot directory not removed: %v", err)
	}

	// Same target on another parent: cannot be shared, prepared normally.
	if _, err := sn.Prepare(ctx, "base-a", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-a"); err != nil {
		t.Fatal(err)
	}
	m, err = sn.Prepare(ctx, "extract-other "+chain1, "base", snapshots.WithLabels(layerLabels(chain1, digest1)))
	if err != nil || len(m) != 1 || m[0].Type != "overlay" {
		t.Fatalf("Prepare of existing target on another parent: %+v, %v", m, err)
	}
}

func TestRemoteUpdateKeepsLayerLabels(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	lfs := newFakeLayerFS()
	lfs.addLayer(t, digest1, map[string]string{"a": "a"})
	sn := newTestSnapshotter(t, ctx, t.TempDir(), lfs)
	prepareRemote(t, ctx, sn, chain1, "", digest1)

	info, err := sn.Update(ctx, snapshots.Info{Name: chain1, Labels: map[string]string{"containerd.io/gc.root": "x"}}, "labels")
	if err != nil {
		t.Fatal(err)
	}
	want := layerLabels(chain1, digest1)
	want[LabelRemote] = "true"
	want["containerd.io/gc.root"] = "x"
	if !maps.Equal(info.Labels, want) {
		t.Fatalf("labels after Update = %v, want %v", info.Labels, want)
	}
}

func TestRemoteFallback(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	lfs := newFakeLayerFS()
	lfs.fail[digest1] = errors.New("no TOC in this blob")
	sn := newTestSnapshotter(t, ctx, t.TempDir(), lfs)

	key := "extract-1 " + chain1
	m, err := sn.Prepare(ctx, key, "", snapshots.WithLabels(layerLabels(chain1, digest1)))
	if err != nil {
		t.Fatalf("Prepare must fall back to a normal snapshot: %v", err)
	}
	if len(m) != 1 || m[0].Type != "bind" || !slices.Contains(m[0].Options, "rw") {
		t.Fatalf("want a writable bind mount, got %+v", m)
	}
	if mc, _, _ := lfs.counts(); mc != 1 {
		t.Fatalf("LayerFS.Mount called %d times, want 1", mc)
	}
	dir, unmount := mountAt(t, m)
	if err := os.WriteFile(filepath.Join(dir, "unpacked"), []byte("by containerd"), 0o644); err != nil {
		t.Fatal(err)
	}
	unmount()
	if err := sn.Commit(ctx, chain1, key, snapshots.WithLabels(layerLabels(chain1, digest1))); err != nil {
		t.Fatal(err)
	}
	info, err := sn.Stat(ctx, chain1)
	if err != nil || info.Labels[LabelRemote] != "" {
		t.Fatalf("fallback snapshot: %+v, %v", info, err)
	}
	if u, err := sn.Usage(ctx, chain1); err != nil || u.Size == 0 {
		t.Fatalf("Usage of unpacked snapshot = %+v, %v", u, err)
	}

	// Labels that name no layer, or no target: the LayerFS is not asked.
	noLayer := layerLabels(chain2, digest2)
	delete(noLayer, LabelCRIImageRef)
	if _, err := sn.Prepare(ctx, "extract-2 "+chain2, chain1, snapshots.WithLabels(noLayer)); err != nil {
		t.Fatal(err)
	}
	noTarget := layerLabels(chain2, digest2)
	delete(noTarget, snapshots.LabelSnapshotRef)
	if _, err := sn.Prepare(ctx, "plain", chain1, snapshots.WithLabels(noTarget)); err != nil {
		t.Fatal(err)
	}
	if mc, _, _ := lfs.counts(); mc != 1 {
		t.Fatalf("LayerFS.Mount called %d times, want 1", mc)
	}

	// Labels an image's annotations can carry (containerd passes every
	// "containerd.io/snapshot/" annotation on) never pick the layer to
	// mount: the old lazypull.image-ref/layer-digest labels are ignored,
	// and only the labels containerd's image handler sets count.
	forged := map[string]string{
		snapshots.LabelSnapshotRef:                     chain2,
		"containerd.io/snapshot/lazypull.image-ref":    "evil.example/other:latest",
		"containerd.io/snapshot/lazypull.layer-digest": digest2,
	}
	lfs.addLayer(t, digest2, map[string]string{"two": "2"})
	if _, err := sn.Prepare(ctx, "extract-3 "+chain2, chain1, snapshots.WithLabels(forged)); err != nil {
		t.Fatalf("Prepare with only image-supplied labels: want a local snapshot, got %v", err)
	}
	if mc, _, _ := lfs.counts(); mc != 1 {
		t.Fatalf("image-supplied labels made the LayerFS mount (%d mounts, want 1)", mc)
	}
}

func TestRemoteRestart(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	root := t.TempDir()
	layers := func() *fakeLayerFS {
		lfs := newFakeLayerFS()
		lfs.addLayer(t, digest1, map[string]string{"etc/one": "1"})
		lfs.addLayer(t, digest2, map[string]string{"bin/two": "2"})
		return lfs
	}

	lfs1 := layers()
	sn1 := newTestSnapshotter(t, ctx, root, lfs1)
	prepareRemote(t, ctx, sn1, chain1, "", digest1)
	prepareRemote(t, ctx, sn1, chain2, chain1, digest2)
	mp1 := sn1.fsPath(idOf(t, ctx, sn1, chain1))
	if err := sn1.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, u := lfs1.counts(); u != 2 {
		t.Fatalf("Close unmounted %d layers, want 2", u)
	}
	if n := mountCount(t, mp1); n != 0 {
		t.Fatalf("%s still mounted after Close", mp1)
	}

	// Restarted, a container is started at once: its Prepare gets the
	// layers mounted (by the restore or by itself), each exactly once.
	lfs2 := layers()
	sn2 := newTestSnapshotter(t, ctx, root, lfs2)
	m, err := sn2.Prepare(ctx, "rootfs", chain2)
	if err != nil {
		t.Fatal(err)
	}
	dir, unmount := mountAt(t, m)
	if readFile(t, filepath.Join(dir, "etc/one")) != "1" || readFile(t, filepath.Join(dir, "bin/two")) != "2" {
		t.Fatal("rootfs does not show the remote layers")
	}
	unmount()
	sn2.bgWG.Wait()
	if mc, _, _ := lfs2.counts(); mc != 2 {
		t.Fatalf("LayerFS.Mount called %d times after restart, want 2", mc)
	}
	for _, l := range lfs2.labels {
		if l[LabelRemote] != "true" || l[LabelCRIImageRef] != testImage || l[snapshots.LabelSnapshotRef] == "" {
			t.Fatalf("remount with unexpected labels %v", l)
		}
	}
	if n := mountCount(t, mp1); n != 1 {
		t.Fatalf("%s mounted %d times, want 1", mp1, n)
	}
	if err := sn2.Close(); err != nil {
		t.Fatal(err)
	}

	// Without any request the layers are mounted again in the background;
	// New does not wait for them.
	lfs3 := layers()
	lfs3.block = make(chan struct{})
	start := time.Now()
	sn3 := newTestSnapshotter(t, ctx, root, lfs3)
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("New took %v with the LayerFS blocked", d)
	}
	if mc, _, _ := lfs3.counts(); mc != 0 {
		t.Fatal("mounted while blocked")
	}
	close(lfs3.block)
	sn3.bgWG.Wait()
	if mc, _, _ := lfs3.counts(); mc != 2 {
		t.Fatalf("restore mounted %d layers, want 2", mc)
	}
	if n := mountCount(t, mp1); n != 1 {
		t.Fatalf("%s mounted %d times, want 1", mp1, n)
	}
	if err := sn3.Close(); err != nil {
		t.Fatal(err)
	}

	// Restore failure: start-up goes on, the layer is unavailable with a
	// clear error until a remount succeeds.
	lfs4 := layers()
	lfs4.fail[digest1] = errors.New("registry unreachable")
	sn4 := newTestSnapshotter(t, ctx, root, lfs4)
	sn4.bgWG.Wait()
	_, err = sn4.Prepare(ctx, "rootfs2", chain2)
	if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), digest1) || !strings.Contains(err.Error(), "registry unreachable") {
		t.Fatalf("Prepare over an unavailable remote layer: want ErrUnavailable naming %s, got %v", digest1, err)
	}
	if _, err := sn4.Stat(ctx, "rootfs2"); !errdefs.IsNotFound(err) {
		t.Fatalf("failed Prepare left its snapshot behind: %v", err)
	}
	lfs4.mu.Lock()
	delete(lfs4.fail, digest1)
	lfs4.mu.Unlock()
	if _, err := sn4.Prepare(ctx, "rootfs2", chain2); err != nil {
		t.Fatalf("Prepare after the layer came back: %v", err)
	}
}

func TestRemoteRemountUnhealthy(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	lfs := newFakeLayerFS()
	lfs.addLayer(t, digest1, map[string]string{"etc/one": "1"})
	sn := newTestSnapshotter(t, ctx, t.TempDir(), lfs)
	prepareRemote(t, ctx, sn, chain1, "", digest1)
	if _, err := sn.Prepare(ctx, "rootfs", chain1); err != nil {
		t.Fatal(err)
	}

	mp := sn.fsPath(idOf(t, ctx, sn, chain1))
	lfs.mu.Lock()
	lfs.sick[mp] = true
	lfs.mu.Unlock()
	m, err := sn.Mounts(ctx, "rootfs")
	if err != nil {
		t.Fatal(err)
	}
	if mc, _, u := lfs.counts(); mc != 2 || u != 1 {
		t.Fatalf("unhealthy layer: %d mounts, %d unmounts; want 2 and 1", mc, u)
	}
	dir, _ := mountAt(t, m)
	if readFile(t, filepath.Join(dir, "etc/one")) != "1" {
		t.Fatal("remounted layer not visible")
	}

	// Unhealthy and the remount fails: a clear error.
	lfs.mu.Lock()
	lfs.sick[mp] = true
	lfs.fail[digest1] = errors.New("blob gone")
	lfs.mu.Unlock()
	if _, err := sn.Mounts(ctx, "rootfs"); !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), digest1) {
		t.Fatalf("want ErrUnavailable naming the layer, got %v", err)
	}
	if n := mountCount(t, mp); n != 0 {
		t.Fatalf("%s still mounted %d times", mp, n)
	}
}

// TestStaleMountAfterCrash: a daemon dies with its layers mounted; the next
// New detaches the leftovers before mounting the layers again.
func TestStaleMountAfterCrash(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	root := t.TempDir()
	lfs1 := newFakeLayerFS()
	lfs1.addLayer(t, digest1, map[string]string{"etc/one": "1"})
	sn1, err := New(ctx, Options{Root: root, LayerFS: lfs1})
	if err != nil {
		t.Fatal(err)
	}
	prepareRemote(t, ctx, sn1, chain1, "", digest1)
	mp := sn1.fsPath(idOf(t, ctx, sn1, chain1))
	// "Crash": release the database, leave the mount.
	sn1.bgCancel()
	if err := sn1.ms.Close(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = detach(mp) })
	if n := mountCount(t, mp); n != 1 {
		t.Fatalf("setup: %s mounted %d times", mp, n)
	}

	lfs2 := newFakeLayerFS()
	lfs2.addLayer(t, digest1, map[string]string{"etc/one": "1"})
	sn2 := newTestSnapshotter(t, ctx, root, lfs2)
	sn2.bgWG.Wait()
	if mc, _, _ := lfs2.counts(); mc != 1 {
		t.Fatalf("LayerFS.Mount called %d times, want 1", mc)
	}
	if n := mountCount(t, mp); n != 1 {
		t.Fatalf("%s mounted %d times after restart, want 1 (stale mount not cleaned?)", mp, n)
	}
}

// TestCleanupUnmountsOrphans: a snapshot directory without metadata that
// still has something mounted is unmounted, never deleted through.
func TestCleanupUnmountsOrphans(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	root := t.TempDir()
	sn := newTestSnapshotter(t, ctx, root, nil)

	precious := t.TempDir()
	if err := os.WriteFile(filepath.Join(precious, "keep"), []byte("me"), 0o644); err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(sn.root, "snapshots", "999")
	if err := os.MkdirAll(filepath.Join(orphan, "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(precious, filepath.Join(orphan, "fs"), "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = detach(filepath.Join(orphan, "fs")) })

	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatalf("orphan directory not removed: %v", err)
	}
	if readFile(t, filepath.Join(precious, "keep")) != "me" {
		t.Fatal("Cleanup deleted through a mount")
	}
}

// TestDeadFUSEMount leaves a real dead FUSE mount (its server killed) on a
// snapshot directory and checks that New detaches it and Cleanup removes it.
func TestDeadFUSEMount(t *testing.T) {
	requireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	ctx := testContext(t)
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(root, "snapshots", "7", "fs")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = detach(mp) })

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperFUSEServer$")
	cmd.Env = append(os.Environ(), "LAZYPULL_TEST_FUSE_MOUNTPOINT="+mp)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "fuse-ready") {
				ready <- sc.Text()
				return
			}
		}
		close(ready)
	}()
	select {
	case _, ok := <-ready:
		if !ok {
			_ = cmd.Wait()
			t.Skip("helper could not mount FUSE")
		}
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("FUSE helper did not come up")
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()

	var st unix.Stat_t
	if err := unix.Stat(mp, &st); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("setup: stat of dead FUSE mount: want ENOTCONN, got %v", err)
	}

	sn := newTestSnapshotter(t, ctx, root, nil)
	if n := mountCount(t, mp); n != 0 {
		t.Fatalf("dead FUSE mount still there after New")
	}
	if err := unix.Stat(mp, &st); err != nil {
		t.Fatalf("stat after cleanup: %v", err)
	}
	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(mp)); !os.IsNotExist(err) {
		t.Fatalf("orphan snapshot directory not removed: %v", err)
	}
}

type emptyDir struct{ fs.Inode }

// TestHelperFUSEServer is not a test: TestDeadFUSEMount runs it in a child
// process to serve a FUSE mount, and kills it.
func TestHelperFUSEServer(t *testing.T) {
	mp := os.Getenv("LAZYPULL_TEST_FUSE_MOUNTPOINT")
	if mp == "" {
		t.Skip("helper process only")
	}
	server, err := fs.Mount(mp, &emptyDir{}, &fs.Options{MountOptions: fuse.MountOptions{
		DirectMount: true,
		FsName:      "lazypull-test",
		Name:        "lazypull-test",
	}})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("fuse-ready")
	server.Wait()
}

// sizedLayerFS is a fakeLayerFS that knows its layers' sizes.
type sizedLayerFS struct {
	*fakeLayerFS
	size int64
}

func (s sizedLayerFS) LayerSize(string) (int64, bool) { return s.size, true }

func TestRemoteUsageFromLayerSizer(t *testing.T) {
	ctx := testContext(t)
	lfs := newFakeLayerFS()
	lfs.addLayer(t, digest1, map[string]string{"a": "x"})
	sn := newTestSnapshotter(t, ctx, t.TempDir(), sizedLayerFS{lfs, 987_654})
	prepareRemote(t, ctx, sn, chain1, "", digest1)
	u, err := sn.Usage(ctx, chain1)
	if err != nil || u.Size != 987_654 {
		t.Fatalf("Usage = %+v, %v; want the LayerSizer's 987654 over the label's 1234", u, err)
	}
	info, err := sn.Stat(ctx, chain1)
	if err != nil || info.Labels[LabelUncompressedSize] != "987654" {
		t.Fatalf("label %q, %v", info.Labels[LabelUncompressedSize], err)
	}
}

// listingLayerFS is a fakeLayerFS whose mounts outlive the snapshotter,
// like the fuse manager's.
type listingLayerFS struct{ *fakeLayerFS }

func (l listingLayerFS) Mountpoints(context.Context) ([]string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for mp := range l.mounted {
		out = append(out, mp)
	}
	return out, nil
}

// TestRemoteRestartAdoptsLiveMounts: with a MountLister LayerFS, Close
// leaves the layers mounted, the next snapshotter adopts them (checks, no
// remount, no stale detach) and unmounts a layer whose snapshot the
// metadata no longer has.
func TestRemoteRestartAdoptsLiveMounts(t *testing.T) {
	requireRoot(t)
	ctx := testContext(t)
	root := t.TempDir()
	lfs := listingLayerFS{newFakeLayerFS()}
	lfs.addLayer(t, digest1, map[string]string{"etc/one": "1"})
	lfs.addLayer(t, digest2, map[string]string{"bin/two": "2"})
	t.Cleanup(func() {
		mps, _ := lfs.Mountpoints(ctx)
		for _, mp := range mps {
			_ = unix.Unmount(mp, unix.MNT_DETACH)
		}
	})

	sn1 := newTestSnapshotter(t, ctx, root, lfs)
	prepareRemote(t, ctx, sn1, chain1, "", digest1)
	prepareRemote(t, ctx, sn1, chain2, chain1, digest2)
	mp1 := sn1.fsPath(idOf(t, ctx, sn1, chain1))
	if err := sn1.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, u := lfs.counts(); u != 0 {
		t.Fatalf("Close unmounted %d layers of a MountLister, want 0", u)
	}
	if n := mountCount(t, mp1); n != 1 {
		t.Fatalf("%s mounted %d times after Close, want 1", mp1, n)
	}
	// A layer whose snapshot is gone from the metadata.
	orphan := filepath.Join(root, "snapshots", "999", "fs")
	if err := os.MkdirAll(orphan, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := lfs.Mount(ctx, orphan, layerLabels(chain1, digest1)); err != nil {
		t.Fatal(err)
	}
	mountsBefore, _, _ := lfs.counts()

	sn2 := newTestSnapshotter(t, ctx, root, lfs)
	sn2.bgWG.Wait()
	m, err := sn2.Prepare(ctx, "rootfs", chain2)
	if err != nil {
		t.Fatal(err)
	}
	dir, unmount := mountAt(t, m)
	if readFile(t, filepath.Join(dir, "etc/one")) != "1" || readFile(t, filepath.Join(dir, "bin/two")) != "2" {
		t.Fatal("rootfs does not show the adopted layers")
	}
	unmount()
	mounts, checks, unmounts := lfs.counts()
	if mounts != mountsBefore {
		t.Errorf("LayerFS.Mount called %d times after restart, want 0: live mounts must be adopted", mounts-mountsBefore)
	}
	if checks < 2 {
		t.Errorf("adopted layers checked %d times, want at least 2", checks)
	}
	if unmounts != 1 || mountCount(t, orphan) != 0 {
		t.Errorf("orphan layer: %d unmounts, mounted %d times; want it unmounted", unmounts, mountCount(t, orphan))
	}
	if n := mountCount(t, mp1); n != 1 {
		t.Errorf("%s mounted %d times, want 1", mp1, n)
	}
}
