package integration

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/klauspost/compress/zstd"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/snapshot"
)

// lazypullName is the proxy plugin name containerd knows the daemon by.
const lazypullName = "lazypull"

// landmark is the file every converted layer carries (no prioritized files
// given to the converter), so the converted image's rootfs has it and the
// original's does not.
const landmark = estargz.NoPrefetchLandmark

// lazyOptions are the daemon settings a test needs; the rest of the config
// is the same for every test.
type lazyOptions struct {
	// BackgroundFetch turns on fetching whole layers after mount. Off, the
	// registry request log shows exactly what reads fetched.
	BackgroundFetch bool
	// ReadTimeout is fetch.read_timeout (default 20s); Timeout is
	// fetch.timeout (default 10s); Retries is fetch.retries (default 2).
	ReadTimeout, Timeout time.Duration
	Retries              int
	// Verify turns on whole-layer verification (verify.policy =
	// "background", the daemon's default). Off, the registry request log
	// shows exactly what reads fetched.
	Verify bool
	// InDaemon sets [fuse_manager] enable = false: the daemon serves the
	// layers itself, in its own process, and they go away with it. By
	// default the config has no [fuse_manager] section, so the daemon's
	// default applies: the layers are served by the fuse manager process,
	// which outlives the daemon.
	InDaemon bool
	// Binary, if set, is the daemon binary to run instead of the shared
	// build.
	Binary string
	// ExtraConfig is appended to the config (more [sections]).
	ExtraConfig string
}

// lazyEnv is a lazypull-snapshotter daemon and a containerd of the test's
// version that reaches it as the proxy snapshotter "lazypull".
type lazyEnv struct {
	sn *lab.Snapshotter
	c  *lab.Containerd
	// inDaemon is lazyOptions.InDaemon: the daemon serves the layers.
	inDaemon bool
	// backend talks to the daemon's socket directly, bypassing
	// containerd's metadata: it sees the daemon's own snapshot names
	// (chain IDs for layers) and labels.
	backend snapshots.Snapshotter
}

// newLazyEnv starts the daemon with a config naming reg's hosts.toml
// directory and a metrics endpoint on a free port, and a containerd for v
// with the daemon as proxy plugin.
func newLazyEnv(t *testing.T, v lab.Version, reg *lab.Registry, o lazyOptions) *lazyEnv {
	t.Helper()
	if err := v.Check(); err != nil {
		t.Fatal(err)
	}
	if o.ReadTimeout == 0 {
		o.ReadTimeout = 20 * time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Retries == 0 {
		o.Retries = 2
	}
	hostsDir, err := reg.WriteHostsDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`# lazypull-snapshotter config written by %s
[cache]
max_disk_bytes = 1073741824
max_memory_bytes = 67108864

[fetch]
prefetch = true
background_fetch = %t
timeout = %q
retries = %d
read_timeout = %q

[registry]
hosts_dir = %q

[verify]
policy = %q

[metrics]
address = "127.0.0.1:0"
%s%s`, t.Name(), o.BackgroundFetch, o.Timeout, o.Retries, o.ReadTimeout, hostsDir, verifyPolicy(o.Verify), fuseManagerConfig(o.InDaemon), o.ExtraConfig)
	bin := o.Binary
	if bin == "" {
		bin = lazypullSnapshotter(t)
	}
	sn := lab.NewSnapshotter(t, lab.SnapshotterConfig{
		Binary:   bin,
		Config:   cfg,
		LogLevel: "debug",
	})
	c := lab.NewContainerd(t, lab.ContainerdConfig{
		Version:           v,
		ProxySnapshotters: map[string]string{lazypullName: sn.Address()},
	})
	conn, err := grpc.NewClient("unix://"+sn.Address(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &lazyEnv{sn: sn, c: c, inDaemon: o.InDaemon, backend: proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), lazypullName)}
}

// fuseManagerConfig is the [fuse_manager] section of a test daemon's
// config: with inDaemon, enable = false (the daemon serves the layers
// itself); otherwise none, so that the tests run the daemon's default,
// the fuse manager.
func fuseManagerConfig(inDaemon bool) string {
	if inDaemon {
		return "\n[fuse_manager]\nenable = false\n"
	}
	return ""
}

// pull pulls ref lazily through the daemon.
func (e *lazyEnv) pull(t *testing.T, ctx context.Context, ref string) client.Image {
	t.Helper()
	img, err := e.c.Pull(ctx, ref, lazypullName)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// run runs args in a container of img on the lazypull snapshotter and
// returns its output, failing the test unless it exits 0.
func (e *lazyEnv) run(t *testing.T, ctx context.Context, img client.Image, args ...string) string {
	t.Helper()
	res, err := e.c.Run(ctx, img, lab.RunOptions{Snapshotter: lazypullName, Args: args})
	if err != nil {
		t.Fatalf("run %q: %v", args, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("run %q: %s", args, res)
	}
	return res.Stdout
}

// restart kills (SIGKILL) or stops (SIGTERM) the daemon, starts it again
// and waits until containerd reaches it. It returns how long the daemon
// took to listen. A daemon that serves the layers itself (InDaemon) and
// is stopped gracefully must have unmounted them; a killed one leaves
// them behind. With the fuse manager, the layers stay mounted either way.
func (e *lazyEnv) restart(t *testing.T, ctx context.Context, kill bool) time.Duration {
	t.Helper()
	stop := e.sn.Stop
	if kill {
		stop = e.sn.Kill
	}
	before := e.fuseMounts(t)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	after := e.fuseMounts(t)
	switch {
	case e.inDaemon && !kill && len(after) > 0:
		t.Errorf("FUSE mounts left by the daemon stopped with SIGTERM: %v", after)
	case !e.inDaemon && len(after) != len(before):
		t.Errorf("with the fuse manager, the layer mounts changed when the daemon stopped: %v before, %v after", before, after)
	}
	start := time.Now()
	if err := e.sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if err := e.c.WaitSnapshotter(ctx, lazypullName); err != nil {
		t.Fatal(err)
	}
	return took
}

// chainIDs lists the chain IDs of img's layers, bottom first.
func chainIDs(t *testing.T, ctx context.Context, img client.Image) []digest.Digest {
	t.Helper()
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]digest.Digest, len(diffIDs))
	for i := range diffIDs {
		out[i] = identity.ChainID(diffIDs[:i+1])
	}
	return out
}

// checkRemote asserts that containerd has a committed snapshot of every
// layer of img on the right parent, and that the daemon has them: as
// remote snapshots named by their chain IDs (remote = true), or as
// ordinary committed snapshots, unpacked by containerd (remote = false).
func (e *lazyEnv) checkRemote(t *testing.T, ctx context.Context, img client.Image, remote bool) {
	t.Helper()
	chains := chainIDs(t, ctx, img)
	csn := e.c.Client().SnapshotService(lazypullName)
	for i, ch := range chains {
		parent := ""
		if i > 0 {
			parent = chains[i-1].String()
		}
		cinfo, err := csn.Stat(ctx, ch.String())
		if err != nil || cinfo.Kind != snapshots.KindCommitted || cinfo.Parent != parent {
			t.Errorf("layer %d: containerd's snapshot %s: %+v, %v; want committed on %q", i, ch, cinfo, err, parent)
		}
		if !remote {
			continue
		}
		// containerd commits a remote snapshot under the name the
		// daemon gave it, the chain ID, and its parent's.
		info, err := e.backend.Stat(ctx, ch.String())
		if err != nil {
			t.Fatalf("layer %d: daemon has no snapshot %s: %v", i, ch, err)
		}
		if info.Kind != snapshots.KindCommitted || info.Parent != parent {
			t.Errorf("layer %d: snapshot %s is %v on parent %q, want committed on %q", i, ch, info.Kind, info.Parent, parent)
		}
		if info.Labels[snapshot.LabelRemote] != "true" {
			t.Errorf("layer %d: snapshot %s is not remote: labels %v", i, ch, info.Labels)
		}
	}
	if remote {
		return
	}
	// Unpacked layers are committed by containerd under names of its own
	// ("NAMESPACE/N/CHAIN"); none may be remote.
	committed := 0
	for name, info := range e.backendSnapshots(t, ctx) {
		if info.Kind != snapshots.KindCommitted {
			continue
		}
		committed++
		if info.Labels[snapshot.LabelRemote] != "" {
			t.Errorf("snapshot %s is remote: labels %v", name, info.Labels)
		}
	}
	if committed != len(chains) {
		t.Errorf("the daemon has %d committed snapshots, want %d", committed, len(chains))
	}
}

// backendSnapshots lists the daemon's snapshots by name.
func (e *lazyEnv) backendSnapshots(t *testing.T, ctx context.Context) map[string]snapshots.Info {
	t.Helper()
	out := map[string]snapshots.Info{}
	if err := e.backend.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		out[i.Name] = i
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// fuseMounts lists the daemon's layer mounts (FUSE, lazypull) under its
// root: mount point -> source ("lazypull:<digest prefix>").
func (e *lazyEnv) fuseMounts(t *testing.T) map[string]string {
	t.Helper()
	root, err := filepath.EvalSymlinks(e.sn.Root())
	if err != nil {
		t.Fatal(err)
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, m := range infos {
		if strings.HasPrefix(m.FSType, "fuse") {
			out[m.Mountpoint] = m.Source
		}
	}
	return out
}

// metricsRe finds the metrics address in the daemon's log line
// `msg="serving metrics" address="127.0.0.1:PORT"`.
var metricsRe = regexp.MustCompile(`serving metrics"? address="?([0-9.]+:[0-9]+)`)

// metricsURL is the daemon's Prometheus endpoint: at the address it
// logged last (it listens on a new free port each start).
func (e *lazyEnv) metricsURL(t *testing.T) string {
	t.Helper()
	log, err := os.ReadFile(e.sn.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	all := metricsRe.FindAllSubmatch(log, -1)
	if len(all) == 0 {
		t.Fatalf("the daemon did not log its metrics address")
	}
	return "http://" + string(all[len(all)-1][1]) + "/metrics"
}

// metrics scrapes the daemon's Prometheus endpoint (the address it logged
// last: it listens on a new free port each start) and returns the samples
// by name with labels, e.g. `lazypull_fetch_bytes_total{kind="foreground"}`.
func (e *lazyEnv) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get(e.metricsURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s %v", resp.Status, err)
	}
	return lab.ParseMetrics(body)
}

// blobBytes sums the body bytes the registry served per blob digest for
// the recorded GET requests.
func blobBytes(reg *lab.Registry) map[digest.Digest]int64 {
	out := map[digest.Digest]int64{}
	for _, r := range reg.BlobRequests() {
		i := strings.LastIndex(r.Path, "/blobs/")
		out[digest.Digest(r.Path[i+len("/blobs/"):])] += r.Bytes
	}
	return out
}

// converted is an image converted to eStargz by package convert.
type converted struct {
	// image is the converted image, byte for byte as the converter
	// pushed it (manifest, config, layer blobs), ready to push to a
	// test's registry.
	image    *fixture.Image
	manifest ocispec.Manifest
	config   ocispec.Image
	// tars are the layers' decompressed streams, bottom first.
	tars [][]byte
}

// layerSizes is the total size of the image's layer blobs.
func (cv *converted) layerSizes() int64 {
	var n int64
	for _, l := range cv.manifest.Layers {
		n += l.Size
	}
	return n
}

// expectedTree is the converted image's rootfs computed from its layer
// tars, as an unpacking snapshotter produces it.
func (cv *converted) expectedTree(t *testing.T) fixture.Tree {
	t.Helper()
	tree, err := fixture.ExpectedTree(cv.tars...)
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// push pushes the image to reg as nameTag and returns its reference.
func push(t *testing.T, reg *lab.Registry, nameTag string, img *fixture.Image) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ref, err := reg.Push(ctx, nameTag, img)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

// registryClient is a client of package remote for the test registry.
func registryClient(dir string) (*remote.Registry, error) {
	return remote.New(remote.Options{PlainHTTP: true, HostsDir: dir, RequestTimeout: 30 * time.Second})
}

// Conversions are memoized for the test binary: converting a layer with
// the race detector on takes seconds, and every test image has the same
// busybox base.
var conversions struct {
	mu sync.Mutex
	m  map[string]*conversion
}

type conversion struct {
	once sync.Once
	cv   *converted
	err  error
}

// convertImage converts img with package convert (the code of `lazypull
// convert`), from and to an in-process registry, with the given
// compression; the result is memoized. It checks that every converted
// layer carries the annotations lazypull needs and decompresses to the
// diff ID the new config lists.
func convertImage(t *testing.T, img *fixture.Image, comp estargz.Compression) *converted {
	t.Helper()
	key := img.Descriptor().Digest.String() + " " + comp.String()
	conversions.mu.Lock()
	if conversions.m == nil {
		conversions.m = map[string]*conversion{}
	}
	c := conversions.m[key]
	if c == nil {
		c = &conversion{}
		conversions.m[key] = c
	}
	conversions.mu.Unlock()
	c.once.Do(func() { c.cv, c.err = doConvert(img, comp) })
	if c.err != nil {
		t.Fatalf("converting to %s: %v", comp, c.err)
	}
	return c.cv
}

func doConvert(img *fixture.Image, comp estargz.Compression) (*converted, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "lazypull-convert-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	reg, err := lab.StartRegistry(lab.RegistryConfig{})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	srcRef, err := reg.Push(ctx, "convert/src:v1", img)
	if err != nil {
		return nil, err
	}
	rc, err := registryClient(dir)
	if err != nil {
		return nil, err
	}
	src, err := convert.OpenStore(srcRef, rc)
	if err != nil {
		return nil, err
	}
	dstRef := reg.Ref("convert/dst:v1")
	dst, err := convert.OpenStore(dstRef, rc)
	if err != nil {
		return nil, err
	}
	res, err := convert.Convert(ctx, src, dst, convert.Options{
		Build:   estargz.BuildOptions{Compression: comp},
		TempDir: dir,
	})
	if err != nil {
		return nil, fmt.Errorf("convert %s -> %s: %w", srcRef, dstRef, err)
	}
	cv := &converted{image: &fixture.Image{}}
	out := cv.image
	if out.ManifestBytes, err = fetchAll(ctx, rc, dstRef, res.Desc); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(out.ManifestBytes, &out.Manifest); err != nil {
		return nil, err
	}
	cv.manifest = out.Manifest
	if out.ConfigBytes, err = fetchAll(ctx, rc, dstRef, out.Manifest.Config); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(out.ConfigBytes, &out.Config); err != nil {
		return nil, err
	}
	cv.config = out.Config
	if len(cv.manifest.Layers) != len(img.Layers) || len(cv.config.RootFS.DiffIDs) != len(img.Layers) {
		return nil, fmt.Errorf("converted image has %d layers and %d diff IDs, want %d", len(cv.manifest.Layers), len(cv.config.RootFS.DiffIDs), len(img.Layers))
	}
	for i, l := range cv.manifest.Layers {
		if l.Annotations[estargz.TOCDigestAnnotation] == "" {
			return nil, fmt.Errorf("converted layer %d has no %s annotation: %+v", i, estargz.TOCDigestAnnotation, l)
		}
		blob, err := fetchAll(ctx, rc, dstRef, l)
		if err != nil {
			return nil, err
		}
		plain, err := decompress(blob, comp)
		if err != nil {
			return nil, fmt.Errorf("converted layer %d: %w", i, err)
		}
		lb := fixture.NewLayerBlob(l.MediaType, blob, plain, l.Annotations)
		if lb.DiffID != cv.config.RootFS.DiffIDs[i] {
			return nil, fmt.Errorf("converted layer %d: diff ID %s, config says %s", i, lb.DiffID, cv.config.RootFS.DiffIDs[i])
		}
		if lb.Descriptor().Digest != l.Digest {
			return nil, fmt.Errorf("converted layer %d: fetched %s, want %s", i, lb.Descriptor().Digest, l.Digest)
		}
		out.Layers = append(out.Layers, lb)
		cv.tars = append(cv.tars, plain)
	}
	if out.Descriptor().Digest != res.Desc.Digest {
		return nil, fmt.Errorf("converted manifest %s, fetched %s", res.Desc.Digest, out.Descriptor().Digest)
	}
	return cv, nil
}

func fetchAll(ctx context.Context, rc *remote.Registry, ref string, desc ocispec.Descriptor) ([]byte, error) {
	r, err := rc.Fetch(ctx, ref, desc)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", desc.Digest, err)
	}
	return b, nil
}

// decompress returns the uncompressed stream of a gzip (multi-member) or
// zstd (multi-frame, skippable frames skipped) blob.
func decompress(blob []byte, comp estargz.Compression) ([]byte, error) {
	if comp == estargz.Zstd {
		d, err := zstd.NewReader(bytes.NewReader(blob))
		if err != nil {
			return nil, err
		}
		defer d.Close()
		return io.ReadAll(d)
	}
	z, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		return nil, err
	}
	return io.ReadAll(z)
}

// rawXattrs lists every extended attribute of p, including those WalkTree
// leaves out as overlayfs' own.
func rawXattrs(p string) ([]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name != "" {
			out = append(out, name)
		}
	}
	return out, nil
}

// waitFor polls cond every 50ms until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func verifyPolicy(on bool) string {
	if on {
		return "background"
	}
	return "off"
}
