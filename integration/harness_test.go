package integration

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
)

// TestRegistryStopStart checks that a stopped registry refuses connections
// and that a restarted one serves the same content on the same port.
func TestRegistryStopStart(t *testing.T) {
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	img, err := fixture.BuildImage(fixture.DefaultConfig(), base)
	if err != nil {
		t.Fatal(err)
	}
	reg := lab.NewRegistry(t)
	if _, err := reg.Push(context.Background(), "stopstart:v1", img); err != nil {
		t.Fatal(err)
	}
	blobURL := reg.URL() + "/v2/stopstart/blobs/" + img.Layers[0].Digest().String()
	get := func() ([]byte, error) {
		req, err := http.NewRequest(http.MethodGet, blobURL, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Range", "bytes=0-99")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusPartialContent {
			return nil, errors.New("status " + resp.Status)
		}
		return io.ReadAll(resp.Body)
	}
	b, err := get()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, img.Layers[0].Data[:100]) {
		t.Fatal("range read returned the wrong bytes")
	}

	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := get(); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("stopped registry: want connection refused, got %v", err)
	}
	if err := reg.Start(); err != nil {
		t.Fatal(err)
	}
	if b, err = get(); err != nil || !bytes.Equal(b, img.Layers[0].Data[:100]) {
		t.Fatalf("restarted registry: %v", err)
	}
	var ranges int
	for _, r := range reg.BlobRequests() {
		if r.Range == "bytes=0-99" && r.Status == http.StatusPartialContent && r.Bytes == 100 {
			ranges++
		}
	}
	if ranges != 2 {
		t.Fatalf("want 2 recorded range reads, got %d: %+v", ranges, reg.Requests())
	}
}

// TestProxySnapshotter runs the harness the way lazypull's tests will: a
// snapshotter daemon (here the test binary serving containerd's overlayfs
// snapshotter, see fake_snapshotter_test.go) behind a proxy plugin of a
// containerd of its own, through pulls, runs, a snapshotter crash and
// restart, and a containerd restart.
func TestProxySnapshotter(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	img := threeLayerImage(t)
	want, err := img.ExpectedTree()
	if err != nil {
		t.Fatal(err)
	}
	reg := lab.NewRegistry(t)

	forEachVersion(t, func(t *testing.T, v lab.Version) {
		sn := lab.NewSnapshotter(t, lab.SnapshotterConfig{
			Binary:   self,
			Env:      []string{fakeSnapshotterEnv + "=1"},
			Config:   "# lazypull-snapshotter config\n",
			LogLevel: "debug",
		})
		c := lab.NewContainerd(t, lab.ContainerdConfig{
			Version:           v,
			ProxySnapshotters: map[string]string{"lazypull": sn.Address()},
		})
		ctx := c.Namespace(t)
		ref, err := reg.Push(ctx, "proxy/three-layers:"+v.Name, img)
		if err != nil {
			t.Fatal(err)
		}
		image, err := c.Pull(ctx, ref, "lazypull")
		if err != nil {
			t.Fatal(err)
		}
		run := func(stage string) {
			t.Helper()
			res, err := c.Run(ctx, image, lab.RunOptions{Snapshotter: "lazypull", Args: []string{"cat", "/etc/motd"}})
			if err != nil {
				t.Fatalf("%s: %v", stage, err)
			}
			if res.ExitCode != 0 || res.Stdout != "layer 3\n" {
				t.Fatalf("%s: want exit 0 and %q, got %s", stage, "layer 3\n", res)
			}
		}
		run("first run")
		got, err := c.ImageTree(ctx, image, "lazypull")
		if err != nil {
			t.Fatal(err)
		}
		if d := fixture.Diff(want, got, nil); len(d) > 0 {
			t.Fatalf("rootfs differs (- want, + got):\n%s", fixture.FormatDiff(d, 50))
		}
		if !strings.HasPrefix(c.Version(), v.ServerVersion) {
			t.Errorf("daemon version %q", c.Version())
		}

		// A crashed snapshotter: containerd's calls fail until it is back.
		pid := sn.Pid()
		if err := sn.Kill(); err != nil {
			t.Fatal(err)
		}
		if sn.Running() {
			t.Fatal("snapshotter still running after Kill")
		}
		if _, err := c.Run(ctx, image, lab.RunOptions{Snapshotter: "lazypull", Args: []string{"true"}, Timeout: 20 * time.Second}); err == nil {
			t.Fatal("run succeeded with the snapshotter down")
		}
		if err := sn.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if sn.Pid() == pid {
			t.Fatal("snapshotter was not restarted")
		}
		if err := c.WaitSnapshotter(ctx, "lazypull"); err != nil {
			t.Fatal(err)
		}
		run("after snapshotter restart")

		// Graceful restarts of both daemons keep the image usable.
		if err := sn.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.WaitSnapshotter(ctx, "lazypull"); err != nil {
			t.Fatal(err)
		}
		run("after containerd restart")

		log, err := os.ReadFile(sn.LogPath())
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(log), "fake-snapshotter: serving on "+sn.Address()); n != 3 {
			t.Errorf("snapshotter log: want 3 starts, got %d:\n%s", n, log)
		}
		if _, err := os.Stat(filepath.Join(sn.Dir(), "config.toml")); err != nil {
			t.Errorf("config: %v", err)
		}
	})
}
