package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/fusemanager"
	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/snapshot"
)

// loopScript checksums every file listed in /sums, in order, $1 times,
// sleeping $2 microseconds after each; each file checked is appended to
// /out/progress (a host directory). A read error or a wrong byte prints
// BAD and exits 1; success (or /out/stop appearing) prints DONE.
const loopScript = `#!/bin/sh
n=0
while [ $n -lt $1 ]; do
  while read sum name; do
    got=$(sha256sum "$name")
    if [ "${got%% *}" != "$sum" ]; then echo "BAD pass $n $name: $got"; exit 1; fi
    echo "$n $name" >> /out/progress
    if [ -f /out/stop ]; then echo DONE; exit 0; fi
    busybox usleep $2
  done < /sums
  n=$((n+1))
done
echo DONE
`

// loopImage is busybox plus a layer of files random bytes, their sums and
// loopScript.
func loopImage(t *testing.T, files, size int) *fixture.Image {
	t.Helper()
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	top := fixture.NewLayer().File("loop.sh", loopScript, fixture.Mode(0o755))
	r := rand.New(rand.NewChaCha8([32]byte{'r', 'e', 's', 't', 'a', 'r', 't'}))
	var sums strings.Builder
	for i := range files {
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(r.Uint32())
		}
		name := fmt.Sprintf("data/f%04d", i)
		top.FileBytes(name, b)
		fmt.Fprintf(&sums, "%x  /%s\n", sha256.Sum256(b), name)
	}
	top.File("sums", sums.String())
	img, err := fixture.BuildImage(fixture.DefaultConfig(), base, top)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// progress follows a container's /out/progress from the host: when each
// line arrived.
type progress struct {
	path string
	stop chan struct{}
	done chan struct{}

	mu    sync.Mutex
	times []time.Time
}

func watchProgress(dir string) *progress {
	p := &progress{path: filepath.Join(dir, "progress"), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		seen := 0
		for {
			b, _ := os.ReadFile(p.path)
			n := bytes.Count(b, []byte("\n"))
			if n > seen {
				now := time.Now()
				p.mu.Lock()
				for range n - seen {
					p.times = append(p.times, now)
				}
				p.mu.Unlock()
				seen = n
			}
			select {
			case <-p.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return p
}

func (p *progress) lines() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.times)
}

// waitLines waits until n more lines than now arrived.
func (p *progress) waitLines(t *testing.T, n int) {
	t.Helper()
	want := p.lines() + n
	if !waitFor(60*time.Second, func() bool { return p.lines() >= want }) {
		t.Fatalf("container progress stuck at %d lines (want %d)", p.lines(), want)
	}
}

// maxGap is the longest wait between two lines arriving in [from, to],
// counting from the last line before from.
func (p *progress) maxGap(from, to time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var gap time.Duration
	prev := time.Time{}
	for _, at := range p.times {
		if at.Before(from) {
			prev = at
			continue
		}
		if !prev.IsZero() && at.Sub(prev) > gap {
			gap = at.Sub(prev)
		}
		prev = at
		if at.After(to) {
			break
		}
	}
	return gap
}

// medianGap is the median wait between lines.
func (p *progress) medianGap() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var gaps []time.Duration
	for i := 1; i < len(p.times); i++ {
		gaps = append(gaps, p.times[i].Sub(p.times[i-1]))
	}
	if len(gaps) == 0 {
		return 0
	}
	slices.Sort(gaps)
	return gaps[len(gaps)/2]
}

func (p *progress) close() { close(p.stop); <-p.done }

// runningContainer is a container started in the background.
type runningContainer struct {
	dir  string
	prog *progress
	done chan struct{}
	res  *lab.RunResult
	err  error
}

// startLoop runs args in a container of img with a host directory at /out,
// in the background.
func (e *lazyEnv) startLoop(t *testing.T, ctx context.Context, img client.Image, args ...string) *runningContainer {
	t.Helper()
	out := t.TempDir()
	rc := &runningContainer{dir: out, prog: watchProgress(out), done: make(chan struct{})}
	go func() {
		defer close(rc.done)
		rc.res, rc.err = e.c.Run(ctx, img, lab.RunOptions{
			Snapshotter: lazypullName,
			Args:        args,
			Timeout:     5 * time.Minute,
			SpecOpts: []oci.SpecOpts{oci.WithMounts([]specs.Mount{{
				Destination: "/out", Type: "bind", Source: out, Options: []string{"rbind", "rw"},
			}})},
		})
	}()
	t.Cleanup(func() { <-rc.done; rc.prog.close() })
	return rc
}

// wait waits for the container to exit and fails the test unless it
// printed DONE and exited 0.
func (rc *runningContainer) wait(t *testing.T, what string) {
	t.Helper()
	<-rc.done
	if rc.err != nil {
		t.Fatalf("%s: %v", what, rc.err)
	}
	if rc.res.ExitCode != 0 || !strings.Contains(rc.res.Stdout, "DONE") {
		t.Fatalf("%s: %s", what, rc.res)
	}
}

// stop asks a loopScript container to finish and waits for it.
func (rc *runningContainer) stop(t *testing.T, what string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(rc.dir, "stop"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	rc.wait(t, what)
}

// mapDiff describes how two maps differ; "" if they do not.
func mapDiff(before, after map[string]string) string {
	var d []string
	for k, v := range before {
		if w, ok := after[k]; !ok || w != v {
			d = append(d, fmt.Sprintf("- %s %s", k, v))
		}
	}
	for k, v := range after {
		if w, ok := before[k]; !ok || w != v {
			d = append(d, fmt.Sprintf("+ %s %s", k, v))
		}
	}
	slices.Sort(d)
	return strings.Join(d, "\n")
}

// managerClient connects to the env's fuse manager.
func (e *lazyEnv) managerClient(t *testing.T, ctx context.Context) *fusemanager.Client {
	t.Helper()
	c, err := fusemanager.Dial(ctx, filepath.Join(e.sn.Root(), "fuse-manager.sock"))
	if err != nil {
		t.Fatalf("fuse manager: %v", err)
	}
	return c
}

// restartManaged stops the daemon (SIGKILL or SIGTERM) and starts it
// again; the layer mounts must stay throughout. It returns when the daemon
// was stopped and when containerd reached the new one.
func (e *lazyEnv) restartManaged(t *testing.T, ctx context.Context, kill bool) (stopped, back time.Time) {
	t.Helper()
	before := e.fuseMounts(t)
	stop := e.sn.Stop
	if kill {
		stop = e.sn.Kill
	}
	stopped = time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if got := e.fuseMounts(t); len(got) != len(before) {
		t.Errorf("FUSE mounts while the daemon is down: %d, before %d", len(got), len(before))
	}
	if err := e.sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.c.WaitSnapshotter(ctx, lazypullName); err != nil {
		t.Fatal(err)
	}
	return stopped, time.Now()
}

// threads is the number of threads of process pid.
func threads(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// fds lists what process pid has open, leaving out the chunk files of the
// cache (open while the workload holds a file open: passthrough) and
// giving sockets without their inode numbers.
func fds(t *testing.T, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if strings.Contains(l, "/cache/sha256/") {
			continue
		}
		if strings.HasPrefix(l, "socket:") {
			l = "socket"
		}
		out = append(out, e.Name()+" "+l)
	}
	return out
}

// TestRestartFuseManager runs containers while the daemon is killed,
// upgraded, stopped and started again with [fuse_manager] on: the layers
// are served by the fuse manager, so the containers read on, uncached
// chunks included, and see only correct bytes. Then it checks that kill
// and start cycles leak nothing, that a layer mount the daemon's metadata
// no longer knows is unmounted at start, that a killed manager is replaced,
// and that `fuse-manager --stop`
// (uninstall) leaves no mount or process behind.
func TestRestartFuseManager(t *testing.T) {
	t.Parallel()
	v := lab.Containerd2()
	cvLoop := convertImage(t, loopImage(t, 400, 32<<10), estargz.Gzip)
	cvA := convertImage(t, appImage(t, "A"), estargz.Gzip)
	cvB := convertImage(t, threeLayerImage(t), estargz.Gzip)
	reg := lab.NewRegistry(t)
	refLoop := push(t, reg, "restart/loop:v1", cvLoop.image)
	refA := push(t, reg, "restart/a:v1", cvA.image)
	refB := push(t, reg, "restart/b:v1", cvB.image)

	// The daemon runs from a copy of the shared build, which an upgrade
	// replaces with a fresh build.
	binDir := t.TempDir()
	bin := filepath.Join(binDir, "lazypull-snapshotter")
	if out, err := exec.Command("cp", lazypullSnapshotter(t), bin).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	env := newLazyEnv(t, v, reg, lazyOptions{Binary: bin})
	root := env.sn.Root()
	// lab's cleanup stops the manager (and checks its log for races).
	ctx := env.c.Namespace(t)

	loop := env.pull(t, ctx, refLoop)
	a := env.pull(t, ctx, refA)
	b := env.pull(t, ctx, refB)
	env.checkRemote(t, ctx, loop, true)
	mc := env.managerClient(t, ctx)
	managerPid := mc.Manager().Pid
	mc.Close()
	// The default config started the manager (no [fuse_manager] section).
	if pid := env.sn.ManagerPid(); pid != managerPid || pid == env.sn.Pid() {
		t.Fatalf("lab's ManagerPid %d, the manager says %d (daemon %d)", pid, managerPid, env.sn.Pid())
	}

	upgradeDir := t.TempDir()
	upgraded, err := lab.Build(upgradeDir, "./cmd/snapshotter", "lazypull-snapshotter")
	if err != nil {
		t.Fatal(err)
	}

	// 1. SIGKILL mid-loop while the first pass still reads uncached
	// chunks, then an upgrade: kill, replace the binary, start.
	c := env.startLoop(t, ctx, loop, "/loop.sh", "2", "10000")
	c.prog.waitLines(t, 40)
	var windows [][2]time.Time
	from, to := env.restartManaged(t, ctx, true)
	windows = append(windows, [2]time.Time{from, to})
	t.Logf("SIGKILL + start: daemon back after %v, %d files checked so far", to.Sub(from), c.prog.lines())
	c.prog.waitLines(t, 40)
	if err := os.Rename(upgraded, bin); err != nil {
		t.Fatal(err)
	}
	from, to = env.restartManaged(t, ctx, true)
	blobReqs := len(reg.BlobRequests())
	windows = append(windows, [2]time.Time{from, to})
	t.Logf("SIGKILL + upgraded binary: daemon back after %v, %d files checked so far", to.Sub(from), c.prog.lines())
	if n := c.prog.lines(); n >= 400 {
		t.Errorf("the first pass (uncached reads) ended before the upgrade restart (%d files): make it longer", n)
	}
	c.wait(t, "loop across SIGKILL and upgrade")
	median := c.prog.medianGap()
	for i, w := range windows {
		d := w[1].Add(time.Second).Sub(w[0])
		t.Logf("restart %d: longest gap between two checked files around it %v; in the %v before it %v (median gap %v)",
			i+1, c.prog.maxGap(w[0], w[1].Add(time.Second)), d, c.prog.maxGap(w[0].Add(-d), w[0]), median)
	}
	mc = env.managerClient(t, ctx)
	if pid := mc.Manager().Pid; pid != managerPid {
		t.Errorf("fuse manager pid %d, was %d: it did not survive the daemon", pid, managerPid)
	}
	mc.Close()
	// The first pass read uncached chunks after both restarts: the
	// registry saw range reads of the loop image's blobs since.
	ranged := 0
	for _, r := range reg.BlobRequests()[blobReqs:] {
		if r.Range != "" && strings.Contains(r.Path, "/restart/loop/") {
			ranged++
		}
	}
	if ranged == 0 {
		t.Errorf("no range reads of the loop image after the restarts: every chunk was cached already, the test proves less than it should")
	}
	t.Logf("range reads of the loop image after the upgrade restart: %d", ranged)

	// 2. A graceful restart with three containers of three images reading.
	cs := []*runningContainer{
		env.startLoop(t, ctx, loop, "/loop.sh", "3", "2000"),
		env.startLoop(t, ctx, a, "sh", "-c", `i=0; while [ $i -lt 300 ]; do [ "$(cat /etc/motd)" = "image A" ] || { echo BAD; exit 1; }; cat /opt/shared.bin >/dev/null || exit 1; echo $i >> /out/progress; busybox usleep 5000; i=$((i+1)); done; echo DONE`),
		env.startLoop(t, ctx, b, "sh", "-c", `i=0; while [ $i -lt 300 ]; do [ "$(cat /etc/motd)" = "layer 3" ] || { echo BAD; exit 1; }; sha256sum /data/blob >/dev/null || exit 1; echo $i >> /out/progress; busybox usleep 5000; i=$((i+1)); done; echo DONE`),
	}
	for _, c := range cs {
		c.prog.waitLines(t, 5)
	}
	from, to = env.restartManaged(t, ctx, false)
	for i, c := range cs {
		c.prog.waitLines(t, 5)
		t.Logf("SIGTERM + start: container %d longest gap %v (median %v)", i, c.prog.maxGap(from, to.Add(time.Second)), c.prog.medianGap())
	}
	for i, c := range cs {
		c.wait(t, fmt.Sprintf("container %d across SIGTERM", i))
	}

	// 3. Kill/start cycles with a container reading: nothing leaks.
	mountsBefore := env.fuseMounts(t)
	procsBefore := lab.ProcessesNaming(root)
	fdsBefore := fds(t, managerPid)
	threadsBefore := threads(t, managerPid)
	goroutines := func() int {
		mc := env.managerClient(t, ctx)
		defer mc.Close()
		return mc.Manager().Goroutines
	}
	goroutinesBefore := goroutines()
	const cycles = 20
	c = env.startLoop(t, ctx, loop, "/loop.sh", "100", "1000")
	c.prog.waitLines(t, 5)
	// The registry is down meanwhile: neither the restarts nor the
	// container's (cached) reads need it.
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	for range cycles {
		env.restartManaged(t, ctx, true)
	}
	c.prog.waitLines(t, 5)
	if err := reg.Start(); err != nil {
		t.Fatal(err)
	}
	if d := mapDiff(mountsBefore, env.fuseMounts(t)); d != "" {
		t.Errorf("FUSE mounts after %d cycles differ:\n%s", cycles, d)
	}
	if got := lab.ProcessesNaming(root); len(got) != len(procsBefore) {
		t.Errorf("processes on the root: %v, before %v", got, procsBefore)
	}
	var fdsAfter []string
	waitFor(10*time.Second, func() bool { fdsAfter = fds(t, managerPid); return len(fdsAfter) <= len(fdsBefore) })
	if len(fdsAfter) > len(fdsBefore) {
		t.Errorf("fuse manager has %d open files after %d cycles, %d before:\nbefore %q\nafter %q", len(fdsAfter), cycles, len(fdsBefore), fdsBefore, fdsAfter)
	}
	// A leak per cycle would show as 20 or more; a few come and go with
	// the registry's keep-alive connections.
	var goroutinesAfter int
	waitFor(10*time.Second, func() bool { goroutinesAfter = goroutines(); return goroutinesAfter <= goroutinesBefore+5 })
	if goroutinesAfter > goroutinesBefore+5 {
		t.Errorf("fuse manager goroutines: %d after %d cycles, %d before", goroutinesAfter, cycles, goroutinesBefore)
	}
	t.Logf("after %d kill/start cycles: %d FUSE mounts, processes %v, manager fds %d (before %d), threads %d (before %d), goroutines %d (before %d)",
		cycles, len(mountsBefore), procsBefore, len(fdsAfter), len(fdsBefore), threads(t, managerPid), threadsBefore, goroutinesAfter, goroutinesBefore)
	c.stop(t, "loop across kill/start cycles")

	// 4. A layer mount whose snapshot the metadata no longer has (removed
	// while the daemon was down) is unmounted when the daemon starts.
	var labels map[string]string
	for _, info := range env.backendSnapshots(t, ctx) {
		if info.Labels[snapshot.LabelRemote] == "true" {
			labels = info.Labels
			break
		}
	}
	if labels == nil {
		t.Fatal("no remote snapshot")
	}
	if err := env.sn.Kill(); err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(root, "snapshots", "999999", "fs")
	mc = env.managerClient(t, ctx)
	if err := mc.Mount(ctx, orphan, labels); err != nil {
		t.Fatalf("mounting an orphan layer: %v", err)
	}
	mc.Close()
	if _, ok := env.fuseMounts(t)[orphan]; !ok {
		t.Fatalf("orphan layer not mounted: %v", env.fuseMounts(t))
	}
	if err := env.sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !waitFor(10*time.Second, func() bool { _, ok := env.fuseMounts(t)[orphan]; return !ok }) {
		t.Errorf("the orphan layer mount is still there after start")
	}

	// 5. The manager itself dies (SIGKILL): the daemon starts a new one on
	// its next call and mounts the layers again for new containers.
	if err := env.c.WaitSnapshotter(ctx, lazypullName); err != nil {
		t.Fatal(err)
	}
	mc = env.managerClient(t, ctx)
	oldManager := mc.Manager().Pid
	mc.Close()
	if err := syscall.Kill(oldManager, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(10*time.Second, func() bool { return syscall.Kill(oldManager, 0) != nil })
	if out := env.run(t, ctx, a, "cat", "/etc/motd"); out != "image A\n" {
		t.Fatalf("after the manager was killed: cat: %q", out)
	}
	mc = env.managerClient(t, ctx)
	if pid := mc.Manager().Pid; pid == oldManager {
		t.Errorf("no new fuse manager after SIGKILL of %d", oldManager)
	}
	mc.Close()

	// 6. Uninstall: stop the daemon, then `fuse-manager --stop`.
	if err := env.sn.Stop(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "fuse-manager", "--stop", "--root", root, "--config", filepath.Join(env.sn.Dir(), "config.toml")).CombinedOutput()
	if err != nil {
		t.Fatalf("fuse-manager --stop: %v: %s", err, out)
	}
	if m := env.fuseMounts(t); len(m) > 0 {
		t.Errorf("FUSE mounts after uninstall: %v", m)
	}
	pm, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(pm), root) {
		t.Errorf("/proc/mounts still names %s after uninstall", root)
	}
	if got := lab.ProcessesNaming(root); len(got) > 0 {
		t.Errorf("processes left after uninstall: %v", got)
	}
	// Starting again brings a new manager and the layers back.
	if err := env.sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := env.c.WaitSnapshotter(ctx, lazypullName); err != nil {
		t.Fatal(err)
	}
	if out := env.run(t, ctx, a, "cat", "/etc/motd"); out != "image A\n" {
		t.Fatalf("after reinstall: cat: %q", out)
	}
}

// hotColdImage is busybox plus a layer of 40 files of random bytes in
// hot/, 20 in cold/ and 2 MiB of random bytes in filler/ between them in
// the blob (more than the read-ahead of a miss in hot/ reaches), with
// /sums listing hot/ then cold/.
func hotColdImage(t *testing.T) *fixture.Image {
	t.Helper()
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewChaCha8([32]byte{'h', 'o', 't'}))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	top := fixture.NewLayer()
	var sums strings.Builder
	add := func(dir string, n int) {
		for i := range n {
			b := random(32 << 10)
			name := fmt.Sprintf("%s/f%03d", dir, i)
			top.FileBytes(name, b)
			fmt.Fprintf(&sums, "%x  /%s\n", sha256.Sum256(b), name)
		}
	}
	add("hot", 40)
	top.FileBytes("filler/pad", random(2<<20))
	add("cold", 20)
	top.File("sums", sums.String())
	img, err := fixture.BuildImage(fixture.DefaultConfig(), base, top)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// registryDownScript (for hotColdImage) reads the files of the first 40
// lines of /sums once (they are cached from then on), then checksums them in a loop in the
// background (/out/progress) until /out/stop appears; once /out/go
// appears it checksums the other files, never read before (uncached), one
// after the other (/out/uncached). A read error or a wrong byte prints
// BAD and exits 1.
const registryDownScript = `
head -n 40 /sums > /tmp/cached; sed -n '41,$p' /sums > /tmp/uncached
check() {
  while read sum name; do
    got=$(sha256sum "$name") || { echo "BAD read $name"; exit 1; }
    [ "${got%% *}" = "$sum" ] || { echo "BAD $name: $got"; exit 1; }
    echo "$name" >> "$1"
  done < "$2"
}
check /out/progress /tmp/cached
( while [ ! -f /out/stop ]; do check /out/progress /tmp/cached; busybox usleep 20000; done ) &
cached=$!
while [ ! -f /out/go ]; do busybox usleep 10000; done
check /out/uncached /tmp/uncached
wait $cached || exit 1
echo DONE
`

// TestRestartRegistryDown: with [fuse_manager] the registry is stopped and
// the daemon killed while a container reads. Reads of cached files go on
// throughout; reads of files never fetched, started while the daemon and
// the registry are both down, wait (the registry client retries within
// fetch.read_timeout) and succeed with correct bytes once the daemon is
// back and then the registry.
func TestRestartRegistryDown(t *testing.T) {
	t.Parallel()
	v := lab.Containerd2()
	cv := convertImage(t, hotColdImage(t), estargz.Gzip)
	reg := lab.NewRegistry(t)
	ref := push(t, reg, "restart/down:v1", cv.image)
	// Retries whose backoff (0.25 s doubling, capped at 10 s) spans more
	// than the outage, within read_timeout.
	const readTimeout = 30 * time.Second
	env := newLazyEnv(t, v, reg, lazyOptions{Retries: 8, ReadTimeout: readTimeout})
	ctx := env.c.Namespace(t)
	img := env.pull(t, ctx, ref)
	env.checkRemote(t, ctx, img, true)

	c := env.startLoop(t, ctx, img, "sh", "-c", registryDownScript)
	c.prog.waitLines(t, 40) // the cached set, read once
	uncached := func() int {
		b, _ := os.ReadFile(filepath.Join(c.dir, "uncached"))
		return bytes.Count(b, []byte("\n"))
	}
	exited := func() bool {
		select {
		case <-c.done:
			return true
		default:
			return false
		}
	}

	// The restart window: the registry and the daemon are both down.
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	if err := env.sn.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.dir, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	goAt := time.Now()
	c.prog.waitLines(t, 40) // cached reads go on
	time.Sleep(time.Until(goAt.Add(2 * time.Second)))
	if exited() {
		t.Fatalf("the container exited while the registry was down: %s %v", c.res, c.err)
	}
	if n := uncached(); n != 0 {
		t.Fatalf("%d uncached files read with the registry down: the test reads cached data only", n)
	}
	if err := env.sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := env.c.WaitSnapshotter(ctx, lazypullName); err != nil {
		t.Fatal(err)
	}
	c.prog.waitLines(t, 40) // and on, with the daemon back, the registry still down
	// The registry stays down a while longer: the pending read has
	// been retrying for several seconds by then.
	time.Sleep(time.Until(goAt.Add(5 * time.Second)))
	if n := uncached(); n != 0 || exited() {
		t.Fatalf("before the registry is back: %d uncached files read, container exited %v", n, exited())
	}
	if err := reg.Start(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	t.Logf("registry down for %v, daemon restarted meanwhile", back.Sub(down))

	// The pending read and the ones after it succeed.
	var first time.Time
	if !waitFor(readTimeout, func() bool {
		if first.IsZero() && uncached() > 0 {
			first = time.Now()
		}
		return uncached() >= 20 || exited()
	}) {
		t.Fatalf("uncached reads: %d of 20 files within %v of the registry's return", uncached(), readTimeout)
	}
	if exited() {
		t.Fatalf("the container exited before stopping: %s %v", c.res, c.err)
	}
	if first.IsZero() {
		first = time.Now()
	}
	if d := first.Sub(goAt); d > readTimeout {
		t.Errorf("the first uncached read took %v, more than read_timeout %v", d, readTimeout)
	}
	t.Logf("the first uncached read, started with the registry down, completed %v after it started (%v after the registry came back)",
		first.Sub(goAt).Round(time.Millisecond), first.Sub(back).Round(time.Millisecond))
	c.stop(t, "reads across the registry and daemon outage")
}
