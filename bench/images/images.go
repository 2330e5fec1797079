// Package images builds the benchmark's HelloBench-style images from
// Debian packages: a minimal Debian root file system made with debootstrap
// (the base layer, shared by every image) and, on top of it, one layer with
// the packages and files of a workload. Each workload prints a line when it
// is ready to do useful work; the benchmark times the way to that line.
//
// Built images are kept as OCI image layouts under a cache directory and
// reused until their specification changes.
package images

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/convert"
)

// Spec describes one benchmark image.
type Spec struct {
	// Name is the image's name in the benchmark, e.g. "python".
	Name string
	// Description says what the workload does.
	Description string
	// Packages are the Debian packages installed on the base.
	Packages []string
	// Files are extra files written into the image (path -> content).
	Files map[string]string
	// Cmd is the workload.
	Cmd []string
	// Ready is the prefix of the output line that means "ready".
	Ready string
}

// hash identifies the spec's content, to know when a cached image is
// stale.
func (s Spec) hash(suite string) string {
	h := sha256.New()
	fmt.Fprintf(h, "v1 %s %s %q %q %q\n", suite, s.Name, s.Packages, s.Cmd, s.Ready)
	keys := make([]string, 0, len(s.Files))
	for k := range s.Files {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "%s\x00%s\x00", k, s.Files[k])
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// pythonStart imports every standard-library module it can: a start-up
// that reads about a thousand small files.
const pythonStart = `import importlib, pkgutil, sys
skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "ensurepip", "venv", "pydoc_data", "__main__"}
n = 0
def load(name):
    global n
    try:
        m = importlib.import_module(name)
        n += 1
        return m
    except BaseException:
        return None
for top in sorted(sys.stdlib_module_names):
    if top in skip or top.startswith("_"):
        continue
    m = load(top)
    path = getattr(m, "__path__", None)
    if not path:
        continue
    for info in pkgutil.walk_packages(path, top + "."):
        parts = info.name.split(".")
        if any(p in skip or p.startswith("test") or p == "__main__" for p in parts):
            continue
        load(info.name)
print("ready: imported %d modules, %d loaded" % (n, len(sys.modules)), flush=True)
`

const helloC = `#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct item { char name[32]; int weight; };

static int cmp(const void *a, const void *b) {
	return ((const struct item *)a)->weight - ((const struct item *)b)->weight;
}

int main(void) {
	struct item items[64];
	for (int i = 0; i < 64; i++) {
		snprintf(items[i].name, sizeof items[i].name, "item-%d", i);
		items[i].weight = (i * 7919) % 101;
	}
	qsort(items, 64, sizeof items[0], cmp);
	printf("ready: lightest %s\n", items[0].name);
	return 0;
}
`

const nodeStart = `const mods = ["http", "https", "crypto", "zlib", "stream", "url", "util", "fs", "path", "os", "events", "child_process", "net", "dns", "readline", "assert", "buffer", "querystring", "string_decoder", "worker_threads", "perf_hooks", "v8", "vm", "tls", "http2"];
for (const m of mods) require(m);
const http = require("http");
const srv = http.createServer((req, res) => res.end("ok"));
srv.listen(0, "127.0.0.1", () => { console.log("ready: node " + process.version + " serving on " + srv.address().port); srv.close(); });
`

// scienceStart imports a scientific Python stack and does a little work.
const scienceStart = `import numpy as np, scipy.linalg, pandas as pd, sklearn.linear_model
a = np.random.default_rng(1).standard_normal((200, 200))
df = pd.DataFrame(a[:, :4], columns=list("abcd"))
m = sklearn.linear_model.LinearRegression().fit(df[["a", "b", "c"]], df["d"])
print("ready: det %.3f, coef %.3f" % (scipy.linalg.det(a[:8, :8]), m.coef_[0]), flush=True)
`

// pandasStart is an import-heavy scientific start-up: pandas (and numpy
// under it, with their compiled extensions and shared libraries) and a
// small computation, as a data job or a notebook kernel begins.
const pandasStart = `import time
t0 = time.monotonic()
import numpy as np
import pandas as pd
rng = np.random.default_rng(7)
df = pd.DataFrame({"k": rng.integers(0, 16, 20000), "v": rng.standard_normal(20000)})
g = df.groupby("k")["v"].agg(["mean", "std", "count"])
s = pd.Series(pd.date_range("2026-01-01", periods=96, freq="h")).dt.day.value_counts()
print("ready: pandas %s numpy %s, %d groups, %d days, mean %.4f, %.2fs" % (pd.__version__, np.__version__, len(g), len(s), g["mean"].mean(), time.monotonic() - t0), flush=True)
`

// DefaultSpecs returns the benchmark's images: an interpreter whose
// start-up imports about a thousand small files, a compiler building a
// small program, a JavaScript runtime starting a server, an import-heavy
// scientific Python start-up (pandas), and an image of more than 1 GB
// uncompressed whose workload uses a small part of it.
func DefaultSpecs() []Spec {
	return []Spec{
		{
			Name:        "python",
			Description: "python3 importing every standard-library module and submodule (~1000 small files)",
			Packages:    []string{"python3"},
			Files:       map[string]string{"/bench/start.py": pythonStart},
			Cmd:         []string{"python3", "/bench/start.py"},
			Ready:       "ready",
		},
		{
			Name:        "gcc",
			Description: "gcc compiling and running a small C program",
			Packages:    []string{"gcc", "libc6-dev"},
			Files:       map[string]string{"/bench/hello.c": helloC},
			Cmd:         []string{"sh", "-c", "gcc -O2 -o /tmp/hello /bench/hello.c && /tmp/hello"},
			Ready:       "ready",
		},
		{
			Name:        "node",
			Description: "node.js loading 25 built-in modules and starting an HTTP server",
			Packages:    []string{"nodejs"},
			Files:       map[string]string{"/bench/start.js": nodeStart},
			Cmd:         []string{"node", "/bench/start.js"},
			Ready:       "ready",
		},
		{
			Name:        "pandas",
			Description: "python3 importing pandas and numpy (compiled extensions, shared libraries) and grouping 20k rows",
			Packages:    []string{"python3-numpy", "python3-pandas"},
			Files:       map[string]string{"/bench/start.py": pandasStart},
			Cmd:         []string{"python3", "/bench/start.py"},
			Ready:       "ready",
		},
		{
			Name:        "large",
			Description: "1+ GB scientific and development image; python imports numpy, scipy, pandas, scikit-learn",
			Packages: []string{"python3-numpy", "python3-scipy", "python3-pandas", "python3-sklearn",
				"python3-matplotlib", "golang-go", "gcc", "g++", "openjdk-17-jdk-headless"},
			Files: map[string]string{"/bench/start.py": scienceStart},
			Cmd:   []string{"python3", "/bench/start.py"},
			Ready: "ready",
		},
	}
}

// Builder builds and caches images.
type Builder struct {
	// CacheDir holds the base root file system and built image layouts.
	CacheDir string
	// Mirror is the Debian mirror (default: the machine's apt source).
	Mirror string
	// Suite is the Debian suite (default "bookworm").
	Suite string
	// Log receives progress lines (default os.Stderr).
	Log io.Writer
}

func (b *Builder) logf(format string, args ...any) {
	w := b.Log
	if w == nil {
		w = os.Stderr
	}
	fmt.Fprintf(w, "images: "+format+"\n", args...)
}

func (b *Builder) suite() string {
	if b.Suite == "" {
		return "bookworm"
	}
	return b.Suite
}

// MirrorFromAptSources reads the first Debian mirror URI from the
// machine's apt sources (deb822 .sources files or sources.list).
func MirrorFromAptSources() (string, error) {
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	return mirrorFrom(append(files, "/etc/apt/sources.list"))
}

// mirrorFrom returns the first Debian (non-security) mirror in the given
// apt source files.
func mirrorFrom(files []string) (string, error) {
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			var uri string
			if v, ok := strings.CutPrefix(line, "URIs:"); ok {
				uri = strings.Fields(v)[0]
			} else if strings.HasPrefix(line, "deb ") {
				fs := strings.Fields(line)
				for _, x := range fs[1:] {
					if strings.HasPrefix(x, "http") {
						uri = x
						break
					}
				}
			}
			if uri != "" && strings.Contains(uri, "debian") && !strings.Contains(uri, "security") {
				f.Close()
				return strings.TrimRight(uri, "/"), nil
			}
		}
		f.Close()
	}
	return "", errors.New("no Debian mirror found in /etc/apt/sources.list{,.d}")
}

func (b *Builder) mirror() (string, error) {
	if b.Mirror != "" {
		return b.Mirror, nil
	}
	return MirrorFromAptSources()
}

func run(ctx context.Context, log io.Writer, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		tail := string(out)
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tail)
	}
	return nil
}

// Base returns the debootstrapped minimal root file system, building it
// on first use.
func (b *Builder) Base(ctx context.Context) (string, error) {
	dir := filepath.Join(b.CacheDir, "base-"+b.suite())
	rootfs := filepath.Join(dir, "rootfs")
	if _, err := os.Stat(filepath.Join(dir, "complete")); err == nil {
		return rootfs, nil
	}
	mirror, err := b.mirror()
	if err != nil {
		return "", err
	}
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	b.logf("debootstrap --variant=minbase %s from %s (a few minutes, once)", b.suite(), mirror)
	start := time.Now()
	if err := run(ctx, b.Log, "debootstrap", "--variant=minbase", b.suite(), rootfs, mirror); err != nil {
		return "", fmt.Errorf("building the base root file system: %w", err)
	}
	// apt in the chroot must find the same mirror; clean caches.
	_ = os.WriteFile(filepath.Join(rootfs, "etc/apt/sources.list"), fmt.Appendf(nil, "deb %s %s main\n", mirror, b.suite()), 0o644)
	_ = os.RemoveAll(filepath.Join(rootfs, "var/cache/apt/archives"))
	_ = os.MkdirAll(filepath.Join(rootfs, "var/cache/apt/archives/partial"), 0o755)
	if err := os.WriteFile(filepath.Join(dir, "complete"), nil, 0o644); err != nil {
		return "", err
	}
	b.logf("base ready in %s", time.Since(start).Round(time.Second))
	return rootfs, nil
}

// Build returns the OCI image layout of spec (tag "v1"), building it when
// the cached one is missing or stale.
func (b *Builder) Build(ctx context.Context, spec Spec) (string, error) {
	base, err := b.Base(ctx)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(b.CacheDir, "images", spec.Name)
	layout := filepath.Join(dir, "layout")
	stamp := filepath.Join(dir, "spec")
	want := spec.hash(b.suite())
	if got, err := os.ReadFile(stamp); err == nil && string(got) == want {
		return layout, nil
	}
	os.RemoveAll(dir)
	upper, work, merged := filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "merged")
	for _, d := range []string{upper, work, merged, layout} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	b.logf("building %s: apt-get install %s", spec.Name, strings.Join(spec.Packages, " "))
	start := time.Now()
	if err := b.install(ctx, base, upper, work, merged, spec); err != nil {
		return "", fmt.Errorf("image %s: %w", spec.Name, err)
	}
	b.logf("%s installed in %s; writing layers", spec.Name, time.Since(start).Round(time.Second))
	if err := b.writeLayout(ctx, base, upper, work, merged, layout, spec); err != nil {
		return "", fmt.Errorf("image %s: %w", spec.Name, err)
	}
	os.RemoveAll(upper)
	os.RemoveAll(work)
	if err := os.WriteFile(stamp, []byte(want), 0o644); err != nil {
		return "", err
	}
	b.logf("%s ready in %s", spec.Name, time.Since(start).Round(time.Second))
	return layout, nil
}

func overlay(base, upper, work, target string, ro bool) error {
	opts := []string{"lowerdir=" + base, "upperdir=" + upper, "workdir=" + work}
	if ro {
		opts = []string{"ro", "lowerdir=" + upper + ":" + base}
	}
	m := mount.Mount{Type: "overlay", Source: "overlay", Options: opts}
	return m.Mount(target)
}

// install runs apt-get in a chroot on an overlay of the base, so that the
// upper directory receives exactly the image's own layer.
func (b *Builder) install(ctx context.Context, base, upper, work, merged string, spec Spec) (err error) {
	if err := overlay(base, upper, work, merged, false); err != nil {
		return fmt.Errorf("overlay for the build: %w", err)
	}
	defer func() {
		if uerr := unix.Unmount(merged, unix.MNT_DETACH); err == nil && uerr != nil {
			err = uerr
		}
	}()
	proc, dev := filepath.Join(merged, "proc"), filepath.Join(merged, "dev")
	if err := unix.Mount("proc", proc, "proc", 0, ""); err != nil {
		return fmt.Errorf("mounting proc: %w", err)
	}
	defer unix.Unmount(proc, unix.MNT_DETACH)
	if err := unix.Mount("/dev", dev, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("binding /dev: %w", err)
	}
	defer unix.Unmount(dev, unix.MNT_DETACH)
	policy := filepath.Join(merged, "usr/sbin/policy-rc.d")
	if err := os.WriteFile(policy, []byte("#!/bin/sh\nexit 101\n"), 0o755); err != nil {
		return err
	}
	if resolv, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		_ = os.WriteFile(filepath.Join(merged, "etc/resolv.conf"), resolv, 0o644)
	}
	script := "set -e; apt-get update -qq; apt-get install -y -qq --no-install-recommends " + strings.Join(spec.Packages, " ") +
		"; apt-get clean; rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old"
	if err := run(ctx, b.Log, "chroot", merged, "sh", "-c", script); err != nil {
		return err
	}
	for name, content := range spec.Files {
		p := filepath.Join(merged, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// writeLayout writes the two-layer image as an OCI layout.
func (b *Builder) writeLayout(ctx context.Context, base, upper, work, merged, layout string, spec Spec) error {
	empty, err := os.MkdirTemp("", "lazypull-empty-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(empty)
	store, err := convert.OpenStore(convert.LayoutPrefix+layout+":v1", nil)
	if err != nil {
		return err
	}
	baseLayer, baseDiff, err := b.layer(ctx, store, empty, base, layout)
	if err != nil {
		return fmt.Errorf("base layer: %w", err)
	}
	if err := overlay(base, upper, work, merged, true); err != nil {
		return fmt.Errorf("overlay for the diff: %w", err)
	}
	appLayer, appDiff, err := b.layer(ctx, store, base, merged, layout)
	unix.Unmount(merged, unix.MNT_DETACH)
	if err != nil {
		return fmt.Errorf("image layer: %w", err)
	}
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: goarch()},
		Config: ocispec.ImageConfig{
			Cmd: spec.Cmd,
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8"},
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{baseDiff, appDiff}},
	}
	cb, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cdesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))}
	if err := store.Push(ctx, cdesc, strings.NewReader(string(cb))); err != nil {
		return err
	}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: cdesc, Layers: []ocispec.Descriptor{baseLayer, appLayer}}
	mb, err := json.Marshal(m)
	if err != nil {
		return err
	}
	mdesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb))}
	return store.PushManifest(ctx, mdesc, mb, true)
}

// layer writes the diff from a to b as a gzip layer blob.
func (b *Builder) layer(ctx context.Context, store convert.Store, a, bdir, layout string) (ocispec.Descriptor, digest.Digest, error) {
	tmp, err := os.CreateTemp(layout, ".layer-*")
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	blobDigester, diffDigester := digest.Canonical.Digester(), digest.Canonical.Digester()
	cw := &countWriter{w: io.MultiWriter(tmp, blobDigester.Hash())}
	zw, err := gzip.NewWriterLevel(cw, gzip.DefaultCompression)
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := archive.WriteDiff(ctx, io.MultiWriter(zw, diffDigester.Hash()), a, bdir); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := zw.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: blobDigester.Digest(), Size: cw.n}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := store.Push(ctx, desc, tmp); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return desc, diffDigester.Digest(), nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
