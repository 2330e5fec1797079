package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/snapshot"
)

// The tests in this file run lazypull's own daemon (./cmd/snapshotter)
// behind containerd 1.6 and 2.4, on images converted by package convert
// and served by the in-process registry. Every test starts a daemon pair
// (lazypull-snapshotter and containerd) per version, since they stop the
// registry, kill the daemon or count what it fetched; background fetch is
// off except in TestLazypullBackgroundFetch, so the registry's request log
// shows exactly what reads fetched.

// TestLazypullPullRun converts the three-layer fixture (busybox base;
// whiteouts, opaque dirs, hardlinks, symlinks, xattrs, devices, type
// changes between layers) to gzip eStargz, pulls it lazily and checks that
// the layers became remote snapshots after fetching a small part of them,
// that containers run, that the rootfs is identical to the unpacked
// image's, and that the daemon's metrics show what it fetched.
func TestLazypullPullRun(t *testing.T) {
	testLazypullPullRun(t, estargz.Gzip)
}

// TestLazypullZstdChunked is TestLazypullPullRun with zstd:chunked layers,
// on a daemon of its own (the chunk cache is keyed by content, so a daemon
// that read the gzip variant would not fetch anything).
func TestLazypullZstdChunked(t *testing.T) {
	testLazypullPullRun(t, estargz.Zstd)
}

func testLazypullPullRun(t *testing.T, comp estargz.Compression) {
	img := threeLayerImage(t)
	want, err := img.ExpectedTree()
	if err != nil {
		t.Fatal(err)
	}
	checkExpectedTree(t, want)
	cv := convertImage(t, img, comp)

	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		origRef := push(t, reg, "lazy/orig:v1", img)
		ref := push(t, reg, "lazy/converted:v1", cv.image)
		env := newLazyEnv(t, v, reg, lazyOptions{})
		ctx := env.c.Namespace(t)

		// The pull mounts every layer after reading its footer and TOC.
		reg.ResetRequests()
		image := env.pull(t, ctx, ref)
		env.checkRemote(t, ctx, image, true)
		if n := len(env.fuseMounts(t)); n != len(cv.manifest.Layers) {
			t.Errorf("%d FUSE mounts after the pull, want %d: %v", n, len(cv.manifest.Layers), env.fuseMounts(t))
		}
		checkFetchedFraction(t, reg, cv, 0.2)

		// Containers run; a file that is not read is not fetched.
		if out := env.run(t, ctx, image, "cat", "/etc/motd", "/etc/greeting.link"); out != "layer 3\nhello from layer 2\n" {
			t.Fatalf("cat: %q", out)
		}
		base := cv.manifest.Layers[0]
		if got := blobBytes(reg)[base.Digest]; got > base.Size-int64(len(blobContent()))/2 {
			t.Errorf("base layer: %d of %d bytes fetched before /data/blob (1 MiB, incompressible) was read", got, base.Size)
		}
		out := env.run(t, ctx, image, "sh", "-c", "sha256sum /data/blob; ls /opq; test ! -e /data/gone && test ! -e /opq/a && echo gone")
		wantOut := fmt.Sprintf("%s  /data/blob\nnew\ngone\n", want["data/blob"].Digest.Encoded())
		if out != wantOut {
			t.Fatalf("want output %q, got %q", wantOut, out)
		}

		// Metrics show the foreground fetches; background bytes are only
		// the speculation around misses (the background fetch is off).
		m := env.metrics(t)
		fg, bg := m[`lazypull_fetch_bytes_total{kind="foreground"}`], m[`lazypull_fetch_bytes_total{kind="background"}`]
		if fg <= 0 {
			t.Errorf("metrics: fetch bytes foreground %v, background %v", fg, bg)
		}
		var served int64
		for _, l := range cv.manifest.Layers {
			served += blobBytes(reg)[l.Digest]
		}
		if int64(fg+bg) > served {
			t.Errorf("metrics: %v foreground and %v background bytes, but the registry served only %d bytes of the layers", fg, bg, served)
		}
		if got := m["lazypull_mounted_layers"]; got != float64(len(cv.manifest.Layers)) {
			t.Errorf("metrics: lazypull_mounted_layers = %v", got)
		}
		if m[`lazypull_chunk_lookups_total{result="miss"}`] == 0 || m["lazypull_verify_failures_total"] != 0 {
			t.Errorf("metrics: chunk misses %v, verify failures %v", m[`lazypull_chunk_lookups_total{result="miss"}`], m["lazypull_verify_failures_total"])
		}

		// The rootfs, entry by entry.
		lazyTree, err := env.c.ImageTree(ctx, image, lazypullName)
		if err != nil {
			t.Fatal(err)
		}
		// Against the same converted image unpacked by overlayfs. The one
		// justified difference: a gzip eStargz stream holds its TOC as
		// the tar entry stargz.index.json, which unpacking writes out
		// and lazypull (like stargz-snapshotter) does not show.
		overlayImage, err := env.c.Pull(ctx, ref, lab.DefaultSnapshotter)
		if err != nil {
			t.Fatal(err)
		}
		overlayTree, err := env.c.ImageTree(ctx, overlayImage, lab.DefaultSnapshotter)
		if err != nil {
			t.Fatal(err)
		}
		var tocOnly []string
		if comp == estargz.Gzip {
			const toc = estargz.TOCTarName
			if overlayTree[toc] == nil {
				t.Errorf("overlayfs unpacked the gzip eStargz image without %s", toc)
			}
			tocOnly = append(tocOnly, toc)
		}
		if d := fixture.Diff(overlayTree, lazyTree, &fixture.DiffOptions{IgnorePaths: tocOnly}); len(d) > 0 {
			t.Errorf("lazypull rootfs differs from the converted image on overlayfs (- overlayfs, + lazypull):\n%s", fixture.FormatDiff(d, 50))
		}
		if d := fixture.Diff(cv.expectedTree(t), lazyTree, &fixture.DiffOptions{IgnorePaths: tocOnly}); len(d) > 0 {
			t.Errorf("lazypull rootfs differs from the converted layer tars (- tars, + lazypull):\n%s", fixture.FormatDiff(d, 50))
		}
		// Against the original image, apart from the landmark file the
		// converter adds to every layer.
		if lazyTree[landmark] == nil {
			t.Errorf("lazypull rootfs has no %s", landmark)
		}
		if d := fixture.Diff(want, lazyTree, &fixture.DiffOptions{IgnorePaths: []string{landmark}}); len(d) > 0 {
			t.Errorf("lazypull rootfs differs from the original image (- original, + lazypull):\n%s", fixture.FormatDiff(d, 50))
		}
		origImage, err := env.c.Pull(ctx, origRef, lab.DefaultSnapshotter)
		if err != nil {
			t.Fatal(err)
		}
		origTree, err := env.c.ImageTree(ctx, origImage, lab.DefaultSnapshotter)
		if err != nil {
			t.Fatal(err)
		}
		if d := fixture.Diff(origTree, lazyTree, &fixture.DiffOptions{IgnorePaths: []string{landmark}}); len(d) > 0 {
			t.Errorf("lazypull rootfs differs from the original image on overlayfs (- original, + lazypull):\n%s", fixture.FormatDiff(d, 50))
		}

		checkNoOverlayXattrs(t, env, ctx, image, "/opq")
	})
}

// checkFetchedFraction fails unless the registry served at most frac of
// the converted image's layer bytes (summed), and at most frac of any
// layer bigger than 1 MiB.
func checkFetchedFraction(t *testing.T, reg *lab.Registry, cv *converted, frac float64) {
	t.Helper()
	got := blobBytes(reg)
	var sum int64
	for i, l := range cv.manifest.Layers {
		sum += got[l.Digest]
		if l.Size > 1<<20 && float64(got[l.Digest]) > frac*float64(l.Size) {
			t.Errorf("layer %d (%s): registry served %d of %d bytes", i, l.Digest, got[l.Digest], l.Size)
		}
	}
	if total := cv.layerSizes(); float64(sum) > frac*float64(total) {
		t.Errorf("registry served %d of the layers' %d bytes", sum, total)
	}
	t.Logf("registry served %d of the layers' %d bytes", sum, cv.layerSizes())
}

// checkNoOverlayXattrs mounts a view of img's rootfs, the way a container
// sees it, and checks that dir, an opaque directory, shows no overlayfs
// attribute: the FUSE layer marks opaque directories for the overlay
// stacked on it, and the mark must not pass through to the container
// (user.overlay.opaque did, next to trusted.overlay.opaque, until package
// fs set only the one the overlay reads).
func checkNoOverlayXattrs(t *testing.T, env *lazyEnv, ctx context.Context, img client.Image, dir string) {
	t.Helper()
	target := t.TempDir()
	unmount, err := env.c.MountImage(ctx, img, lazypullName, target)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unmount(); err != nil {
			t.Error(err)
		}
	}()
	names, err := rawXattrs(target + dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.Contains(n, ".overlay.") {
			t.Errorf("%s in the container's rootfs has the overlayfs attribute %s", dir, n)
		}
	}
}

// TestLazypullFallback pulls an image whose layers are plain gzip (no TOC)
// through the lazypull daemon: it cannot serve them lazily, so containerd
// downloads and unpacks them into ordinary snapshots of the daemon.
func TestLazypullFallback(t *testing.T) {
	img := threeLayerImage(t)
	want, err := img.ExpectedTree()
	if err != nil {
		t.Fatal(err)
	}
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		env := newLazyEnv(t, v, reg, lazyOptions{})
		ctx := env.c.Namespace(t)
		ref, err := reg.Push(ctx, "lazy/plain:v1", img)
		if err != nil {
			t.Fatal(err)
		}
		reg.ResetRequests()
		image := env.pull(t, ctx, ref)
		env.checkRemote(t, ctx, image, false)
		// containerd downloaded the layers whole; the daemon, which
		// cannot serve them, must not have read them (range reads).
		for _, r := range reg.BlobRequests() {
			if r.Range != "" {
				t.Errorf("range read of a layer without a TOC: %+v", r)
			}
		}
		got := blobBytes(reg)
		for i, l := range img.Layers {
			if got[l.Digest()] < int64(len(l.Data)) {
				t.Errorf("layer %d: the registry served %d of %d bytes; containerd should have downloaded it", i, got[l.Digest()], len(l.Data))
			}
		}
		if m := env.fuseMounts(t); len(m) != 0 {
			t.Errorf("FUSE mounts for an image without TOCs: %v", m)
		}
		if out := env.run(t, ctx, image, "cat", "/etc/motd"); out != "layer 3\n" {
			t.Fatalf("cat: %q", out)
		}
		tree, err := env.c.ImageTree(ctx, image, lazypullName)
		if err != nil {
			t.Fatal(err)
		}
		if d := fixture.Diff(want, tree, nil); len(d) > 0 {
			t.Fatalf("rootfs differs (- want, + got):\n%s", fixture.FormatDiff(d, 50))
		}
	})
}

// coldImage is busybox plus a layer with a small file and a 2 MiB file
// of incompressible bytes that tests leave unread.
func coldImage(t *testing.T) (*fixture.Image, digest.Digest) {
	t.Helper()
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	cold := make([]byte, 2<<20)
	rand.New(rand.NewSource(7)).Read(cold)
	top := fixture.NewLayer().
		File("etc/motd", "warm\n").
		FileBytes("data/cold", cold)
	img, err := fixture.BuildImage(fixture.DefaultConfig(), base, top)
	if err != nil {
		t.Fatal(err)
	}
	return img, digest.FromBytes(cold)
}

// TestLazypullRegistryDown stops the registry after the pull: containers
// whose files were read before still run; reading a file that was never
// fetched fails with EIO, quickly when connections are refused, and within
// fetch.read_timeout when the registry accepts connections but never
// answers; once the registry is back, the same read succeeds.
func TestLazypullRegistryDown(t *testing.T) {
	img, coldDigest := coldImage(t)
	cv := convertImage(t, img, estargz.Gzip)
	const readTimeout = 3 * time.Second
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		ref := push(t, reg, "down/converted:v1", cv.image)
		// A request timeout far above read_timeout: only the latter can
		// end a read from the hanging registry in time. The bounds below
		// leave room for a loaded machine.
		env := newLazyEnv(t, v, reg, lazyOptions{ReadTimeout: readTimeout, Timeout: time.Minute, Retries: 3})
		ctx := env.c.Namespace(t)
		image := env.pull(t, ctx, ref)
		env.checkRemote(t, ctx, image, true)
		if out := env.run(t, ctx, image, "cat", "/etc/motd"); out != "warm\n" {
			t.Fatalf("cat: %q", out)
		}

		if err := reg.Stop(); err != nil {
			t.Fatal(err)
		}
		if out := env.run(t, ctx, image, "cat", "/etc/motd"); out != "warm\n" {
			t.Fatalf("cat with the registry down: %q", out)
		}
		readCold := func(stage string, maxTime time.Duration) {
			t.Helper()
			start := time.Now()
			res, err := env.c.Run(ctx, image, lab.RunOptions{
				Snapshotter: lazypullName, Args: []string{"sha256sum", "/data/cold"}, Timeout: 60 * time.Second,
			})
			took := time.Since(start)
			if err != nil {
				t.Fatalf("%s: %v", stage, err)
			}
			if res.ExitCode == 0 || !strings.Contains(res.Stderr, "Input/output error") {
				t.Errorf("%s: reading an uncached file: want an I/O error, got %s", stage, res)
			}
			if took > maxTime {
				t.Errorf("%s: the failing read took %v, want at most %v", stage, took, maxTime)
			}
			t.Logf("%s: failed read took %v", stage, took)
		}
		// Connection refused: fails after the retries' backoff.
		readCold("registry stopped", readTimeout+12*time.Second)

		// A registry that accepts connections and never answers.
		bh, err := blackhole(reg.Host())
		if err != nil {
			t.Fatal(err)
		}
		readCold("registry hanging", readTimeout+12*time.Second)
		if bh.accepted() == 0 {
			t.Error("the daemon never connected to the hanging registry")
		}
		bh.Close()
		// The layer still serves what it has.
		if out := env.run(t, ctx, image, "cat", "/etc/motd"); out != "warm\n" {
			t.Fatalf("cat after failed reads: %q", out)
		}

		// With the registry back, the read succeeds: at once, or after
		// the short while package fs keeps failing a chunk whose fetch
		// timed out (so that the kernel's retry of a failed readahead
		// does not wait out a second read_timeout).
		if err := reg.Start(); err != nil {
			t.Fatal(err)
		}
		var res *lab.RunResult
		for i := 0; i < 5; i++ {
			if res, err = env.c.Run(ctx, image, lab.RunOptions{Snapshotter: lazypullName, Args: []string{"sha256sum", "/data/cold"}}); err != nil {
				t.Fatal(err)
			}
			if res.ExitCode == 0 {
				break
			}
			time.Sleep(time.Second)
		}
		if res.ExitCode != 0 || res.Stdout != coldDigest.Encoded()+"  /data/cold\n" {
			t.Fatalf("sha256sum with the registry back: %s", res)
		}
	})
}

// TestLazypullBackgroundFetch turns background fetching on: after the
// pull, the daemon fetches the layers on its own, below any reader, so that
// once it is done the whole rootfs reads without the registry.
func TestLazypullBackgroundFetch(t *testing.T) {
	img, coldDigest := coldImage(t)
	cv := convertImage(t, img, estargz.Gzip)
	want := cv.expectedTree(t)
	delete(want, estargz.TOCTarName) // see testLazypullPullRun
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		ref := push(t, reg, "background/converted:v1", cv.image)
		env := newLazyEnv(t, v, reg, lazyOptions{BackgroundFetch: true})
		ctx := env.c.Namespace(t)
		image := env.pull(t, ctx, ref)
		env.checkRemote(t, ctx, image, true)

		// Done when every chunk is in the disk cache.
		chunks := distinctChunks(t, cv)
		var entries float64
		if !waitFor(60*time.Second, func() bool {
			entries = env.metrics(t)["lazypull_cache_disk_entries"]
			return entries >= float64(chunks)
		}) {
			t.Fatalf("background fetch: %v of %d chunks in the disk cache after 60s; registry served %v", entries, chunks, blobBytes(reg))
		}
		if m := env.metrics(t); m[`lazypull_fetch_bytes_total{kind="background"}`] <= 0 {
			t.Errorf("metrics: no background fetch bytes: %v", m[`lazypull_fetch_bytes_total{kind="background"}`])
		}

		if err := reg.Stop(); err != nil {
			t.Fatal(err)
		}
		if out := env.run(t, ctx, image, "sha256sum", "/data/cold"); out != coldDigest.Encoded()+"  /data/cold\n" {
			t.Fatalf("sha256sum with the registry down: %q", out)
		}
		got, err := env.c.ImageTree(ctx, image, lazypullName)
		if err != nil {
			t.Fatalf("reading the rootfs with the registry down: %v", err)
		}
		if d := fixture.Diff(want, got, nil); len(d) > 0 {
			t.Fatalf("rootfs differs (- converted layer tars, + lazypull):\n%s", fixture.FormatDiff(d, 50))
		}
	})
}

// distinctChunks counts the distinct non-empty chunks of cv's layers: what
// the content-addressed cache holds once it has everything.
func distinctChunks(t *testing.T, cv *converted) int {
	t.Helper()
	seen := map[digest.Digest]bool{}
	for i, l := range cv.image.Layers {
		r, err := estargz.Open(bytes.NewReader(l.Data), int64(len(l.Data)), estargz.OpenOptions{})
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		for _, c := range r.Chunks() {
			if c.Size > 0 {
				seen[c.Digest] = true
			}
		}
	}
	return len(seen)
}

// blackholeListener accepts connections on an address and never answers.
type blackholeListener struct {
	l     net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func blackhole(addr string) (*blackholeListener, error) {
	var l net.Listener
	var err error
	for range 50 { // the registry's port was just released
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	b := &blackholeListener{l: l}
	b.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.conns = append(b.conns, c)
			b.mu.Unlock()
			b.wg.Go(func() { io.Copy(io.Discard, c) })
		}
	})
	return b, nil
}

func (b *blackholeListener) accepted() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.conns)
}

func (b *blackholeListener) Close() {
	b.l.Close()
	b.mu.Lock()
	for _, c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// sharedContent is a 300 KiB file every appImage carries.
var sharedContent = func() []byte {
	b := make([]byte, 300<<10)
	rand.New(rand.NewSource(3)).Read(b)
	return b
}()

// appImage is busybox plus one layer with /etc/motd ("image NAME\n") and
// /opt/shared.bin (sharedContent). App images of different names share
// their base layer, converted or not, and a file in their top layers.
func appImage(t *testing.T, name string) *fixture.Image {
	t.Helper()
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	top := fixture.NewLayer().
		File("etc/motd", "image "+name+"\n").
		FileBytes("opt/shared.bin", sharedContent)
	img, err := fixture.BuildImage(fixture.DefaultConfig(), base, top)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestLazypullRestart kills the daemon with SIGKILL (leaving dead FUSE
// mounts) and starts it again: the snapshots are all there with their
// labels, the layers are mounted again, containers of the pulled image run
// and see the same rootfs, and new images pull lazily. Then it does so with
// the registry down: start-up must not wait for it, and the layers come
// back from the saved TOCs and the chunk cache.
func TestLazypullRestart(t *testing.T) {
	cvA := convertImage(t, threeLayerImage(t), estargz.Gzip)
	cvB := convertImage(t, appImage(t, "B"), estargz.Gzip)
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		refA := push(t, reg, "restart/a:v1", cvA.image)
		refB := push(t, reg, "restart/b:v1", cvB.image)
		// A long request timeout: whatever needs the registry while it
		// hangs below blocks long enough to fail the test.
		// In the daemon: this is the restore path of a daemon that serves
		// the layers itself (dead mounts after SIGKILL, layers mounted
		// again from the saved TOCs, unmounted on SIGTERM);
		// TestRestartFuseManager covers restarts with the fuse manager.
		env := newLazyEnv(t, v, reg, lazyOptions{Timeout: time.Minute, ReadTimeout: 2 * time.Minute, InDaemon: true})
		ctx := env.c.Namespace(t)

		a := env.pull(t, ctx, refA)
		if out := env.run(t, ctx, a, "cat", "/etc/motd"); out != "layer 3\n" {
			t.Fatalf("cat: %q", out)
		}
		// Reading the whole tree fetches and caches every chunk.
		treeA, err := env.c.ImageTree(ctx, a, lazypullName)
		if err != nil {
			t.Fatal(err)
		}
		snaps := env.backendSnapshots(t, ctx)
		mounts := env.fuseMounts(t)
		if len(mounts) != len(cvA.manifest.Layers) {
			t.Fatalf("FUSE mounts: %v", mounts)
		}

		checkAfterRestart := func(stage string) {
			t.Helper()
			if d := diffSnapshots(snaps, env.backendSnapshots(t, ctx)); d != "" {
				t.Fatalf("%s: the daemon's snapshots changed:\n%s", stage, d)
			}
			if out := env.run(t, ctx, a, "cat", "/etc/motd"); out != "layer 3\n" {
				t.Fatalf("%s: cat: %q", stage, out)
			}
			got, err := env.c.ImageTree(ctx, a, lazypullName)
			if err != nil {
				t.Fatalf("%s: %v", stage, err)
			}
			if d := fixture.Diff(treeA, got, nil); len(d) > 0 {
				t.Fatalf("%s: rootfs differs from before (- before, + after):\n%s", stage, fixture.FormatDiff(d, 50))
			}
			for mp := range mounts {
				if _, err := os.Stat(mp); err != nil {
					t.Errorf("%s: layer mount %s: %v", stage, mp, err)
				}
			}
			if got := env.fuseMounts(t); len(got) < len(mounts) {
				t.Errorf("%s: FUSE mounts %v, want at least %v", stage, got, mounts)
			}
		}

		// SIGKILL: the FUSE mounts stay behind, dead.
		pid := env.sn.Pid()
		env.restart(t, ctx, true)
		if env.sn.Pid() == pid {
			t.Fatal("the daemon was not restarted")
		}
		checkAfterRestart("after SIGKILL")

		b := env.pull(t, ctx, refB)
		env.checkRemote(t, ctx, b, true)
		if out := env.run(t, ctx, b, "cat", "/etc/motd"); out != "image B\n" {
			t.Fatalf("image B: cat: %q", out)
		}
		snaps = env.backendSnapshots(t, ctx)
		mounts = env.fuseMounts(t)

		// SIGKILL with the registry hanging (accepting connections, never
		// answering): neither start-up nor the remounts may need it.
		if err := reg.Stop(); err != nil {
			t.Fatal(err)
		}
		bh, err := blackhole(reg.Host())
		if err != nil {
			t.Fatal(err)
		}
		logBefore := fileSize(t, env.sn.LogPath())
		if took := env.restart(t, ctx, true); took > 15*time.Second {
			t.Errorf("the daemon took %v to listen with the registry hanging", took)
		}
		checkAfterRestart("after SIGKILL with the registry hanging")
		if out := env.run(t, ctx, b, "cat", "/etc/motd"); out != "image B\n" {
			t.Fatalf("image B with the registry hanging: cat: %q", out)
		}
		restored := regexp.MustCompile(`remote snapshots restored.* failed=(\d+)`)
		var m []string
		waitFor(30*time.Second, func() bool {
			m = restored.FindStringSubmatch(logSince(t, env.sn.LogPath(), logBefore))
			return m != nil
		})
		if m == nil || m[1] != "0" {
			t.Errorf("remounting from the saved TOCs with the registry hanging: %q; log:\n%s", m, logSince(t, env.sn.LogPath(), logBefore))
		}
		if n := bh.accepted(); n != 0 {
			t.Errorf("the daemon connected to the registry %d times after the restart; everything it needed was saved", n)
		}
		bh.Close()

		// A graceful restart with the registry back.
		if err := reg.Start(); err != nil {
			t.Fatal(err)
		}
		env.restart(t, ctx, false)
		checkAfterRestart("after SIGTERM")
	})
}

// diffSnapshots describes how the daemon's snapshots in after differ from
// those in before (name, kind, parent, labels); "" if they do not.
// Only committed snapshots count: containerd removes those of containers
// and views from the daemon in the background.
func diffSnapshots(before, after map[string]snapshots.Info) string {
	var d []string
	before, after = committedOnly(before), committedOnly(after)
	for name, b := range before {
		a, ok := after[name]
		switch {
		case !ok:
			d = append(d, "- "+name)
		case a.Kind != b.Kind || a.Parent != b.Parent || !mapsEqual(a.Labels, b.Labels):
			d = append(d, fmt.Sprintf("~ %s: %v %q %v -> %v %q %v", name, b.Kind, b.Parent, b.Labels, a.Kind, a.Parent, a.Labels))
		}
	}
	for name := range after {
		if _, ok := before[name]; !ok {
			d = append(d, "+ "+name)
		}
	}
	slices.Sort(d)
	return strings.Join(d, "\n")
}

func committedOnly(m map[string]snapshots.Info) map[string]snapshots.Info {
	out := map[string]snapshots.Info{}
	for k, v := range m {
		if v.Kind == snapshots.KindCommitted {
			out[k] = v
		}
	}
	return out
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func fileSize(t *testing.T, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

func logSince(t *testing.T, p string, off int64) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[min(off, int64(len(b))):])
}

// TestLazypullSharedLayer pulls two images that share their (converted)
// busybox base layer: the second pull reuses the first's snapshot of it
// and fetches nothing of it, and a file both images carry in their own top
// layers is read by the second from the chunk cache.
func TestLazypullSharedLayer(t *testing.T) {
	sharedDigest := digest.FromBytes(sharedContent)
	cvA := convertImage(t, appImage(t, "A"), estargz.Gzip)
	cvB := convertImage(t, appImage(t, "B"), estargz.Gzip)
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		refA := push(t, reg, "shared/a:v1", cvA.image)
		refB := push(t, reg, "shared/b:v1", cvB.image)
		baseDesc := cvA.manifest.Layers[0]
		if cvB.manifest.Layers[0].Digest != baseDesc.Digest {
			t.Fatalf("the converted images do not share their base layer: %s, %s", baseDesc.Digest, cvB.manifest.Layers[0].Digest)
		}
		topB := cvB.manifest.Layers[1]
		env := newLazyEnv(t, v, reg, lazyOptions{})
		ctx := env.c.Namespace(t)

		a := env.pull(t, ctx, refA)
		if out := env.run(t, ctx, a, "sha256sum", "/opt/shared.bin"); out != sharedDigest.Encoded()+"  /opt/shared.bin\n" {
			t.Fatalf("image A: %q", out)
		}

		reg.ResetRequests()
		b := env.pull(t, ctx, refB)
		env.checkRemote(t, ctx, b, true)
		afterPull := blobBytes(reg)
		if n := afterPull[baseDesc.Digest]; n != 0 {
			t.Errorf("pulling image B fetched %d bytes of the shared base layer", n)
		}
		if out := env.run(t, ctx, b, "sha256sum", "/opt/shared.bin"); out != sharedDigest.Encoded()+"  /opt/shared.bin\n" {
			t.Fatalf("image B: %q", out)
		}
		afterRun := blobBytes(reg)
		if n := afterRun[baseDesc.Digest]; n != 0 {
			t.Errorf("image B fetched %d bytes of the shared base layer", n)
		}
		if n := afterRun[topB.Digest] - afterPull[topB.Digest]; n != 0 {
			t.Errorf("reading /opt/shared.bin in image B fetched %d bytes of its top layer; its chunk was cached by image A", n)
		}

		// One snapshot and one mount for the base layer.
		var baseSnaps []string
		for name, info := range env.backendSnapshots(t, ctx) {
			if _, d, _ := snapshot.LayerRef(info.Labels); d == baseDesc.Digest.String() {
				baseSnaps = append(baseSnaps, name)
			}
		}
		if len(baseSnaps) != 1 {
			t.Errorf("snapshots of the base layer: %v, want one", baseSnaps)
		}
		var baseMounts []string
		for mp, src := range env.fuseMounts(t) {
			if src == "lazypull:"+baseDesc.Digest.Encoded()[:12] {
				baseMounts = append(baseMounts, mp)
			}
		}
		if len(baseMounts) != 1 {
			t.Errorf("FUSE mounts of the base layer: %v, want one", baseMounts)
		}
		if n := len(env.fuseMounts(t)); n != 3 {
			t.Errorf("%d FUSE mounts, want 3 (base, top A, top B)", n)
		}

		// Another namespace pulling image A shares its snapshots (as
		// "default" and "k8s.io" do): nothing is fetched or mounted.
		reg.ResetRequests()
		ctx2 := env.c.Namespace(t)
		a2 := env.pull(t, ctx2, refA)
		env.checkRemote(t, ctx2, a2, true)
		for _, l := range cvA.manifest.Layers {
			if n := blobBytes(reg)[l.Digest]; n != 0 {
				t.Errorf("pulling image A in a second namespace fetched %d bytes of layer %s", n, l.Digest)
			}
		}
		if out := env.run(t, ctx2, a2, "sha256sum", "/opt/shared.bin"); out != sharedDigest.Encoded()+"  /opt/shared.bin\n" {
			t.Fatalf("image A in a second namespace: %q", out)
		}
		if n := len(env.fuseMounts(t)); n != 3 {
			t.Errorf("%d FUSE mounts after pulling image A in a second namespace, want 3", n)
		}
	})
}

// TestLazypullImageRemoval deletes a lazily pulled image the way `ctr
// image rm --sync` does: containerd's garbage collector removes the
// snapshots from the daemon, which unmounts their layers.
func TestLazypullImageRemoval(t *testing.T) {
	cv := convertImage(t, appImage(t, "A"), estargz.Gzip)
	cvKeep := convertImage(t, appImage(t, "B"), estargz.Gzip)
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		ref := push(t, reg, "gc/remove:v1", cv.image)
		refKeep := push(t, reg, "gc/keep:v1", cvKeep.image)
		env := newLazyEnv(t, v, reg, lazyOptions{})
		ctx := env.c.Namespace(t)

		image := env.pull(t, ctx, ref)
		if out := env.run(t, ctx, image, "cat", "/etc/motd"); out != "image A\n" {
			t.Fatalf("cat: %q", out)
		}
		kept := env.pull(t, ctx, refKeep)
		chains := chainIDs(t, ctx, image)
		keptChains := chainIDs(t, ctx, kept)
		// The base layer is shared, so 3 snapshots and mounts.
		if n := len(env.fuseMounts(t)); n != 3 {
			t.Fatalf("%d FUSE mounts, want 3: %v", n, env.fuseMounts(t))
		}

		if err := env.c.Client().ImageService().Delete(ctx, image.Name(), images.SynchronousDelete()); err != nil {
			t.Fatal(err)
		}
		top := chains[len(chains)-1].String()
		gone := waitFor(20*time.Second, func() bool {
			_, err := env.backend.Stat(ctx, top)
			return err != nil && len(env.fuseMounts(t)) == 2
		})
		if !gone {
			_, err := env.backend.Stat(ctx, top)
			t.Fatalf("after the image's removal: daemon's Stat(%s) = %v; FUSE mounts %v", top, err, env.fuseMounts(t))
		}
		if _, err := env.c.Client().SnapshotService(lazypullName).Stat(ctx, top); err == nil {
			t.Errorf("containerd still has snapshot %s", top)
		}
		// The other image keeps the shared base, and still runs.
		for _, ch := range keptChains {
			if _, err := env.backend.Stat(ctx, ch.String()); err != nil {
				t.Errorf("snapshot %s of the kept image: %v", ch, err)
			}
		}
		if out := env.run(t, ctx, kept, "cat", "/etc/motd"); out != "image B\n" {
			t.Fatalf("kept image: cat: %q", out)
		}

		if err := env.c.Client().ImageService().Delete(ctx, kept.Name(), images.SynchronousDelete()); err != nil {
			t.Fatal(err)
		}
		if !waitFor(20*time.Second, func() bool { return len(env.fuseMounts(t)) == 0 }) {
			t.Fatalf("FUSE mounts left after removing every image: %v", env.fuseMounts(t))
		}
		left := env.backendSnapshots(t, ctx)
		for name, info := range left {
			if info.Labels[snapshot.LabelRemote] == "true" {
				t.Errorf("remote snapshot %s left after removing every image", name)
			}
		}
		if _, err := env.c.Client().GetImage(ctx, image.Name()); !errdefs.IsNotFound(err) {
			t.Errorf("image %s still exists: %v", image.Name(), err)
		}
	})
}
