package main

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazypull/lazypull/bench"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
)

// benchEnv is what the bench tests share: a registry with a small plain
// gzip busybox image (a few MB) and a lazypull-snapshotter binary.
type benchEnv struct {
	ref, snapshotter string
	dir              string
	reg              *lab.Registry
}

var (
	benchOnce sync.Once
	benchE    benchEnv
	benchErr  error
)

// cleanupBench removes what setupBench made; TestMain calls it.
func cleanupBench() {
	if benchE.reg != nil {
		benchE.reg.Close()
	}
	if benchE.dir != "" {
		os.RemoveAll(benchE.dir)
	}
}

func setupBench(t *testing.T) benchEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the bench tests need root (containerd, FUSE)")
	}
	benchOnce.Do(func() {
		logrus.SetOutput(io.Discard) // the registry logs every request
		dir, err := os.MkdirTemp("", "lazypull-bench-test-")
		if err != nil {
			benchErr = err
			return
		}
		// The binary is shared by every bench test; TestMain removes it.
		benchE.dir = dir
		if benchE.snapshotter, benchErr = lab.BuildSnapshotter(dir); benchErr != nil {
			return
		}
		reg, err := lab.StartRegistry(lab.RegistryConfig{})
		if err != nil {
			benchErr = err
			return
		}
		benchE.reg = reg
		base, err := fixture.BusyboxLayer()
		if err != nil {
			benchErr = err
			return
		}
		rnd := rand.New(rand.NewSource(1))
		app := fixture.NewLayer()
		for _, name := range []string{"data/a", "data/b", "data/unread"} {
			b := make([]byte, 1<<20)
			rnd.Read(b)
			app.FileBytes(name, b)
		}
		img, err := fixture.BuildImage(fixture.DefaultConfig(), base, app)
		if err != nil {
			benchErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		benchE.ref, benchErr = reg.Push(ctx, "app:v1", img)
	})
	if benchErr != nil {
		t.Fatalf("bench setup: %v", benchErr)
	}
	return benchE
}

// runBenchCmd runs lazypull bench in-process with TMPDIR set to a fresh
// directory, and checks that nothing is left in it or mounted under it.
func runBenchCmd(t *testing.T, timeout time.Duration, args ...string) (string, string, error) {
	t.Helper()
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	before := envDirs(t)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out, errb strings.Builder
	cmd := newRootCommand()
	cmd.SetArgs(append([]string{"bench"}, args...))
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	err := cmd.ExecuteContext(ctx)
	for d := range envDirs(t) {
		if !before[d] {
			t.Errorf("run directory %s left behind", d)
		}
	}
	if m, _ := lab.MountedUnder(tmp); len(m) > 0 {
		t.Errorf("left mounted: %v", m)
	}
	if left, _ := os.ReadDir(tmp); len(left) > 0 {
		var names []string
		for _, e := range left {
			names = append(names, e.Name())
		}
		t.Errorf("temporary state left behind: %v", names)
	}
	return out.String(), errb.String(), err
}

// envDirs lists the runs' directories under /tmp.
func envDirs(t *testing.T) map[string]bool {
	t.Helper()
	m, err := filepath.Glob(bench.EnvDirPattern(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, d := range m {
		out[d] = true
	}
	return out
}

// TestBenchEndToEnd converts a plain gzip image, benchmarks it with both
// modes over an emulated WAN and checks the report.
func TestBenchEndToEnd(t *testing.T) {
	e := setupBench(t)
	out := filepath.Join(t.TempDir(), "report")
	cache := t.TempDir()
	stdout, stderr, err := runBenchCmd(t, 4*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", cache,
		"--convert", "--wan", "20ms,100Mbit", "--modes", "full-pull,lazypull", "--ready", "^ready [0-9]+$",
		"--out", out, "--json", "--hosts-dir", t.TempDir(), "--name", "app",
		e.ref, "--", "/bin/sh", "-c", "cat /data/a /data/b | wc -c; echo ready 42; sleep 2")
	if err != nil {
		t.Fatalf("bench: %v\nstderr:\n%s", err, stderr)
	}
	if stderr != "" {
		t.Errorf("--json wrote progress to stderr:\n%s", stderr)
	}
	var res bench.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatalf("stdout is not the result JSON: %v\n%s", err, stdout)
	}
	if len(res.Samples) != 2 {
		t.Fatalf("%d samples, want 2", len(res.Samples))
	}
	for _, s := range res.Samples {
		checkSample(t, s)
		// 20 ms RTT: resolving alone takes a round trip or more.
		if s.Phases[0].Seconds < 0.02 {
			t.Errorf("%s: resolve in %.3fs, under one emulated round trip", s.Mode, s.Phases[0].Seconds)
		}
		if s.ReadyLine != "ready 42" {
			t.Errorf("%s: ready line %q", s.Mode, s.ReadyLine)
		}
		if s.BytesReceived <= 0 {
			t.Errorf("%s: no bytes over the link", s.Mode)
		}
		if s.LinkUtilization <= 0 || s.LinkUtilization > 1.05 {
			t.Errorf("%s: link utilization %v", s.Mode, s.LinkUtilization)
		}
		kinds := map[string]int{}
		for _, q := range s.Requests {
			kinds[q.Kind]++
		}
		if kinds[bench.KindResolve] != 1 || kinds[bench.KindManifest] < 2 {
			t.Errorf("%s: requests by kind %v: want one resolve and the manifest and config", s.Mode, kinds)
		}
		switch s.Mode {
		case bench.ModeFull:
			if kinds[bench.KindLayer] != 2 || s.BytesReceived < 2<<20 {
				t.Errorf("full pull: %v, %d bytes: want both layers downloaded", kinds, s.BytesReceived)
			}
		case bench.ModeLazy:
			content := kinds[bench.KindForeground] + kinds[bench.KindReadAhead] + kinds[bench.KindPrefetch] + kinds[bench.KindBackground]
			if int64(content) != s.DaemonRequests || content == 0 {
				t.Errorf("lazypull: timeline has %d content requests (%v), the daemon counted %d", content, kinds, s.DaemonRequests)
			}
			if kinds[bench.KindTOC] < 2 || len(s.Layers) != 2 {
				t.Errorf("lazypull: %d TOC requests, %d layers timed: want both layers' TOCs", kinds[bench.KindTOC], len(s.Layers))
			}
			if s.ForegroundBytes+s.BackgroundBytes < 2<<20 {
				t.Errorf("lazypull: %d foreground and %d background bytes; the command reads 2 MiB of random data", s.ForegroundBytes, s.BackgroundBytes)
			}
			if s.PeakRSSBytes <= 0 || s.DaemonCPUSeconds <= 0 {
				t.Errorf("lazypull: peak RSS %d, CPU %vs", s.PeakRSSBytes, s.DaemonCPUSeconds)
			}
			// The reads miss: the foreground fetches took at least the
			// emulated round trip.
			if s.ForegroundLatencyMedian < 0.02 || s.ForegroundLatencyP90 < s.ForegroundLatencyMedian {
				t.Errorf("lazypull: foreground latency median %v p90 %v", s.ForegroundLatencyMedian, s.ForegroundLatencyP90)
			}
		}
	}
	for _, name := range []string{"results.json", "results.md", "report.html", "cold-start-20ms-100Mbit.svg",
		"timeline-app-20ms-100Mbit-full-pull.svg", "timeline-app-20ms-100Mbit-lazypull.svg"} {
		b, err := os.ReadFile(filepath.Join(out, name))
		if err != nil || len(b) == 0 {
			t.Errorf("%s: %v (%d bytes)", name, err, len(b))
		}
	}
	md, _ := os.ReadFile(filepath.Join(out, "results.md"))
	if !strings.Contains(string(md), "| app | lazypull |") || !strings.Contains(string(md), "| app | full-pull |") {
		t.Errorf("results.md lacks the rows:\n%s", md)
	}
	page, _ := os.ReadFile(filepath.Join(out, "report.html"))
	if strings.Count(string(page), "<svg") != 6 {
		t.Errorf("report.html holds %d SVGs, want the chart, the CPU, link and latency charts and two timelines", strings.Count(string(page), "<svg"))
	}
}

// checkSample checks that a run's phases are the seven in order and add
// up to its total.
func checkSample(t *testing.T, s bench.Sample) {
	t.Helper()
	if len(s.Phases) != len(bench.PhaseNames) {
		t.Fatalf("%s: phases %v", s.Mode, s.Phases)
	}
	prev, sum := 0.0, 0.0
	for i, p := range s.Phases {
		if p.Name != bench.PhaseNames[i] {
			t.Errorf("%s: phase %d is %q, want %q", s.Mode, i, p.Name, bench.PhaseNames[i])
		}
		if p.Seconds < prev {
			t.Errorf("%s: phase %s ends at %.3fs, before the one before it (%.3fs)", s.Mode, p.Name, p.Seconds, prev)
		}
		sum += p.Seconds - prev
		prev = p.Seconds
	}
	if s.Phases[0].Seconds <= 0 {
		t.Errorf("%s: resolve took no time", s.Mode)
	}
	if math.Abs(sum-s.TotalSeconds) > 1e-9 || math.Abs(s.PullSeconds+s.ReadySeconds-s.TotalSeconds) > 1e-9 {
		t.Errorf("%s: phases add up to %.3fs, pull %.3f + ready %.3f, total %.3fs", s.Mode, sum, s.PullSeconds, s.ReadySeconds, s.TotalSeconds)
	}
	if pull := s.Phases[3].Seconds; pull != s.PullSeconds {
		t.Errorf("%s: pull phase %.3f, pull seconds %.3f", s.Mode, pull, s.PullSeconds)
	}
	for _, q := range s.Requests {
		if q.End < q.Start || q.Start < -1 {
			t.Errorf("%s: request %+v ends before it starts", s.Mode, q)
		}
	}
}

func TestBenchMissingImage(t *testing.T) {
	e := setupBench(t)
	ref := strings.Replace(e.ref, "app:v1", "app:missing", 1)
	_, _, err := runBenchCmd(t, 2*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--modes", "lazypull", "--out", t.TempDir(), "--hosts-dir", t.TempDir(), ref)
	if err == nil || !strings.Contains(strings.ToLower(err.Error()), "not found") || !strings.Contains(err.Error(), "app:missing") {
		t.Fatalf("err = %v, want not found naming the reference", err)
	}
	// Copied into the loopback registry first (converted, over a WAN).
	_, _, err = runBenchCmd(t, 2*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--convert", "--wan", "1ms,1Gbit", "--out", t.TempDir(), "--hosts-dir", t.TempDir(), ref)
	if err == nil || !strings.Contains(strings.ToLower(err.Error()), "not found") || !strings.Contains(err.Error(), "app:missing") {
		t.Fatalf("with --convert: err = %v, want not found naming the reference", err)
	}
}

func TestBenchNeverReady(t *testing.T) {
	e := setupBench(t)
	out := t.TempDir()
	_, _, err := runBenchCmd(t, 2*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--modes", "lazypull", "--timeout", "4s", "--ready", "^listening", "--out", out, "--hosts-dir", t.TempDir(),
		e.ref, "--", "/bin/sh", "-c", "echo starting; sleep 60")
	if err == nil || !strings.Contains(err.Error(), "never became ready") || !strings.Contains(err.Error(), "^listening") ||
		!strings.Contains(err.Error(), "starting") {
		t.Fatalf("err = %v, want a timeout naming the pattern, with the output", err)
	}
	if left, _ := os.ReadDir(out); len(left) > 0 {
		t.Errorf("a failed bench wrote a report: %v", left)
	}
}

func TestBenchUnresponsiveSnapshotter(t *testing.T) {
	e := setupBench(t)
	sock := filepath.Join(t.TempDir(), "dead.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	// Accepts connections and never says a word.
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	start := time.Now()
	_, _, err = runBenchCmd(t, 2*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--snapshotter", "dead="+sock, "--modes", "dead", "--out", t.TempDir(), "--hosts-dir", t.TempDir(), e.ref)
	if err == nil || !strings.Contains(err.Error(), "snapshotter dead at "+sock+" does not answer") {
		t.Fatalf("err = %v, want the socket named as not answering", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("took %s to give up", d)
	}
	// A socket nobody listens on.
	_, _, err = runBenchCmd(t, time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--snapshotter", "gone="+sock+".none", "--modes", "gone", "--out", t.TempDir(), "--hosts-dir", t.TempDir(), e.ref)
	if err == nil || !strings.Contains(err.Error(), "does not answer") {
		t.Fatalf("err = %v, want the missing socket reported", err)
	}
}

func TestBenchUsage(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		mention string
	}{
		{[]string{}, "IMAGE or --preset"},
		{[]string{"--preset", "hellobench", "img"}, "IMAGE or --preset"},
		{[]string{"--preset", "other"}, "hellobench"},
		{[]string{"--preset", "hellobench:nope"}, "nope"},
		{[]string{"--wan", "40ms", "img"}, "RTT,BANDWIDTH"},
		{[]string{"--wan", "40ms,100", "img"}, "unit"},
		{[]string{"--ready", "(", "img"}, "--ready"},
		{[]string{"--snapshotter", "stargz", "img"}, "NAME=SOCKET"},
		{[]string{"--snapshotter", "lazypull=/x", "img"}, "built-in"},
		{[]string{"a", "b"}, "one IMAGE"},
	} {
		_, _, err := run(t, append([]string{"bench"}, tc.args...)...)
		wantUsage(t, err, tc.mention)
	}
	cfg := filepath.Join(t.TempDir(), "sn.toml")
	if err := os.WriteFile(cfg, []byte("[metrics]\naddress = \"127.0.0.1:1\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "lazypull-snapshotter")
	if err := os.WriteFile(bin, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	_, _, err := run(t, "bench", "--snapshotter-bin", bin, "--snapshotter-config", cfg, "img")
	wantUsage(t, err, "[metrics]")
}

// TestBenchProxySnapshotter measures a mode through another proxy
// snapshotter given as NAME=SOCKET (here a second lazypull-snapshotter
// the test runs itself), twice: the image is removed from it after each
// run, so the second run pulls again.
func TestBenchProxySnapshotter(t *testing.T) {
	e := setupBench(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("/tmp", "lpbp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sn, err := lab.StartSnapshotter(ctx, lab.SnapshotterConfig{Binary: e.snapshotter, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	stdout, stderr, err := runBenchCmd(t, 3*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--convert", "--snapshotter", "other="+sn.Address(), "--modes", "other", "--repeats", "2", "--json",
		"--out", t.TempDir(), "--hosts-dir", t.TempDir(), e.ref, "--", "/bin/cat", "/data/a")
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, stderr)
	}
	var res bench.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatal(err)
	}
	if len(res.Samples) != 2 {
		t.Fatalf("%d samples, want 2", len(res.Samples))
	}
	for _, s := range res.Samples {
		checkSample(t, s)
		if s.Mode != "other" || s.PeakRSSBytes != 0 {
			t.Errorf("sample %s: peak RSS %d", s.Mode, s.PeakRSSBytes)
		}
	}
	// Each run removed its image: the other snapshotter holds no snapshot
	// of the bench's namespace, so no run found the layers already there.
	conn, err := grpc.NewClient("unix://"+sn.Address(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var left []string
	err = proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "other").Walk(namespaces.WithNamespace(ctx, "bench"),
		func(_ context.Context, info snapshots.Info) error {
			left = append(left, info.Name)
			return nil
		})
	if err != nil || len(left) > 0 {
		t.Errorf("snapshots left in the other snapshotter: %v (%v)", left, err)
	}
}

// TestBenchPeer measures stargz-snapshotter v0.19.1, built from the
// bench's module of its own (bench/peer/stargz) into the cache directory,
// on the converted image, beside lazypull.
func TestBenchPeer(t *testing.T) {
	e := setupBench(t)
	cache := t.TempDir()
	stdout, stderr, err := runBenchCmd(t, 8*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", cache,
		"--convert", "--wan", "20ms,100Mbit", "--modes", "stargz-snapshotter", "--json", "--ready", "^ready$",
		"--out", t.TempDir(), "--hosts-dir", t.TempDir(), e.ref, "--", "/bin/sh", "-c", "cat /data/a >/dev/null && echo ready")
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, stderr)
	}
	var res bench.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatal(err)
	}
	if len(res.Samples) != 1 {
		t.Fatalf("%d samples, want 1", len(res.Samples))
	}
	s := res.Samples[0]
	checkSample(t, s)
	if s.Mode != bench.ModePeer || s.ReadyLine != "ready" {
		t.Errorf("sample %s, ready line %q", s.Mode, s.ReadyLine)
	}
	if s.PeakRSSBytes <= 0 || s.DaemonCPUSeconds <= 0 {
		t.Errorf("peer: peak RSS %d, CPU %vs: the fresh daemon was not measured", s.PeakRSSBytes, s.DaemonCPUSeconds)
	}
	// Lazily: the image is ~3 MB compressed, the command reads 1 MiB of
	// random data; the layers never went through containerd.
	for _, q := range s.Requests {
		if q.Kind == bench.KindLayer {
			t.Errorf("containerd fetched a layer (%s): the peer did not serve it remotely", q.Layer)
		}
	}
	if s.BytesReceived < 1<<20 || s.LinkUtilization <= 0 {
		t.Errorf("peer: %d bytes over the link, utilization %v", s.BytesReceived, s.LinkUtilization)
	}
	bins, _ := filepath.Glob(filepath.Join(cache, "peer", bench.PeerBinary+"-"+bench.PeerVersion+"-*"))
	if len(bins) != 1 {
		t.Errorf("built peers in the cache: %v", bins)
	}
}

// TestBenchSecondNode runs the "second node" pair: a first daemon records
// the start-up and pushes its profile to the registry, then a fresh daemon
// and cache looks it up there. Needs the daemon's [profile] section.
func TestBenchSecondNode(t *testing.T) {
	e := setupBench(t)
	stdout, stderr, err := runBenchCmd(t, 5*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--convert", "--wan", "20ms,100Mbit", "--modes", "lazypull,lazypull-second-node", "--json",
		"--out", t.TempDir(), "--hosts-dir", t.TempDir(), e.ref, "--", "/bin/sh", "-c", "cat /data/a /data/b >/dev/null")
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, stderr)
	}
	var res bench.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatal(err)
	}
	if len(res.Samples) != 3 {
		t.Fatalf("%d samples, want lazypull, the first node and the second", len(res.Samples))
	}
	want := []bench.Mode{bench.ModeLazy, bench.ModeFirstNode, bench.ModeSecondNode}
	lookups := map[bench.Mode]int{}
	for i, s := range res.Samples {
		checkSample(t, s)
		if s.Mode != want[i] {
			t.Fatalf("sample %d is %s, want %s", i, s.Mode, want[i])
		}
		for _, q := range s.Requests {
			if q.By == "snapshotter" && q.Kind == bench.KindManifest {
				lookups[s.Mode]++
			}
		}
	}
	lazy, first, second := res.Samples[0], res.Samples[1], res.Samples[2]
	// The pair pulls a copy of the image of its own, so the profile the
	// first node pushed reached no other mode.
	if first.Ref != second.Ref || first.Ref == lazy.Ref || !strings.Contains(first.Ref, "-profile-") {
		t.Errorf("refs: lazypull %s, first node %s, second node %s", lazy.Ref, first.Ref, second.Ref)
	}
	// The bench waited for the first node's profile to reach the registry
	// (else the run fails); the second node asked the registry for it,
	// while the first node (lookup off) did not: its only manifest
	// requests are the image manifest it reads the layers' sizes from,
	// which every node makes too.
	if lookups[bench.ModeFirstNode] > 1 || lookups[bench.ModeSecondNode] <= lookups[bench.ModeFirstNode] {
		t.Errorf("the daemons' profile lookups: %v", lookups)
	}
}

func TestParseWANs(t *testing.T) {
	ps, err := parseWANs([]string{"40ms,100Mbit", "none", " 500us , 800kbit"})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		name string
		rtt  time.Duration
		bits int64
	}{{"40ms-100Mbit", 40 * time.Millisecond, 100_000_000}, {"none", 0, 0}, {"500us-800kbit", 500 * time.Microsecond, 800_000}}
	if len(ps) != len(want) {
		t.Fatalf("%d profiles, want %d", len(ps), len(want))
	}
	for i, w := range want {
		if ps[i].Name != w.name || ps[i].RTT != w.rtt || ps[i].BitsPerSecond != w.bits {
			t.Errorf("profile %d: %+v, want %+v", i, ps[i], w)
		}
	}
	for _, bad := range [][]string{{"40ms,100Mbit", "40ms,100Mbit"}, {"fast,1Gbit"}, {"40ms,0Mbit"}, {"40ms,lotsMbit"}, {"-1s,1Gbit"}} {
		if _, err := parseWANs(bad); err == nil {
			t.Errorf("parseWANs(%q) accepted", bad)
		}
	}
	modes, err := parseModes("all,stargz", nil)
	if err != nil || len(modes) != len(bench.Modes)+1 || modes[len(bench.Modes)] != "stargz" || !slices.Contains(modes, bench.ModePeer) {
		t.Errorf("parseModes: %v %v", modes, err)
	}
	if modes, _ := parseModes("", []bench.Mode{"soci"}); len(modes) != 3 || modes[2] != "soci" {
		t.Errorf("default modes with a --snapshotter: %v", modes)
	}
}

// TestBenchConvertTo converts into a registry of the user's (here the
// test's) and, with no WAN emulation, measures lazypull from there.
func TestBenchConvertTo(t *testing.T) {
	e := setupBench(t)
	dst := strings.Replace(e.ref, "app:v1", "app:v1-esgz", 1)
	stdout, stderr, err := runBenchCmd(t, 3*time.Minute, "--snapshotter-bin", e.snapshotter, "--cache-dir", t.TempDir(),
		"--convert-to", dst, "--modes", "lazypull", "--json", "--out", t.TempDir(), "--hosts-dir", t.TempDir(),
		e.ref, "--", "/bin/cat", "/data/b")
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, stderr)
	}
	var res bench.Result
	if err := json.Unmarshal([]byte(stdout), &res); err != nil {
		t.Fatal(err)
	}
	if len(res.Samples) != 1 || res.Samples[0].Ref != dst {
		t.Fatalf("samples %+v: want one, pulled from %s", res.Samples, dst)
	}
	s := res.Samples[0]
	checkSample(t, s)
	toc := 0
	for _, q := range s.Requests {
		if q.Kind == bench.KindTOC && q.Length > 0 {
			toc++
		}
	}
	if toc < 2 || res.Images[0].EStargzBytes == 0 {
		t.Errorf("%d TOC reads, eStargz size %d: the image at %s is not lazily pulled eStargz", toc, res.Images[0].EStargzBytes, dst)
	}
	_, _, err = run(t, "bench", "--snapshotter-bin", e.snapshotter, "--convert-to", "127.0.0.1:1/app", e.ref)
	wantUsage(t, err, "needs a tag")
}
