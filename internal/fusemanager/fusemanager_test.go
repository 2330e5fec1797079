package fusemanager

import (
	"context"
	"fmt"
	"net"
	"net/rpc"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazypull/lazypull/remote"
)

// memBackend records mounts in memory: these tests are about the protocol
// (the integration test TestRestartFuseManager runs the real manager).
type memBackend struct {
	mu      sync.Mutex
	mounted map[string]map[string]string
	sick    map[string]bool
	mounts  int
}

func (b *memBackend) Mount(_ context.Context, mp string, labels map[string]string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if labels["fail"] != "" {
		return fmt.Errorf("layer %s: %w", labels["fail"], errdefs.ErrDataLoss)
	}
	b.mounts++
	b.mounted[mp] = labels
	delete(b.sick, mp)
	return nil
}

func (b *memBackend) Check(_ context.Context, mp string, _ map[string]string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.mounted[mp]; !ok {
		return fmt.Errorf("no layer at %s: %w", mp, errdefs.ErrNotFound)
	}
	if b.sick[mp] {
		return fmt.Errorf("sick")
	}
	return nil
}

func (b *memBackend) Unmount(_ context.Context, mp string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.mounted[mp]; !ok {
		return fmt.Errorf("no layer at %s: %w", mp, errdefs.ErrNotFound)
	}
	delete(b.mounted, mp)
	return nil
}

func (b *memBackend) LayerSize(mp string) (int64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	_, ok := b.mounted[mp]
	return 42, ok
}

func (b *memBackend) Mountpoints() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for mp := range b.mounted {
		out = append(out, mp)
	}
	slices.Sort(out)
	return out
}

func serve(t *testing.T, b Backend) (string, chan error) {
	t.Helper()
	addr := filepath.Join(t.TempDir(), "m.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, b, ServerOptions{Version: "test"}) }()
	t.Cleanup(func() { cancel(); <-done })
	return addr, done
}

func TestClientServer(t *testing.T) {
	ctx := context.Background()
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	addr, _ := serve(t, b)
	c, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if h := c.Manager(); h.Protocol != Protocol || h.Version != "test" || h.Pid == 0 {
		t.Fatalf("hello: %+v", h)
	}
	if err := c.Mount(ctx, "/a", map[string]string{"k": "v"}); err != nil {
		t.Fatal(err)
	}
	// A healthy mount is kept; an unhealthy one is mounted again.
	if err := c.Mount(ctx, "/a", nil); err != nil || b.mounts != 1 {
		t.Fatalf("second Mount of a healthy layer: %v, %d mounts", err, b.mounts)
	}
	b.mu.Lock()
	b.sick["/a"] = true
	b.mu.Unlock()
	if err := c.Mount(ctx, "/a", nil); err != nil || b.mounts != 2 {
		t.Fatalf("Mount of an unhealthy layer: %v, %d mounts", err, b.mounts)
	}
	// Errors keep their class.
	if err := c.Mount(ctx, "/b", map[string]string{"fail": "x"}); !errdefs.IsDataLoss(err) {
		t.Fatalf("failing Mount: want ErrDataLoss, got %v", err)
	}
	if err := c.Check(ctx, "/nope", nil); !errdefs.IsNotFound(err) {
		t.Fatalf("Check of nothing: want ErrNotFound, got %v", err)
	}
	if n, ok := c.LayerSize("/a"); !ok || n != 42 {
		t.Fatalf("LayerSize: %d %v", n, ok)
	}
	if mps, err := c.Mountpoints(ctx); err != nil || !slices.Equal(mps, []string{"/a"}) {
		t.Fatalf("Mountpoints: %v %v", mps, err)
	}
	if err := c.Unmount(ctx, "/a"); err != nil {
		t.Fatal(err)
	}
	if err := c.Unmount(ctx, "/a"); !errdefs.IsNotFound(err) {
		t.Fatalf("second Unmount: want ErrNotFound, got %v", err)
	}
}

// A client whose connection broke dials again on its next call.
func TestClientRedials(t *testing.T) {
	ctx := context.Background()
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	addr, _ := serve(t, b)
	c, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.mu.Lock()
	c.c.Close() // as if the manager had dropped the connection
	c.mu.Unlock()
	if err := c.Mount(ctx, "/a", nil); err != nil {
		t.Fatalf("Mount after the connection broke: %v", err)
	}
}

func TestShutdownUnmountsAll(t *testing.T) {
	ctx := context.Background()
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	addr, done := serve(t, b)
	c, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, mp := range []string{"/a", "/b"} {
		if err := c.Mount(ctx, mp, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if mps := b.Mountpoints(); len(mps) != 0 {
		t.Fatalf("mounts after Shutdown: %v", mps)
	}
	select {
	case err := <-done:
		done <- err // for the cleanup
		if err != nil {
			t.Fatalf("Serve after Shutdown: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after Shutdown")
	}
	if _, err := Dial(ctx, addr); !errdefs.IsUnavailable(err) {
		t.Fatalf("Dial after Shutdown: want ErrUnavailable, got %v", err)
	}
}

// The daemon learns the layers the manager failed: those of layers still
// mounted when it connects, then new ones as they happen; an unmounted
// layer's failure is forgotten.
func TestWatchFailures(t *testing.T) {
	ctx := context.Background()
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	addr := filepath.Join(t.TempDir(), "m.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	failures := NewFailureLog()
	done := make(chan error, 1)
	go func() { done <- Serve(sctx, l, b, ServerOptions{Version: "test", Failures: failures}) }()
	t.Cleanup(func() { cancel(); <-done })

	c, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, mp := range []string{"/a", "/b", "/c"} {
		if err := c.Mount(ctx, mp, nil); err != nil {
			t.Fatal(err)
		}
	}
	failures.Add(Failure{Mountpoint: "/a", Layer: "sha256:aa", Err: "differs"})
	failures.Add(Failure{Mountpoint: "/c", Layer: "sha256:cc", Err: "differs"})
	if err := c.Unmount(ctx, "/c"); err != nil {
		t.Fatal(err)
	}
	got := make(chan Failure, 10)
	wctx, stop := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { defer close(watched); c.WatchFailures(wctx, func(f Failure) { got <- f }) }()
	next := func() Failure {
		t.Helper()
		select {
		case f := <-got:
			return f
		case <-time.After(20 * time.Second):
			t.Fatal("no failure reported")
			return Failure{}
		}
	}
	if f := next(); f.Mountpoint != "/a" || f.Layer != "sha256:aa" || f.Err != "differs" || f.At.IsZero() {
		t.Fatalf("first failure: %+v", f)
	}
	// A failure while the daemon watches arrives without a new call.
	failures.Add(Failure{Mountpoint: "/b", Image: "r/b:v1", Layer: "sha256:bb", ChainID: "sha256:ch", Err: "other"})
	if f := next(); f.Mountpoint != "/b" || f.Image != "r/b:v1" || f.ChainID != "sha256:ch" {
		t.Fatalf("second failure: %+v", f)
	}
	stop()
	<-watched
	select {
	case f := <-got:
		t.Fatalf("unexpected failure reported: %+v (the unmounted layer's must be forgotten)", f)
	default:
	}
}

// The manager's metrics cross the socket intact.
func TestGatherMetrics(t *testing.T) {
	ctx := context.Background()
	reg := prometheus.NewRegistry()
	cnt := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lazypull_test_total", Help: "test"}, []string{"kind"})
	reg.MustRegister(cnt)
	cnt.WithLabelValues("x").Add(3)
	addr := filepath.Join(t.TempDir(), "m.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	go func() { done <- Serve(sctx, l, b, ServerOptions{Metrics: reg}) }()
	t.Cleanup(func() { cancel(); <-done })
	c, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	mfs, err := c.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 1 || mfs[0].GetName() != "lazypull_test_total" || len(mfs[0].Metric) != 1 ||
		mfs[0].Metric[0].GetCounter().GetValue() != 3 || mfs[0].Metric[0].Label[0].GetValue() != "x" {
		t.Fatalf("gathered %v", mfs)
	}
	// A manager that is gone gives an error, and no new manager.
	cancel()
	<-done
	done <- nil
	if _, err := c.Gather(); err == nil {
		t.Fatal("Gather from a stopped manager: no error")
	}
}

// captured is a keychain.Source with one credential.
type captured struct{ forgot chan string }

func (captured) Lookup(_ context.Context, repo, host string) (remote.Credential, bool, error) {
	switch repo {
	case "reg.example/app":
		return remote.Credential{Username: "u", Secret: "s"}, true, nil
	case "reg.example/broken":
		return remote.Credential{}, false, fmt.Errorf("plugin failed: %w", errdefs.ErrUnavailable)
	}
	return remote.Credential{}, false, nil
}

func (c captured) Forget(repo, _ string) { c.forgot <- repo }

// The manager reads with the credentials the daemon captured; while the
// daemon is away a lookup waits for it.
func TestCredentialSource(t *testing.T) {
	ctx := context.Background()
	addr := filepath.Join(t.TempDir(), "c.sock")
	src := captured{forgot: make(chan string, 1)}
	serveCreds := func() (stop func()) {
		l, err := net.Listen("unix", addr)
		if err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- ServeCredentials(cctx, l, src) }()
		return func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("ServeCredentials: %v", err)
			}
		}
	}
	stop := serveCreds()
	cs := NewCredentialSource(addr)
	defer cs.Close()
	cred, ok, err := cs.Lookup(ctx, "reg.example/app", "reg.example")
	if err != nil || !ok || cred.Username != "u" || cred.Secret != "s" {
		t.Fatalf("Lookup: %+v %v %v", cred, ok, err)
	}
	if _, ok, err := cs.Lookup(ctx, "reg.example/other", "reg.example"); err != nil || ok {
		t.Fatalf("Lookup of nothing: %v %v", ok, err)
	}
	if _, _, err := cs.Lookup(ctx, "reg.example/broken", "reg.example"); !errdefs.IsUnavailable(err) {
		t.Fatalf("Lookup of a failing source: want ErrUnavailable, got %v", err)
	}
	cs.Forget("reg.example/app", "reg.example")
	if r := <-src.forgot; r != "reg.example/app" {
		t.Fatalf("Forget reached the daemon as %q", r)
	}
	// The daemon restarts: a lookup meanwhile waits and then succeeds.
	stop()
	os.Remove(addr)
	restarted := make(chan func(), 1)
	go func() { time.Sleep(300 * time.Millisecond); restarted <- serveCreds() }()
	if _, ok, err := cs.Lookup(ctx, "reg.example/app", "reg.example"); err != nil || !ok {
		t.Fatalf("Lookup across a daemon restart: %v %v", ok, err)
	}
	stop = <-restarted
	stop()
	// A daemon that stays away: ErrUnavailable after the wait.
	cs.wait = 200 * time.Millisecond
	cs.Close()
	if _, _, err := cs.Lookup(ctx, "reg.example/app", "reg.example"); !errdefs.IsUnavailable(err) {
		t.Fatalf("Lookup without a daemon: want ErrUnavailable, got %v", err)
	}
}

// A daemon killed while it waits for failures does not leave its
// connection and goroutines in the manager until the wait ends.
func TestFailuresWaitEndsWhenClientHangsUp(t *testing.T) {
	ctx := context.Background()
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	addr, _ := serve(t, b)
	probe, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	goroutines := func() int {
		var h HelloReply
		if err := probe.call(ctx, "Hello", Empty{}, &h); err != nil {
			t.Fatal(err)
		}
		return h.Goroutines
	}
	before := goroutines()
	for range 5 {
		c, err := Dial(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := c.conn(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		call := rc.Go(serviceName+".Failures", FailuresArgs{Wait: time.Minute}, &FailuresReply{}, nil)
		_ = call
		c.Close() // as if the daemon had been killed
	}
	deadline := time.Now().Add(20 * time.Second)
	for goroutines() > before {
		if time.Now().After(deadline) {
			t.Fatalf("manager goroutines: %d, %d before 5 clients waiting for failures hung up", goroutines(), before)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The daemon's /debug/fetches reads the manager's fetch log; a manager
// that keeps none, or that is older than the call, says so.
func TestFetches(t *testing.T) {
	ctx := context.Background()
	b := &memBackend{mounted: map[string]map[string]string{}, sick: map[string]bool{}}
	start := func(opts ServerOptions) string {
		addr := filepath.Join(t.TempDir(), "m.sock")
		l, err := net.Listen("unix", addr)
		if err != nil {
			t.Fatal(err)
		}
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- Serve(sctx, l, b, opts) }()
		t.Cleanup(func() { cancel(); <-done })
		return addr
	}
	const log = `{"dropped":0,"fetches":[{"op":"range"}]}`
	c, err := Dial(ctx, start(ServerOptions{Fetches: func() ([]byte, error) { return []byte(log), nil }}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := c.Fetches(ctx); err != nil || string(got) != log {
		t.Fatalf("Fetches: %q, %v", got, err)
	}

	none, err := Dial(ctx, start(ServerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	defer none.Close()
	if got, err := none.Fetches(ctx); !errdefs.IsNotFound(err) {
		t.Fatalf("Fetches from a manager without a log: want ErrNotFound, got %q, %v", got, err)
	}

	// A manager of the same protocol from before Fetches existed.
	addr := filepath.Join(t.TempDir(), "old.sock")
	l, err := net.Listen("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srv := rpc.NewServer()
	if err := srv.RegisterName(serviceName, oldManager{}); err != nil {
		t.Fatal(err)
	}
	go srv.Accept(l)
	old, err := Dial(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if got, err := old.Fetches(ctx); !errdefs.IsNotImplemented(err) {
		t.Fatalf("Fetches from a manager without the call: want ErrNotImplemented, got %q, %v", got, err)
	}
}

// oldManager answers Hello only, as a manager from before a method was
// added would.
type oldManager struct{}

func (oldManager) Hello(_ Empty, reply *HelloReply) error {
	*reply = HelloReply{Protocol: Protocol, Version: "old", Pid: os.Getpid()}
	return nil
}
