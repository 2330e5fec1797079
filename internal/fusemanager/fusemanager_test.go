package fusemanager

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
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
