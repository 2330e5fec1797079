package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazypull/lazypull/bench/wan"
	"github.com/lazypull/lazypull/convert"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/lab"
)

// ErrNotReady is returned (wrapped) when the workload did not print its
// ready line in time or exited without it.
var ErrNotReady = errors.New("workload never became ready")

// checkProxies makes sure every proxy snapshotter that is measured
// answers on its socket, before anything is started.
func (r *Runner) checkProxies(ctx context.Context) error {
	for _, m := range r.cfg.Modes {
		sock, ok := r.cfg.Proxies[string(m)]
		if !ok {
			continue
		}
		if err := pingSnapshotter(ctx, string(m), sock); err != nil {
			return err
		}
	}
	return nil
}

// pingSnapshotter asks the snapshotter at sock for a snapshot that does
// not exist: it must answer (not found) within a few seconds.
func pingSnapshotter(ctx context.Context, name, sock string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("snapshotter %s at %s: %w", name, sock, err)
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name)
	_, err = sn.Stat(namespaces.WithNamespace(ctx, "bench"), "lazypull-bench-ping")
	if err == nil || errdefs.IsNotFound(err) {
		return nil
	}
	return fmt.Errorf("snapshotter %s at %s does not answer: %w", name, sock, err)
}

// EnvDirPrefix starts the names of the directories under /tmp that hold
// one run's containerd and snapshotter; each is removed after its run.
// EnvDirPattern gives the names one process uses.
const EnvDirPrefix = "lpbr"

// EnvDirPattern is the glob pattern of the run directories the process
// with the given pid makes: /tmp/lpbr<pid>-*. (The pid in the name lets a
// test tell its own from those of another bench running beside it.)
func EnvDirPattern(pid int) string {
	return "/tmp/" + envDirPrefix(pid) + "*"
}

func envDirPrefix(pid int) string { return EnvDirPrefix + strconv.Itoa(pid) + "-" }

// env is one cold machine: a fresh containerd and, for lazypull modes and
// the peer, a fresh snapshotter with an empty cache and root.
type env struct {
	dir         string
	c           *lab.Containerd
	sn          *lab.Snapshotter
	metricsAddr string // lazypull's
}

// daemonKind says which snapshotter an env starts besides containerd.
type daemonKind int

const (
	noDaemon daemonKind = iota
	lazypullDaemon
	peerDaemon
)

func kindOf(m Mode) daemonKind {
	switch {
	case m.lazypull():
		return lazypullDaemon
	case m == ModePeer:
		return peerDaemon
	}
	return noDaemon
}

// startEnv starts a cold machine. For lazypull, topConfig goes at the top
// of the daemon's TOML (before any table) and tables after the user's.
func (r *Runner) startEnv(ctx context.Context, kind daemonKind, topConfig, tables string) (_ *env, retErr error) {
	// Directly under /tmp: containerd's shim sockets must have short paths.
	dir, err := os.MkdirTemp("/tmp", envDirPrefix(os.Getpid()))
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir}
	defer func() {
		if retErr != nil {
			e.close()
		}
	}()
	proxies := map[string]string{}
	for name, sock := range r.cfg.Proxies {
		proxies[name] = sock
	}
	switch kind {
	case lazypullDaemon:
		if e.metricsAddr, err = freeAddr(); err != nil {
			return nil, err
		}
		e.sn, err = lab.StartSnapshotter(ctx, lab.SnapshotterConfig{
			Binary: r.cfg.Snapshotter, Dir: filepath.Join(dir, "s"),
			// pprof: the daemon is a throwaway on loopback; its CPU can be
			// profiled during a run (see docs/benchmarks.md).
			Config:   fmt.Sprintf("%s%s\n%s[metrics]\naddress = %q\npprof = true\n", topConfig, r.cfg.SnapshotterConfig, tables, e.metricsAddr),
			LogLevel: "info",
		})
		if err != nil {
			return nil, fmt.Errorf("starting lazypull-snapshotter: %w", err)
		}
		proxies["lazypull"] = e.sn.Address()
	case peerDaemon:
		e.sn, err = lab.StartSnapshotter(ctx, lab.SnapshotterConfig{
			Binary: r.cfg.Peer, Dir: filepath.Join(dir, "p"), Config: r.cfg.PeerConfig, LogLevel: "info",
		})
		if err != nil {
			return nil, fmt.Errorf("starting %s: %w", ModePeer, err)
		}
		proxies[string(ModePeer)] = e.sn.Address()
	}
	e.c, err = lab.StartContainerd(ctx, lab.ContainerdConfig{Version: lab.Containerd2(), Dir: filepath.Join(dir, "c"), ProxySnapshotters: proxies, LogLevel: "warn"})
	if err != nil {
		return nil, fmt.Errorf("starting containerd: %w", err)
	}
	return e, nil
}

// freeAddr returns a free TCP address on 127.0.0.1.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
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

func (r *Runner) snapshotterOf(m Mode) string {
	switch {
	case m == ModeFull:
		return "overlayfs"
	case m.lazypull():
		return "lazypull"
	}
	return string(m)
}

// record runs the lazy image once with read recording on and returns the
// files read, in order, and the compressed size of the chunks read.
func (r *Runner) record(ctx context.Context, w Workload, ref string) ([]string, int64, error) {
	recDir, err := os.MkdirTemp(r.tmp, "record-")
	if err != nil {
		return nil, 0, err
	}
	defer os.RemoveAll(recDir)
	e, err := r.startEnv(ctx, lazypullDaemon, fmt.Sprintf("record_dir = %q\n", recDir), "")
	if err != nil {
		return nil, 0, err
	}
	defer e.close()
	ctx = namespaces.WithNamespace(ctx, "bench")
	img, err := e.c.Pull(ctx, ref, "lazypull", client.WithPlatformMatcher(r.match))
	if err != nil {
		return nil, 0, err
	}
	if _, err := r.runWorkload(ctx, e.c, img, "lazypull", w); err != nil {
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
func (r *Runner) measure(ctx context.Context, w Workload, mode Mode, ref string, px *wan.Proxy, tag string) (Sample, error) {
	lazy := mode.lazypull()
	kind := kindOf(mode)
	r.logf("%s: starting a fresh containerd%s", tag, map[daemonKind]string{lazypullDaemon: " and lazypull-snapshotter", peerDaemon: " and " + string(ModePeer)}[kind])
	e, err := r.startEnv(ctx, kind, "", mode.profileConfig())
	if err != nil {
		return Sample{}, err
	}
	defer e.close()
	dropCaches()
	sn := r.snapshotterOf(mode)
	ctx = namespaces.WithNamespace(ctx, "bench")
	if px != nil {
		px.ResetCounters()
	}
	r.logf("%s: pulling %s", tag, ref)
	var cpu0 float64
	if e.sn != nil {
		cpu0 = processesCPU(snapshotterPids(e.sn))
	}
	rec := &recorder{start: time.Now()}
	img, err := e.c.Pull(ctx, ref, sn, client.WithResolver(rec.wrap(r.cfg.Resolver())), client.WithPlatformMatcher(r.match))
	if err != nil {
		return Sample{}, err
	}
	pulled := time.Now()
	r.logf("%s: pulled in %.2fs; running the container", tag, pulled.Sub(rec.start).Seconds())
	t, err := r.runWorkload(ctx, e.c, img, sn, w)
	if err != nil {
		return Sample{}, err
	}
	var cpu1 float64
	if e.sn != nil {
		cpu1 = processesCPU(snapshotterPids(e.sn))
	}
	if _, proxied := r.cfg.Proxies[string(mode)]; proxied {
		// The proxy snapshotter outlives the run: deleting the image with
		// a synchronous garbage collection removes its snapshots, so the
		// next run pulls again.
		if err := e.c.Client().ImageService().Delete(ctx, img.Name(), images.SynchronousDelete()); err != nil {
			r.logf("%s: removing the image from %s: %v", tag, mode, err)
		}
	}
	s := Sample{Image: w.Name, Mode: mode, Ref: ref, ReadyLine: t.line}
	s.Requests = rec.requests()
	if lazy {
		dl, m, err := daemonSnapshot(ctx, e.metricsAddr, rec.start)
		if err != nil {
			return Sample{}, err
		}
		s.Requests = append(s.Requests, dl...)
		s.DaemonRequests = int64(m["lazypull_fetch_requests_total"])
		s.ForegroundBytes = int64(m[`lazypull_fetch_bytes_total{kind="foreground"}`])
		s.BackgroundBytes = int64(m[`lazypull_fetch_bytes_total{kind="background"}`])
		s.ForegroundRequests = int64(m[`lazypull_fetch_requests_total{kind="foreground",result="ok"}`] + m[`lazypull_fetch_requests_total{kind="foreground",result="error"}`])
		s.BackgroundRequests = int64(m[`lazypull_fetch_requests_total{kind="background",result="ok"}`] + m[`lazypull_fetch_requests_total{kind="background",result="error"}`])
		classify(s.Requests, r.layerIndexes(ctx, r.directRef(r.infos[w.Name], mode), s.Requests))
		s.ForegroundLatencyMedian, s.ForegroundLatencyP90 = foregroundLatency(s.Requests)
	}
	if e.sn != nil {
		for _, pid := range snapshotterPids(e.sn) {
			s.PeakRSSBytes += peakRSS(pid)
		}
		s.DaemonCPUSeconds = cpu1 - cpu0
	}
	sort.SliceStable(s.Requests, func(i, j int) bool { return s.Requests[i].Start < s.Requests[j].Start })
	if px != nil {
		_, s.BytesReceived = px.Bytes()
	} else {
		for _, q := range s.Requests {
			s.BytesReceived += q.Bytes
		}
	}
	s.Phases, s.Layers = phases(rec.start, pulled, t, s.Requests, lazy)
	s.PullSeconds = pulled.Sub(rec.start).Seconds()
	s.TotalSeconds = s.Phases[len(s.Phases)-1].Seconds
	s.ReadySeconds = s.TotalSeconds - s.PullSeconds
	if px != nil {
		s.LinkUtilization = linkUtilization(s.BytesReceived, px.Profile(), s.TotalSeconds)
	}
	if mode == ModeFirstNode {
		if err := r.waitProfile(ctx, e, ref, tag); err != nil {
			return Sample{}, err
		}
	}
	return s, nil
}

// linkUtilization is the share of the link's capacity a run used: bytes
// received over it / (rate × seconds), 0 when either is unknown.
func linkUtilization(bytes int64, p wan.Profile, seconds float64) float64 {
	bps := p.BytesPerSecond()
	if bps <= 0 || seconds <= 0 {
		return 0
	}
	return float64(bytes) / (bps * seconds)
}

// foregroundLatency returns the median and 90th percentile duration of
// the daemon's foreground fetches in a run's timeline: misses and their
// read-ahead (prefetches of a prioritized region are not waited on by a
// reader and are left out).
func foregroundLatency(reqs []Request) (median, p90 float64) {
	var d []float64
	for _, q := range reqs {
		if q.By == "snapshotter" && (q.Kind == KindForeground || q.Kind == KindReadAhead) {
			d = append(d, q.End-q.Start)
		}
	}
	return percentile(d, 50), percentile(d, 90)
}

// waitProfile waits, after a first node's run, until the registry holds a
// start-up profile for the image at ref: a referrer of its manifest (the
// referrers API) or the tag-schema fallback's tag "sha256-HEX". A daemon
// that pushes only when it stops is stopped (SIGTERM) once half the wait
// has passed.
func (r *Runner) waitProfile(ctx context.Context, e *env, ref, tag string) error {
	repo, dgst, err := r.manifestDigest(ctx, ref)
	if err != nil {
		return fmt.Errorf("resolving %s for its profile: %w", ref, err)
	}
	r.logf("%s: waiting for the start-up profile of %s@%s in the registry", tag, repo, dgst)
	start := time.Now()
	stopped := false
	for {
		found, err := hasReferrer(ctx, r.reg.URL(), repo, dgst)
		if err != nil {
			return err
		}
		if found {
			r.logf("%s: profile in the registry after %.1fs", tag, time.Since(start).Seconds())
			return nil
		}
		waited := time.Since(start)
		if !stopped && waited > r.cfg.ProfileWait/2 {
			r.logf("%s: no profile yet; stopping the daemon (it may push on the way out)", tag)
			_ = e.sn.Stop()
			stopped = true
		}
		if waited > r.cfg.ProfileWait {
			return fmt.Errorf("the first node pushed no start-up profile for %s@%s within %s (no referrer, no tag %s); is [profile] push supported by this lazypull-snapshotter?",
				repo, dgst, r.cfg.ProfileWait, referrersTag(dgst))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// manifestDigest returns the repository (in the loopback registry) and
// the digest of the platform's manifest of ref (which may name the
// registry through the WAN emulator).
func (r *Runner) manifestDigest(ctx context.Context, ref string) (string, digest.Digest, error) {
	_, nameTag, ok := strings.Cut(ref, "/")
	if !ok {
		return "", "", fmt.Errorf("reference %q has no repository", ref)
	}
	repo := nameTag
	if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
		repo = repo[:i]
	}
	src, err := convert.OpenStore(r.reg.Ref(nameTag), r.remote)
	if err != nil {
		return "", "", err
	}
	desc, _, _, err := r.platformManifest(ctx, src)
	if err != nil {
		return "", "", err
	}
	return repo, desc.Digest, nil
}

// referrersTag is the OCI distribution spec's fallback tag for the
// referrers of a manifest: its digest with ':' turned into '-'.
func referrersTag(d digest.Digest) string { return d.Algorithm().String() + "-" + d.Encoded() }

// hasReferrer reports whether the registry at base lists a referrer of
// repo@dgst through the referrers API or holds the fallback tag.
func hasReferrer(ctx context.Context, base, repo string, dgst digest.Digest) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	get := func(url, accept string) (int, []byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return 0, nil, err
		}
		req.Header.Set("Accept", accept)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil, fmt.Errorf("asking the registry for the profile: %w", err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		return resp.StatusCode, b, err
	}
	code, b, err := get(fmt.Sprintf("%s/v2/%s/referrers/%s", base, repo, dgst), ocispec.MediaTypeImageIndex)
	if err != nil {
		return false, err
	}
	if code == http.StatusOK {
		var idx ocispec.Index
		if json.Unmarshal(b, &idx) == nil && len(idx.Manifests) > 0 {
			return true, nil
		}
	}
	code, _, err = get(fmt.Sprintf("%s/v2/%s/manifests/%s", base, repo, referrersTag(dgst)),
		ocispec.MediaTypeImageIndex+", "+ocispec.MediaTypeImageManifest)
	if err != nil {
		return false, err
	}
	return code == http.StatusOK, nil
}

// phases derives a run's phases from its timestamps and requests. Each
// phase ends no earlier than the one before it: output written while the
// task's start call was returning counts at the start.
func phases(start, pulled time.Time, t runTimes, reqs []Request, lazy bool) ([]Phase, []LayerTime) {
	sec := func(at time.Time) float64 { return at.Sub(start).Seconds() }
	var resolve, manifest float64
	layers := map[string]float64{}
	var order []string
	for _, q := range reqs {
		switch {
		case q.Kind == KindResolve:
			resolve = max(resolve, q.End)
		case q.Kind == KindManifest && q.By == "containerd":
			manifest = max(manifest, q.End)
		case (lazy && q.Kind == KindTOC && q.Length > 0) || (!lazy && q.Kind == KindLayer):
			if _, ok := layers[q.Layer]; !ok {
				order = append(order, q.Layer)
			}
			layers[q.Layer] = max(layers[q.Layer], q.End)
		}
	}
	var lt []LayerTime
	layersEnd := 0.0
	for _, d := range order {
		lt = append(lt, LayerTime{Digest: d, Seconds: layers[d]})
		layersEnd = max(layersEnd, layers[d])
	}
	pull := sec(pulled)
	vals := []float64{resolve, manifest, layersEnd, pull, sec(t.started), sec(t.firstOutput), sec(t.ready)}
	out := make([]Phase, len(vals))
	prev := 0.0
	for i, v := range vals {
		if PhaseNames[i] != PhasePull && PhaseNames[i] != PhaseReady && i > 0 && v > pull && i < 3 {
			v = pull // a layer's TOC can only be read before the pull returns
		}
		v = max(v, prev)
		out[i] = Phase{Name: PhaseNames[i], Seconds: v}
		prev = v
	}
	return out, lt
}

// runTimes are the moments of a container's start-up.
type runTimes struct {
	started, firstOutput, ready time.Time
	line                        string
}

// runWorkload creates the container and starts its task, and returns when
// the ready line appears (or the command exits, without a ready pattern).
func (r *Runner) runWorkload(ctx context.Context, c *lab.Containerd, img client.Image, snapshotter string, w Workload) (runTimes, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.ReadyTimeout)
	defer cancel()
	id := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img), c.WithCgroup()}
	if len(w.Cmd) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(w.Cmd...))
	}
	ctr, err := c.Client().NewContainer(ctx, id,
		client.WithImage(img),
		client.WithSnapshotter(snapshotter),
		client.WithNewSnapshot(id+"-rootfs", img),
		c.RuntimeOpt(),
		client.WithNewSpec(specOpts...),
	)
	if err != nil {
		return runTimes{}, fmt.Errorf("creating the container: %w", err)
	}
	defer ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup)
	watch := newLineWatcher(w.Ready)
	task, err := ctr.NewTask(ctx, c.IO(nil, watch, watch.stderr()))
	if err != nil {
		return runTimes{}, fmt.Errorf("creating the task: %w", err)
	}
	defer task.Delete(context.WithoutCancel(ctx), client.WithProcessKill)
	exit, err := task.Wait(ctx)
	if err != nil {
		return runTimes{}, err
	}
	if err := task.Start(ctx); err != nil {
		return runTimes{}, fmt.Errorf("starting the task: %w", err)
	}
	t := runTimes{started: time.Now()}
	finish := func(at time.Time) runTimes {
		t.ready = at
		t.firstOutput = watch.firstOutput()
		if t.firstOutput.IsZero() || t.firstOutput.After(at) {
			t.firstOutput = at
		}
		t.line = watch.line()
		return t
	}
	if w.Ready == nil {
		select {
		case st := <-exit:
			if st.ExitCode() != 0 {
				return runTimes{}, fmt.Errorf("command exited with status %d; output:\n%s", st.ExitCode(), tail(watch.output()))
			}
			return finish(st.ExitTime()), nil
		case <-ctx.Done():
			return runTimes{}, fmt.Errorf("%w: the command did not exit within %s; output so far:\n%s", ErrNotReady, r.cfg.ReadyTimeout, tail(watch.output()))
		}
	}
	select {
	case at := <-watch.ready:
		return finish(at), nil
	case st := <-exit:
		// The ready line may race the exit: the output's end may come
		// after it.
		go func() {
			time.Sleep(500 * time.Millisecond)
			watch.flush()
		}()
		select {
		case at := <-watch.ready:
			return finish(at), nil
		case <-time.After(time.Second):
		}
		return runTimes{}, fmt.Errorf("%w: the command exited with status %d without printing a line matching %q; output:\n%s", ErrNotReady, st.ExitCode(), w.Ready, tail(watch.output()))
	case <-ctx.Done():
		return runTimes{}, fmt.Errorf("%w: no line matching %q within %s; output so far:\n%s", ErrNotReady, w.Ready, r.cfg.ReadyTimeout, tail(watch.output()))
	}
}

// tail returns the end of a long output.
func tail(s string) string {
	const n = 4000
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// lineWatcher timestamps the first output and the first line matching a
// pattern, over stdout and stderr (each split into lines on its own). It
// keeps the end of the output for error messages.
type lineWatcher struct {
	re     *regexp.Regexp
	ready  chan time.Time
	mu     sync.Mutex
	tail   []byte // the last maxWatchTail bytes of output
	first  time.Time
	last   time.Time // of the last write
	found  string
	once   sync.Once
	out    *watchStream
	errOut *watchStream
}

// watchStream is one of the watched streams: its unfinished line.
type watchStream struct {
	w       *lineWatcher
	pending []byte
}

const (
	maxWatchTail = 64 << 10
	// maxWatchLine bounds an unfinished line; the rest of a longer line
	// is not matched.
	maxWatchLine = 64 << 10
)

func newLineWatcher(re *regexp.Regexp) *lineWatcher {
	w := &lineWatcher{re: re, ready: make(chan time.Time, 1)}
	w.out, w.errOut = &watchStream{w: w}, &watchStream{w: w}
	return w
}

// Write feeds the watcher as the command's standard output.
func (w *lineWatcher) Write(p []byte) (int, error) { return w.out.Write(p) }

// stderr returns the writer for the command's standard error.
func (w *lineWatcher) stderr() io.Writer { return w.errOut }

func (s *watchStream) Write(p []byte) (int, error) {
	w := s.w
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.first.IsZero() && len(p) > 0 {
		w.first = now
	}
	w.last = now
	w.tail = append(w.tail, p...)
	if len(w.tail) > maxWatchTail {
		w.tail = append([]byte(nil), w.tail[len(w.tail)-maxWatchTail:]...)
	}
	if w.re == nil {
		return len(p), nil
	}
	rest := p
	for {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			break
		}
		line := append(s.pending, rest[:i]...)
		s.pending = s.pending[:0]
		rest = rest[i+1:]
		w.match(line, now)
	}
	if room := maxWatchLine - len(s.pending); room > 0 {
		s.pending = append(s.pending, rest[:min(len(rest), room)]...)
	}
	return len(p), nil
}

// match records line as the ready line if it is the first to match.
// w.mu is held.
func (w *lineWatcher) match(line []byte, at time.Time) {
	if w.re.Match(line) {
		found := string(line)
		w.once.Do(func() {
			w.found = found
			w.ready <- at
		})
	}
}

// flush checks the streams' last lines, if they have no newline, once the
// output has ended; they count from the last write.
func (w *lineWatcher) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.re == nil {
		return
	}
	for _, s := range []*watchStream{w.out, w.errOut} {
		if len(s.pending) > 0 {
			w.match(s.pending, w.last)
		}
	}
}

func (w *lineWatcher) firstOutput() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.first
}

func (w *lineWatcher) line() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.found
}

func (w *lineWatcher) output() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.tail)
}

// limit measures the warm local time and computes the image's bound.
func (r *Runner) limit(ctx context.Context, w Workload, p wan.Profile) (Limit, error) {
	info := r.infos[w.Name]
	e, err := r.startEnv(ctx, noDaemon, "", "")
	if err != nil {
		return Limit{}, err
	}
	defer e.close()
	ctx = namespaces.WithNamespace(ctx, "bench")
	img, err := e.c.Pull(ctx, r.reg.Ref(info.Refs[ModeFull]), "overlayfs", client.WithPlatformMatcher(r.match))
	if err != nil {
		return Limit{}, err
	}
	var best time.Duration
	for i := 0; i < 3; i++ {
		t, err := r.runWorkload(ctx, e.c, img, "overlayfs", w)
		if err != nil {
			return Limit{}, err
		}
		d := t.ready.Sub(t.started)
		if i > 0 && (best == 0 || d < best) { // the first run warms the page cache
			best = d
		}
	}
	readBytes := r.readBytes[w.Name]
	l := Limit{Image: w.Name, Profile: p.Name, LocalSeconds: best.Seconds(), ReadBytes: readBytes}
	l.Seconds = l.LocalSeconds + 3*p.RTT.Seconds()
	if bps := p.BytesPerSecond(); bps > 0 {
		l.Seconds += float64(readBytes) / bps
	}
	return l, nil
}

// dropCaches empties the page cache so every start is cold.
func dropCaches() {
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200)
}

// clockTicks is the unit of the CPU times in /proc/PID/stat (USER_HZ,
// 100 on every Linux architecture Go supports).
const clockTicks = 100

// snapshotterPids are the processes of a run's snapshotter: the daemon
// and, for lazypull in its default mode, the fuse manager that serves its
// layers — where chunks are fetched, decompressed, verified and cached, so
// most of the CPU and memory a cold start costs is there.
func snapshotterPids(sn *lab.Snapshotter) []int {
	pids := []int{sn.Pid()}
	if m := sn.ManagerPid(); m > 0 && m != pids[0] {
		pids = append(pids, m)
	}
	return pids
}

// processesCPU is the CPU time the processes have used so far, together.
func processesCPU(pids []int) float64 {
	var t float64
	for _, pid := range pids {
		t += cpuSeconds(pid)
	}
	return t
}

// cpuSeconds returns the user+system CPU time a process has used so far
// (utime and stime in /proc/PID/stat), or 0 if it cannot be read.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	return parseStatCPU(string(b))
}

// parseStatCPU reads utime+stime (fields 14 and 15) from a /proc/PID/stat
// line. The command name (field 2) may hold spaces and parentheses, so
// fields are counted from its closing parenthesis.
func parseStatCPU(stat string) float64 {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return float64(ut+st) / clockTicks
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
			if len(f) == 0 {
				return 0
			}
			if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				return n * 1024
			}
		}
	}
	return 0
}

// daemonRecord is one entry of lazypull-snapshotter's /debug/fetches.
type daemonRecord struct {
	Start   time.Time `json:"start"`
	Seconds float64   `json:"seconds"`
	Op      string    `json:"op"`
	Layer   string    `json:"layer"`
	Offset  int64     `json:"offset"`
	Length  int64     `json:"length"`
	Bytes   int64     `json:"bytes"`
	Status  int       `json:"status"`
	Err     string    `json:"error"`
	Kind    string    `json:"kind"`
}

// daemonFetches reads the snapshotter's fetch log as timeline requests.
func daemonFetches(ctx context.Context, addr string, start time.Time) ([]Request, error) {
	b, err := httpGet(ctx, "http://"+addr+"/debug/fetches")
	if err != nil {
		return nil, fmt.Errorf("reading the snapshotter's fetch log: %w", err)
	}
	var log struct {
		Dropped int            `json:"dropped"`
		Fetches []daemonRecord `json:"fetches"`
	}
	if err := json.Unmarshal(b, &log); err != nil {
		return nil, fmt.Errorf("parsing the snapshotter's fetch log: %w", err)
	}
	out := make([]Request, 0, len(log.Fetches))
	for _, f := range log.Fetches {
		q := Request{By: "snapshotter", Layer: f.Layer, Offset: f.Offset, Length: f.Length, Bytes: f.Bytes, Status: f.Status, Err: f.Err}
		q.Start = f.Start.Sub(start).Seconds()
		q.End = q.Start + f.Seconds
		switch {
		case f.Op == "range" && f.Kind == "background":
			q.Kind = KindBackground
		case f.Op == "range" && f.Kind == "foreground":
			q.Kind = KindForeground
		case f.Op == "range" || f.Op == "head":
			q.Kind = KindTOC // a layer's HEAD, footer and TOC
		case f.Op == "blob":
			// The snapshotter streams a whole blob only to verify the
			// layer ([verify] policy = "background"), which is its
			// background fetch too.
			q.Kind = KindBackground
		default:
			q.Kind = KindManifest
		}
		out = append(out, q)
	}
	return out, nil
}

// daemonSnapshot reads the snapshotter's fetch log and its metrics at one
// moment: background fetches go on after the ready line, so it reads the
// metrics before and after the log until no fetch ended in between.
func daemonSnapshot(ctx context.Context, addr string, start time.Time) ([]Request, map[string]float64, error) {
	for try := 0; ; try++ {
		before, err := daemonMetrics(ctx, addr)
		if err != nil {
			return nil, nil, err
		}
		reqs, err := daemonFetches(ctx, addr, start)
		if err != nil {
			return nil, nil, err
		}
		after, err := daemonMetrics(ctx, addr)
		if err != nil {
			return nil, nil, err
		}
		const n = "lazypull_fetch_requests_total"
		if before[n] == after[n] || try == 10 {
			return reqs, after, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// daemonMetrics reads the snapshotter's Prometheus counters, by series
// ("name{labels}") and by name (the sum over labels).
func daemonMetrics(ctx context.Context, addr string) (map[string]float64, error) {
	b, err := httpGet(ctx, "http://"+addr+"/metrics")
	if err != nil {
		return nil, fmt.Errorf("reading the snapshotter's metrics: %w", err)
	}
	return lab.ParseMetrics(b), nil
}

func httpGet(ctx context.Context, url string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 256<<20))
}

func parseIndex(mediaType string, raw []byte) (*ocispec.Index, bool) {
	var probe struct {
		MediaType string            `json:"mediaType"`
		Manifests []json.RawMessage `json:"manifests"`
	}
	if err := json.Unmarshal(raw, &probe); err != nil {
		return nil, false
	}
	mt := mediaType
	if mt == "" {
		mt = probe.MediaType
	}
	if mt != ocispec.MediaTypeImageIndex && mt != "application/vnd.docker.distribution.manifest.list.v2+json" && probe.Manifests == nil {
		return nil, false
	}
	var idx ocispec.Index
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, false
	}
	return &idx, true
}
