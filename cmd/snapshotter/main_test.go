package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazypull/lazypull/internal/lab"
)

// daemonBin is the lazypull-snapshotter binary under test, built by TestMain
// (or the one lab.SnapshotterBinEnv names).
var daemonBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lazypull-snapshotter-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	daemonBin, err = lab.BuildSnapshotter(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "building lazypull-snapshotter:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (overlay and bind mounts)")
	}
}

// lineWriter hands each complete line written to it to fn.
type lineWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
	fn  func(string)
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for {
		line, err := w.buf.ReadString('\n')
		if err != nil {
			w.buf.WriteString(line) // incomplete: keep for later
			return len(p), nil
		}
		w.fn(strings.TrimSuffix(line, "\n"))
	}
}

// daemon is a running lazypull-snapshotter process.
type daemon struct {
	cmd  *exec.Cmd
	sock string
	// args are the daemon's flags but --address: `fuse-manager --stop`
	// takes the same --root and --config.
	args    []string
	exited  chan struct{}
	waitErr error

	mu     sync.Mutex
	output strings.Builder
}

// startDaemon starts the daemon with args and waits until it accepts
// connections on sock and has logged that it serves (it listens before it
// has connected to its fuse manager and opened its root). Its log lines go
// to logf.
func startDaemon(sock string, logf func(string), args ...string) (*daemon, error) {
	d := &daemon{sock: sock, args: args, exited: make(chan struct{})}
	serving := make(chan struct{})
	var servingOnce sync.Once
	d.cmd = exec.Command(daemonBin, append([]string{"--address", sock}, args...)...)
	// A race-enabled daemon exits with status 66 if it saw a race, which
	// stop reports; it need not also sleep a second on its way out.
	d.cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0 "+os.Getenv("GORACE"))
	d.cmd.Stderr = &lineWriter{fn: func(line string) {
		d.mu.Lock()
		d.output.WriteString(line + "\n")
		d.mu.Unlock()
		if strings.Contains(line, `msg="lazypull-snapshotter serving"`) {
			servingOnce.Do(func() { close(serving) })
		}
		logf(line)
	}}
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		close(d.exited)
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-d.exited:
			return nil, fmt.Errorf("daemon exited before serving: %v\n%s", d.waitErr, d.logs())
		default:
		}
		select {
		case <-serving:
			if c, err := net.Dial("unix", sock); err == nil {
				c.Close()
				return d, nil
			}
		default:
		}
		if time.Now().After(deadline) {
			d.cmd.Process.Kill()
			<-d.exited
			return nil, fmt.Errorf("daemon not serving on %s after 20s\n%s", sock, d.logs())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (d *daemon) logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.output.String()
}

// stop sends sig and expects the daemon to exit 0, then stops the fuse
// manager the daemon started (the default config serves the layers from
// it, and it outlives the daemon by design): `fuse-manager --stop` must
// report it stopped, or that none runs.
func (d *daemon) stop(sig os.Signal) error {
	if err := d.cmd.Process.Signal(sig); err != nil {
		return err
	}
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
		return errors.Join(fmt.Errorf("daemon did not exit 30s after %v", sig), d.stopManager())
	}
	var err error
	if d.waitErr != nil {
		err = fmt.Errorf("daemon exited with %v after %v", d.waitErr, sig)
	}
	return errors.Join(err, d.stopManager())
}

// stopManager runs `fuse-manager --stop` with the daemon's --root and
// --config.
func (d *daemon) stopManager() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, daemonBin, append([]string{"fuse-manager", "--stop"}, d.args...)...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "stopped") && !strings.Contains(string(out), "no fuse manager running") {
		return fmt.Errorf("fuse-manager --stop: %v: %s", err, out)
	}
	return nil
}

// connect returns a containerd snapshotter talking to the daemon.
func connect(sock string) (snapshots.Snapshotter, *grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazypull"), conn, nil
}

// suiteName: the suite picks overlayfs's expectations by name (see
// snapshot.SuiteName in the snapshot package's tests for why).
const suiteName = "overlayfs"

// TestDaemonSuite runs containerd's snapshotter test suite against the
// daemon, a separate process reached over its unix socket exactly like
// containerd's proxy plugin reaches it; one fresh daemon per test.
func TestDaemonSuite(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, suiteName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sock := filepath.Join(root, "s.sock")
		d, err := startDaemon(sock, func(line string) { log.G(ctx).Info("daemon: " + line) },
			"--root", root, "--config", writeConfig(root, ""), "--log-level", "debug")
		if err != nil {
			return nil, nil, err
		}
		sn, conn, err := connect(sock)
		if err != nil {
			d.stop(syscall.SIGKILL)
			return nil, nil, err
		}
		return sn, func() error {
			return errors.Join(conn.Close(), d.stop(syscall.SIGTERM))
		}, nil
	})
}

func writeConfig(dir, content string) string {
	p := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		panic(err)
	}
	return p
}

func TestDaemonStartsQuickly(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	sock := filepath.Join(root, "s.sock")
	start := time.Now()
	d, err := startDaemon(sock, func(l string) { t.Log(l) }, "--root", root, "--config", writeConfig(t.TempDir(), ""))
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	t.Logf("serving after %v", elapsed)
	if elapsed > time.Second {
		t.Errorf("daemon took %v to serve on an empty root, want well under a second", elapsed)
	}
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after exit: %v", err)
	}
}

// TestDaemonStopWhileStarting: a SIGTERM that arrives while the daemon
// already listens but still waits for its fuse manager to start is a
// clean stop (exit 0), not a failure.
func TestDaemonStopWhileStarting(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	sock := filepath.Join(root, "s.sock")
	args := []string{"--root", root, "--config", writeConfig(t.TempDir(), "")}
	cmd := exec.Command(daemonBin, append([]string{"--address", sock}, args...)...)
	var out bytes.Buffer
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{args: args}
	defer func() {
		if err := d.stopManager(); err != nil {
			t.Error(err)
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("daemon not listening after 20s:\n%s", out.String())
		}
		time.Sleep(time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("daemon stopped while starting: %v, want exit 0:\n%s", err, out.String())
	}
	// A manager that had not answered yet went with it; one that had
	// stays (it is stopped by the deferred fuse-manager --stop).
	if pids := lab.ProcessesNaming(root); len(pids) > 0 && !strings.Contains(out.String(), "lazypull-snapshotter serving") {
		t.Errorf("processes on the root after the daemon stopped before serving: %v\n%s", pids, out.String())
	}
}

// TestDaemonLifecycle: parent directories are created, a stale socket is
// replaced, snapshots survive a restart, SIGINT exits 0, and a second
// daemon refuses a socket or a root in use.
func TestDaemonLifecycle(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	tmp := t.TempDir()
	root := filepath.Join(tmp, "state", "lazypull")
	sock := filepath.Join(tmp, "run", "nested", "s.sock")
	cfg := writeConfig(tmp, "")

	// A socket file nobody listens on, as a killed daemon leaves it.
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false)
	ul.Close()

	logf := func(l string) { t.Log(l) }
	d, err := startDaemon(sock, logf, "--root", root, "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	sn, conn, err := connect(sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	// The unpacker's Prepare for a target that exists: ErrAlreadyExists
	// must survive gRPC.
	_, err = sn.Prepare(ctx, "extract-1 c", "", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: "c"}))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of an existing target: want ErrAlreadyExists, got %v", err)
	}

	// Socket in use.
	other := filepath.Join(tmp, "other")
	expectFailure(t, "in use", "--address", sock, "--root", other, "--config", cfg)
	// Root in use: the second daemon finds the first one's fuse manager
	// (the layers' owner) and then the metadata database locked.
	expectFailure(t, "is another snapshotter using root", "--address", filepath.Join(tmp, "s2.sock"), "--root", root, "--config", cfg)
	// A daemon that would serve the layers itself ([fuse_manager] enable
	// = false) finds the chunk cache the manager opened locked.
	inDaemon := writeConfig(t.TempDir(), "[fuse_manager]\nenable = false\n")
	expectFailure(t, "in use by another store", "--address", filepath.Join(tmp, "s3.sock"), "--root", root, "--config", inDaemon)
	if _, err := sn.Stat(ctx, "c"); err != nil {
		t.Fatalf("first daemon hurt by the second: %v", err)
	}

	conn.Close()
	if err := d.stop(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}

	d, err = startDaemon(sock, logf, "--root", root, "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.stop(syscall.SIGTERM)
	sn, conn, err = connect(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if info, err := sn.Stat(ctx, "c"); err != nil || info.Kind != snapshots.KindCommitted {
		t.Fatalf("after restart: %+v, %v", info, err)
	}
	if _, err := sn.Stat(ctx, "nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("errors must keep their kind over gRPC: %v", err)
	}
}

// TestDaemonConfigRoot: without --root the config file's root is used.
func TestDaemonConfigRoot(t *testing.T) {
	requireRoot(t)
	tmp := t.TempDir()
	root := filepath.Join(tmp, "from-config")
	cfg := writeConfig(tmp, fmt.Sprintf("root = %q\n[fetch]\ntimeout = \"1m\"\n", root))
	d, err := startDaemon(filepath.Join(tmp, "s.sock"), func(l string) { t.Log(l) }, "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "metadata.db")); err != nil {
		t.Fatalf("config root not used: %v", err)
	}
}

func TestFlags(t *testing.T) {
	tmp := t.TempDir()
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		output string
	}{
		{"unknown flag", []string{"--bogus"}, 2, "flag provided but not defined: -bogus"},
		{"bad log level", []string{"--log-level", "loud"}, 2, `invalid --log-level "loud"`},
		{"extra argument", []string{"serve"}, 2, `unexpected argument "serve"`},
		{"flag without value", []string{"--root"}, 2, "flag needs an argument"},
		{"version", []string{"--version"}, 0, "lazypull-snapshotter "},
		{"help", []string{"--help"}, 0, "Usage: lazypull-snapshotter"},
		{"missing explicit config", []string{"--config", filepath.Join(tmp, "nope.toml")}, 1, "nope.toml: open"},
		{"unknown config key", []string{"--config", writeConfig(tmp, "[fetch]\nprefetch = false\nretry = 3\n")}, 1, "unknown key(s): fetch.retry"},
		{"fuse manager: unknown flag", []string{"fuse-manager", "--bogus"}, 2, "flag provided but not defined: -bogus"},
		{"fuse manager: help", []string{"fuse-manager", "--help"}, 0, "--stop unmounts every layer"},
		{"fuse manager: stop without one", []string{"fuse-manager", "--stop", "--root", tmp, "--config", writeConfig(t.TempDir(), "")}, 0, "no fuse manager running at " + filepath.Join(tmp, "fuse-manager.sock")},
		{"fuse manager: bad log level", []string{"fuse-manager", "--log-level", "loud"}, 2, `invalid --log-level "loud"`},
		{"fuse manager: extra argument", []string{"fuse-manager", "now"}, 2, `unexpected argument "now"`},
		{"fuse manager: unknown config key", []string{"fuse-manager", "--config", writeConfig(t.TempDir(), "[fuse_manager]\nenabled = true\n")}, 1, "unknown key(s): fuse_manager.enabled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			code := run(tc.args, &out, &out)
			if code != tc.code || !strings.Contains(out.String(), tc.output) {
				t.Fatalf("run(%q) = %d, output:\n%s\nwant %d and output containing %q", tc.args, code, out.String(), tc.code, tc.output)
			}
		})
	}
}

// expectFailure runs the daemon and expects it to exit 1 with a message
// containing want.
func expectFailure(t *testing.T, want string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, daemonBin, args...).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), want) {
		t.Fatalf("daemon %q: want exit status 1 and %q, got %v:\n%s", args, want, err, out)
	}
}

func TestDaemonBadFlagsExit2(t *testing.T) {
	cmd := exec.Command(daemonBin, "--no-such-flag")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "no-such-flag") {
		t.Fatalf("want exit status 2 naming the flag, got %v:\n%s", err, out)
	}
}
