// Package bench measures cold starts: the time from "pull" to a
// container's first useful output, over an emulated WAN link, for a full
// pull with containerd's overlayfs snapshotter and for lazypull with plain
// and with optimized (prioritized) eStargz images. It reports each mode
// against the full pull and against a lower limit: the same container's
// time with the image already local, plus the compressed bytes the
// workload actually reads divided by the bandwidth, plus three round trips.
package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/bench/images"
	"github.com/lazypull/lazypull/bench/wan"
	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/remote"
)

// Mode is how an image is pulled and run.
type Mode string

// The modes compared.
const (
	// ModeFull pulls the original image with overlayfs (download, unpack).
	ModeFull Mode = "full-pull"
	// ModeLazy pulls the eStargz image (no prefetch hints) with lazypull.
	ModeLazy Mode = "lazypull"
	// ModeOptimized pulls the eStargz image whose start-up files were
	// recorded and prioritized, with lazypull.
	ModeOptimized Mode = "lazypull-optimized"
)

// Modes lists every mode in report order.
var Modes = []Mode{ModeFull, ModeLazy, ModeOptimized}

// DefaultProfiles are the WAN links measured.
func DefaultProfiles() []wan.Profile {
	return []wan.Profile{
		{Name: "40ms-100Mbit", RTT: 40 * time.Millisecond, BitsPerSecond: 100_000_000},
		{Name: "2ms-1Gbit", RTT: 2 * time.Millisecond, BitsPerSecond: 1_000_000_000},
	}
}

// Config tunes a benchmark run.
type Config struct {
	// Images to measure.
	Images []images.Spec
	// Profiles are the WAN links.
	Profiles []wan.Profile
	// Modes to measure (default all).
	Modes []Mode
	// Repeats per image, mode and profile (default 3); the median counts.
	Repeats int
	// CacheDir keeps built images and the registry's storage between runs.
	CacheDir string
	// Snapshotter is the lazypull-snapshotter binary.
	Snapshotter string
	// SnapshotterConfig is extra TOML for the daemon (fetch settings).
	SnapshotterConfig string
	// Log receives progress lines.
	Log io.Writer
}

// Sample is one cold start.
type Sample struct {
	Image, Profile string
	Mode           Mode
	Repeat         int
	PullSeconds    float64 // until the image is ready to run
	ReadySeconds   float64 // from task start to the ready line
	TotalSeconds   float64
	BytesReceived  int64 // over the WAN link
	PeakRSSBytes   int64 // lazypull-snapshotter's VmHWM (0 for full pulls)
	ReadyLine      string
}

// Limit is an image's lower bound on a profile.
type Limit struct {
	Image, Profile string
	// LocalSeconds is the workload's time with the image local and warm.
	LocalSeconds float64
	// ReadBytes is the compressed size of the chunks the workload reads.
	ReadBytes int64
	// Seconds is LocalSeconds + ReadBytes/bandwidth + 3 RTT.
	Seconds float64
}

// Result is the outcome of a benchmark run.
type Result struct {
	Started    time.Time
	Host       string
	Containerd string
	Profiles   []wan.Profile
	Images     []ImageInfo
	Samples    []Sample
	Limits     []Limit
	Summary    []Summary
}

// ImageInfo describes a measured image.
type ImageInfo struct {
	Name, Description string
	Layers            int
	CompressedBytes   int64 // original image
	UncompressedBytes int64
	EStargzBytes      int64
	PrioritizedFiles  int
	OriginalRef, Lazy string
	Optimized         string
}

// Summary is the median of one image, mode and profile.
type Summary struct {
	Image, Profile string
	Mode           Mode
	PullSeconds    float64
	ReadySeconds   float64
	TotalSeconds   float64
	BytesReceived  int64
	PeakRSSBytes   int64
	VsFullPull     float64 // TotalSeconds / full pull's
	VsLimit        float64 // TotalSeconds / limit
}

// Runner runs the benchmark.
type Runner struct {
	cfg     Config
	reg     *lab.Registry
	remote  *remote.Registry
	builder *images.Builder
	log     io.Writer
	infos   map[string]*ImageInfo
	reads   map[string][]string // image -> recorded start-up files
	// readBytes is, per image, the compressed size of the chunks read at
	// start-up.
	readBytes map[string]int64
}

// NewRunner checks the configuration.
func NewRunner(cfg Config) (*Runner, error) {
	if cfg.Repeats <= 0 {
		cfg.Repeats = 3
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = Modes
	}
	if len(cfg.Profiles) == 0 {
		cfg.Profiles = DefaultProfiles()
	}
	if cfg.Log == nil {
		cfg.Log = os.Stderr
	}
	if cfg.Snapshotter == "" {
		return nil, errors.New("bench: no lazypull-snapshotter binary")
	}
	if err := lab.Containerd2().Check(); err != nil {
		return nil, fmt.Errorf("bench: %w (run hack/install-deps.sh)", err)
	}
	return &Runner{cfg: cfg, log: cfg.Log, infos: map[string]*ImageInfo{}, reads: map[string][]string{}, readBytes: map[string]int64{},
		builder: &images.Builder{CacheDir: cfg.CacheDir, Log: cfg.Log}}, nil
}

func (r *Runner) logf(format string, args ...any) {
	fmt.Fprintf(r.log, "bench: "+format+"\n", args...)
}

// Run builds and pushes the images, records their start-up reads, measures
// every combination and returns the result.
func (r *Runner) Run(ctx context.Context) (*Result, error) {
	res := &Result{Started: time.Now().UTC(), Profiles: r.cfg.Profiles, Containerd: lab.Containerd2().Name}
	res.Host, _ = os.Hostname()
	reg, err := lab.StartRegistry(lab.RegistryConfig{RootDir: filepath.Join(r.cfg.CacheDir, "registry")})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	r.reg = reg
	if r.remote, err = remote.New(remote.Options{}); err != nil {
		return nil, err
	}
	for _, spec := range r.cfg.Images {
		if err := r.prepare(ctx, spec); err != nil {
			return nil, fmt.Errorf("preparing %s: %w", spec.Name, err)
		}
		res.Images = append(res.Images, *r.infos[spec.Name])
	}
	total := len(r.cfg.Images) * len(r.cfg.Profiles) * len(r.cfg.Modes) * r.cfg.Repeats
	done := 0
	for _, p := range r.cfg.Profiles {
		px, err := wan.Listen("127.0.0.1:0", reg.Host(), p)
		if err != nil {
			return nil, err
		}
		for _, spec := range r.cfg.Images {
			info := r.infos[spec.Name]
			for rep := 1; rep <= r.cfg.Repeats; rep++ {
				for _, mode := range r.cfg.Modes {
					done++
					ref := px.Addr() + "/" + refFor(info, mode)
					s, err := r.measure(ctx, spec, mode, ref, px)
					if err != nil {
						px.Close()
						return nil, fmt.Errorf("%s %s %s #%d: %w", spec.Name, mode, p, rep, err)
					}
					s.Profile, s.Repeat = p.Name, rep
					res.Samples = append(res.Samples, s)
					r.logf("[%d/%d] %-7s %-19s %-13s #%d  pull %6.2fs  ready %6.2fs  total %6.2fs  %7.1f MB  rss %s",
						done, total, spec.Name, mode, p.Name, rep, s.PullSeconds, s.ReadySeconds, s.TotalSeconds,
						float64(s.BytesReceived)/1e6, mb(s.PeakRSSBytes))
				}
			}
			lim, err := r.limit(ctx, spec, p)
			if err != nil {
				px.Close()
				return nil, fmt.Errorf("limit of %s: %w", spec.Name, err)
			}
			res.Limits = append(res.Limits, lim)
		}
		px.Close()
	}
	res.Summary = summarize(res)
	return res, nil
}

func mb(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f MB", float64(n)/1e6)
}

func refFor(info *ImageInfo, m Mode) string {
	switch m {
	case ModeLazy:
		return info.Lazy
	case ModeOptimized:
		return info.Optimized
	}
	return info.OriginalRef
}

func (r *Runner) remoteClient() *remote.Registry {
	if r.remote == nil {
		r.remote, _ = remote.New(remote.Options{})
	}
	return r.remote
}

// prepare builds the image, pushes the original, converts it, records its
// start-up reads and pushes the optimized conversion.
func (r *Runner) prepare(ctx context.Context, spec images.Spec) error {
	layout, err := r.builder.Build(ctx, spec)
	if err != nil {
		return err
	}
	src, err := convert.OpenStore(convert.LayoutPrefix+layout+":v1", nil)
	if err != nil {
		return err
	}
	info := &ImageInfo{Name: spec.Name, Description: spec.Description,
		OriginalRef: "bench/" + spec.Name + ":orig", Lazy: "bench/" + spec.Name + ":esgz", Optimized: "bench/" + spec.Name + ":esgz-opt"}
	r.infos[spec.Name] = info
	dst, err := convert.OpenStore(r.reg.Ref(info.OriginalRef), r.remote)
	if err != nil {
		return err
	}
	m, err := copyImage(ctx, src, dst)
	if err != nil {
		return fmt.Errorf("pushing the original: %w", err)
	}
	info.Layers = len(m.Layers)
	for _, l := range m.Layers {
		info.CompressedBytes += l.Size
	}
	r.logf("%s: converting to eStargz", spec.Name)
	lazyDst, _ := convert.OpenStore(r.reg.Ref(info.Lazy), r.remote)
	if _, err := convert.Convert(ctx, src, lazyDst, convert.Options{}); err != nil {
		return fmt.Errorf("converting: %w", err)
	}
	lm, err := r.manifest(ctx, r.reg.Ref(info.Lazy))
	if err != nil {
		return err
	}
	for _, l := range lm.Layers {
		info.EStargzBytes += l.Size
		if n, err := strconv.ParseInt(l.Annotations[estargz.UncompressedSizeAnnotation], 10, 64); err == nil {
			info.UncompressedBytes += n
		}
	}
	r.logf("%s: recording start-up reads", spec.Name)
	reads, readBytes, err := r.record(ctx, spec, r.reg.Ref(info.Lazy))
	if err != nil {
		return fmt.Errorf("recording: %w", err)
	}
	r.reads[spec.Name] = reads
	r.readBytes[spec.Name] = readBytes
	info.PrioritizedFiles = len(reads)
	optDst, _ := convert.OpenStore(r.reg.Ref(info.Optimized), r.remote)
	if _, err := convert.Convert(ctx, src, optDst, convert.Options{Build: estargz.BuildOptions{Prioritized: reads}}); err != nil {
		return fmt.Errorf("converting with prioritized files: %w", err)
	}
	return nil
}

func (r *Runner) manifest(ctx context.Context, ref string) (*ocispec.Manifest, error) {
	img, err := r.remote.Resolve(ctx, ref, nil)
	if err != nil {
		return nil, err
	}
	return &img.Manifest, nil
}

// env is one cold machine: a fresh containerd and, for lazypull modes, a
// fresh snapshotter with an empty cache.
type env struct {
	dir string
	c   *lab.Containerd
	sn  *lab.Snapshotter
}

func (r *Runner) startEnv(ctx context.Context, lazy bool, extraConfig string) (*env, error) {
	dir, err := os.MkdirTemp("/tmp", "lpb-")
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir}
	proxies := map[string]string{}
	if lazy {
		e.sn, err = lab.StartSnapshotter(ctx, lab.SnapshotterConfig{
			Binary: r.cfg.Snapshotter, Dir: filepath.Join(dir, "s"),
			Config: extraConfig + r.cfg.SnapshotterConfig, LogLevel: "info",
		})
		if err != nil {
			e.close()
			return nil, fmt.Errorf("starting lazypull-snapshotter: %w", err)
		}
		proxies["lazypull"] = e.sn.Address()
	}
	e.c, err = lab.StartContainerd(ctx, lab.ContainerdConfig{Version: lab.Containerd2(), Dir: filepath.Join(dir, "c"), ProxySnapshotters: proxies, LogLevel: "warn"})
	if err != nil {
		e.close()
		return nil, fmt.Errorf("starting containerd: %w", err)
	}
	return e, nil
}

func (e *env) close() {
	if e.c != nil {
		e.c.Close()
	}
	if e.sn != nil {
		e.sn.Close()
	}
	os.RemoveAll(e.dir)
}

// record runs the lazy image once with read recording on and returns the
// files read, in order, and the compressed size of the chunks read.
func (r *Runner) record(ctx context.Context, spec images.Spec, ref string) ([]string, int64, error) {
	recDir, err := os.MkdirTemp("", "lazypull-record-")
	if err != nil {
		return nil, 0, err
	}
	defer os.RemoveAll(recDir)
	e, err := r.startEnv(ctx, true, fmt.Sprintf("record_dir = %q\n", recDir))
	if err != nil {
		return nil, 0, err
	}
	defer e.close()
	ctx = namespaces.WithNamespace(ctx, "bench")
	img, err := e.c.Pull(ctx, ref, "lazypull")
	if err != nil {
		return nil, 0, err
	}
	if _, _, err := runUntilReady(ctx, e.c, img, "lazypull", spec); err != nil {
		return nil, 0, err
	}
	b, err := os.ReadFile(filepath.Join(recDir, lfs.RecordFileName(ref)))
	if err != nil {
		return nil, 0, fmt.Errorf("reading the record: %w", err)
	}
	seen := map[string]bool{}
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l != "" && !seen[l] {
			seen[l] = true
			out = append(out, l)
		}
	}
	// The compressed extents of the chunks read: what the workload needed.
	cb, err := os.ReadFile(filepath.Join(recDir, lfs.RecordFileName(ref)+".chunks"))
	if err != nil {
		return nil, 0, fmt.Errorf("reading the chunk record: %w", err)
	}
	type extent struct {
		layer    string
		off, end int64
	}
	extents := map[extent]bool{}
	var readBytes int64
	for _, l := range strings.Split(strings.TrimSpace(string(cb)), "\n") {
		var x extent
		if _, err := fmt.Sscanf(l, "%s %d %d", &x.layer, &x.off, &x.end); err != nil {
			continue
		}
		if !extents[x] {
			extents[x] = true
			readBytes += x.end - x.off
		}
	}
	return out, readBytes, nil
}

// measure runs one cold start.
func (r *Runner) measure(ctx context.Context, spec images.Spec, mode Mode, ref string, px *wan.Proxy) (Sample, error) {
	lazy := mode != ModeFull
	e, err := r.startEnv(ctx, lazy, "")
	if err != nil {
		return Sample{}, err
	}
	defer e.close()
	dropCaches()
	sn := "overlayfs"
	if lazy {
		sn = "lazypull"
	}
	ctx = namespaces.WithNamespace(ctx, "bench")
	px.ResetCounters()
	start := time.Now()
	img, err := e.c.Pull(ctx, ref, sn)
	if err != nil {
		return Sample{}, err
	}
	pulled := time.Now()
	ready, line, err := runUntilReady(ctx, e.c, img, sn, spec)
	if err != nil {
		return Sample{}, err
	}
	_, recv := px.Bytes()
	s := Sample{
		Image: spec.Name, Mode: mode,
		PullSeconds:   pulled.Sub(start).Seconds(),
		ReadySeconds:  ready.Seconds(),
		TotalSeconds:  pulled.Sub(start).Seconds() + ready.Seconds(),
		BytesReceived: recv,
		ReadyLine:     line,
	}
	if lazy {
		s.PeakRSSBytes = peakRSS(e.sn.Pid())
	}
	return s, nil
}

// limit measures the warm local time and computes the image's bound.
func (r *Runner) limit(ctx context.Context, spec images.Spec, p wan.Profile) (Limit, error) {
	info := r.infos[spec.Name]
	e, err := r.startEnv(ctx, false, "")
	if err != nil {
		return Limit{}, err
	}
	defer e.close()
	ctx = namespaces.WithNamespace(ctx, "bench")
	img, err := e.c.Pull(ctx, r.reg.Ref(info.OriginalRef), "overlayfs")
	if err != nil {
		return Limit{}, err
	}
	var best time.Duration
	for i := 0; i < 3; i++ {
		d, _, err := runUntilReady(ctx, e.c, img, "overlayfs", spec)
		if err != nil {
			return Limit{}, err
		}
		if i > 0 && (best == 0 || d < best) { // the first run warms the page cache
			best = d
		}
	}
	readBytes := r.readBytes[spec.Name]
	l := Limit{Image: spec.Name, Profile: p.Name, LocalSeconds: best.Seconds(), ReadBytes: readBytes}
	l.Seconds = l.LocalSeconds + 3*p.RTT.Seconds()
	if bps := p.BytesPerSecond(); bps > 0 {
		l.Seconds += float64(readBytes) / bps
	}
	return l, nil
}

// runUntilReady starts the workload and returns the time from task start
// to its ready line.
func runUntilReady(ctx context.Context, c *lab.Containerd, img client.Image, snapshotter string, spec images.Spec) (time.Duration, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	id := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	ctr, err := c.Client().NewContainer(ctx, id,
		client.WithImage(img),
		client.WithSnapshotter(snapshotter),
		client.WithNewSnapshot(id+"-rootfs", img),
		c.RuntimeOpt(),
		client.WithNewSpec(oci.WithImageConfig(img), c.WithCgroup(), oci.WithProcessArgs(spec.Cmd...)),
	)
	if err != nil {
		return 0, "", fmt.Errorf("creating the container: %w", err)
	}
	defer ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup)
	watch := newLineWatcher(spec.Ready)
	var stderr bytes.Buffer
	task, err := ctr.NewTask(ctx, c.IO(nil, watch, &stderr))
	if err != nil {
		return 0, "", fmt.Errorf("creating the task: %w", err)
	}
	defer task.Delete(context.WithoutCancel(ctx), client.WithProcessKill)
	exit, err := task.Wait(ctx)
	if err != nil {
		return 0, "", err
	}
	start := time.Now()
	if err := task.Start(ctx); err != nil {
		return 0, "", fmt.Errorf("starting the task: %w", err)
	}
	select {
	case at := <-watch.ready:
		return at.Sub(start), watch.line(), nil
	case st := <-exit:
		// The ready line may race the exit.
		select {
		case at := <-watch.ready:
			return at.Sub(start), watch.line(), nil
		case <-time.After(time.Second):
		}
		return 0, "", fmt.Errorf("workload exited with %d before its ready line; output:\n%s\n%s", st.ExitCode(), watch.output(), stderr.String())
	case <-ctx.Done():
		return 0, "", fmt.Errorf("no ready line: %w; output so far:\n%s", ctx.Err(), watch.output())
	}
}

// lineWatcher timestamps the first output line starting with a prefix.
type lineWatcher struct {
	prefix string
	ready  chan time.Time
	mu     sync.Mutex
	buf    bytes.Buffer
	found  string
	once   sync.Once
}

func newLineWatcher(prefix string) *lineWatcher {
	return &lineWatcher{prefix: prefix, ready: make(chan time.Time, 1)}
}

func (w *lineWatcher) Write(p []byte) (int, error) {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	sc := bufio.NewScanner(bytes.NewReader(w.buf.Bytes()))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), w.prefix) {
			line := sc.Text()
			w.once.Do(func() {
				w.found = line
				w.ready <- now
			})
		}
	}
	return len(p), nil
}

func (w *lineWatcher) line() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.found
}

func (w *lineWatcher) output() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// dropCaches empties the page cache so every start is cold.
func dropCaches() {
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
}

// peakRSS returns a process's VmHWM in bytes.
func peakRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			f := strings.Fields(v)
			if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				return n * 1024
			}
		}
	}
	return 0
}

// copyImage copies a single-manifest image between stores.
func copyImage(ctx context.Context, src, dst convert.Store) (*ocispec.Manifest, error) {
	desc, raw, err := src.Root(ctx)
	if err != nil {
		return nil, err
	}
	m, err := parseManifest(raw)
	if err != nil {
		return nil, err
	}
	for _, b := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		ok, err := dst.Exists(ctx, b)
		if err != nil {
			return nil, err
		}
		if ok {
			continue
		}
		rc, err := src.Fetch(ctx, b)
		if err != nil {
			return nil, err
		}
		err = dst.Push(ctx, b, rc)
		rc.Close()
		if err != nil {
			return nil, err
		}
	}
	return m, dst.PushManifest(ctx, desc, raw, true)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func summarize(res *Result) []Summary {
	type key struct {
		img, prof string
		mode      Mode
	}
	groups := map[key][]Sample{}
	var order []key
	for _, s := range res.Samples {
		k := key{s.Image, s.Profile, s.Mode}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], s)
	}
	limits := map[[2]string]float64{}
	for _, l := range res.Limits {
		limits[[2]string{l.Image, l.Profile}] = l.Seconds
	}
	var out []Summary
	full := map[[2]string]float64{}
	for _, k := range order {
		ss := groups[k]
		var pull, ready, total, bytes, rss []float64
		for _, s := range ss {
			pull = append(pull, s.PullSeconds)
			ready = append(ready, s.ReadySeconds)
			total = append(total, s.TotalSeconds)
			bytes = append(bytes, float64(s.BytesReceived))
			rss = append(rss, float64(s.PeakRSSBytes))
		}
		sum := Summary{Image: k.img, Profile: k.prof, Mode: k.mode,
			PullSeconds: median(pull), ReadySeconds: median(ready), TotalSeconds: median(total),
			BytesReceived: int64(median(bytes)), PeakRSSBytes: int64(slicesMax(rss))}
		if k.mode == ModeFull {
			full[[2]string{k.img, k.prof}] = sum.TotalSeconds
		}
		out = append(out, sum)
	}
	for i := range out {
		s := &out[i]
		if f := full[[2]string{s.Image, s.Profile}]; f > 0 {
			s.VsFullPull = s.TotalSeconds / f
		}
		if l := limits[[2]string{s.Image, s.Profile}]; l > 0 {
			s.VsLimit = s.TotalSeconds / l
		}
	}
	return out
}

func slicesMax(xs []float64) float64 {
	m := 0.0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}
