// Package integration holds lazypull's end-to-end tests: real containerd
// daemons (1.6 and 2.x), runc, an in-process registry and real mounts, all
// driven through internal/lab with images from internal/fixture. They need
// root; they fail, never skip, when something they need is missing (run
// hack/install-deps.sh).
package integration

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/lazypull/lazypull/internal/lab"
)

func TestMain(m *testing.M) {
	// The test binary doubles as a stand-in snapshotter daemon; see
	// fake_snapshotter_test.go.
	if os.Getenv(fakeSnapshotterEnv) == "1" {
		os.Exit(fakeSnapshotterMain(os.Args[1:]))
	}
	// The in-process registry logs through logrus, every request and each
	// 404 of a push's existence checks at error level. Registry.Requests
	// keeps what tests need; NewRegistry logs it when a test fails.
	logrus.SetOutput(io.Discard)
	code := m.Run()
	if err := closeShared(); err != nil {
		fmt.Fprintln(os.Stderr, "integration: cleanup:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// One containerd daemon per version serves every test of the binary that
// does not need a daemon of its own; tests keep apart by namespace
// (Containerd.Namespace).
var shared struct {
	mu      sync.Mutex
	daemons map[string]*sharedDaemon
	snBuild struct {
		once sync.Once
		dir  string
		bin  string
		err  error
	}
}

type sharedDaemon struct {
	once sync.Once
	c    *lab.Containerd
	err  error
}

// sharedContainerd returns the test binary's daemon of version v, starting
// it on first use. A missing binary fails the test.
func sharedContainerd(t *testing.T, v lab.Version) *lab.Containerd {
	t.Helper()
	if err := v.Check(); err != nil {
		t.Fatal(err)
	}
	shared.mu.Lock()
	if shared.daemons == nil {
		shared.daemons = map[string]*sharedDaemon{}
	}
	d := shared.daemons[v.Name]
	if d == nil {
		d = &sharedDaemon{}
		shared.daemons[v.Name] = d
	}
	shared.mu.Unlock()
	d.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		d.c, d.err = lab.StartContainerd(ctx, lab.ContainerdConfig{Version: v})
	})
	if d.err != nil {
		t.Fatalf("start shared %s: %v", v.Name, d.err)
	}
	return d.c
}

// lazypullSnapshotter returns the lazypull-snapshotter binary, built once
// per test binary (or taken from LAZYPULL_SNAPSHOTTER_BIN). Tests that need
// it fail, with the build output, when it cannot be had.
func lazypullSnapshotter(t *testing.T) string {
	t.Helper()
	b := &shared.snBuild
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "lazypull-snapshotter-build-")
		if b.err == nil {
			b.bin, b.err = lab.BuildSnapshotter(b.dir)
		}
	})
	if b.err != nil {
		t.Fatalf("lazypull-snapshotter is not available (set %s or fix ./cmd/snapshotter): %v", lab.SnapshotterBinEnv, b.err)
	}
	return b.bin
}

func closeShared() error {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	var firstErr error
	for name, d := range shared.daemons {
		if d.c == nil {
			continue
		}
		if err := d.c.Close(); err != nil && firstErr == nil {
			firstErr = fmt.Errorf("%s: %w", name, err)
		}
	}
	if shared.snBuild.dir != "" {
		os.RemoveAll(shared.snBuild.dir)
	}
	if lazypullCLI.err == nil && lazypullCLI.bin != "" {
		os.RemoveAll(filepath.Dir(lazypullCLI.bin))
	}
	return firstErr
}

// forEachVersion runs f as a parallel subtest per containerd version.
func forEachVersion(t *testing.T, f func(t *testing.T, v lab.Version)) {
	for _, v := range lab.Versions() {
		t.Run(v.Name, func(t *testing.T) {
			t.Parallel()
			f(t, v)
		})
	}
}
