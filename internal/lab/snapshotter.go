package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SnapshotterBinEnv names the environment variable that points the tests at
// a prebuilt lazypull-snapshotter instead of building ./cmd/snapshotter.
const SnapshotterBinEnv = "LAZYPULL_SNAPSHOTTER_BIN"

// BuildSnapshotter returns the lazypull-snapshotter binary to test: the
// one SnapshotterBinEnv names, or else a fresh build of ./cmd/snapshotter
// into dir (see Build).
func BuildSnapshotter(dir string) (string, error) {
	if p := os.Getenv(SnapshotterBinEnv); p != "" {
		if fi, err := os.Stat(p); err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			return "", fmt.Errorf("%s=%s: not an executable file", SnapshotterBinEnv, p)
		}
		return p, nil
	}
	return Build(dir, "./cmd/snapshotter", "lazypull-snapshotter")
}

// Build builds the command pkg (a package path relative to the module
// root, "./cmd/lazypull") into dir/name, with -race when the tests have
// it, and returns the binary's path. It is the one way tests build
// lazypull's binaries.
func Build(dir, pkg, name string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, name)
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, pkg)
	cmd := exec.Command(goTool(), args...)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s (in %s): %w\n%s", strings.Join(args, " "), root, err, b)
	}
	return out, nil
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

// ModuleRoot is the directory of the go.mod above the working directory
// (tests run in their package's directory).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// SnapshotterConfig configures a snapshotter daemon started by
// StartSnapshotter. The daemon is run as
//
//	BINARY --address ADDRESS --root ROOT --config CONFIG [--log-level LEVEL] ARGS...
type SnapshotterConfig struct {
	// Binary is the daemon to run (see BuildSnapshotter).
	Binary string
	// Dir holds the socket, root, config and log. Empty means a new
	// directory under /tmp, removed by Close.
	Dir string
	// Address is the gRPC socket; default Dir/sn.sock.
	Address string
	// Root is the daemon's state directory; default Dir/root.
	Root string
	// Config is written to Dir/config.toml and passed with --config;
	// ConfigPath passes an existing file instead. With neither, an empty
	// config file is passed, so the daemon never reads the machine's
	// default (/etc/lazypull/config.toml).
	Config     string
	ConfigPath string
	// LogLevel, if set, is passed with --log-level.
	LogLevel string
	// Args are appended to the command line; Env to the environment.
	Args []string
	Env  []string
	// StartTimeout bounds the wait for the socket; default 30s.
	StartTimeout time.Duration
}

// Snapshotter is a snapshotter daemon run by the harness.
type Snapshotter struct {
	cfg    SnapshotterConfig
	ownDir bool
	daemon
}

// StartSnapshotter starts the daemon and waits until its socket accepts
// connections. The caller must Close it.
func StartSnapshotter(ctx context.Context, cfg SnapshotterConfig) (_ *Snapshotter, retErr error) {
	if cfg.Binary == "" {
		return nil, errors.New("snapshotter: no binary")
	}
	s := &Snapshotter{cfg: cfg, daemon: daemon{name: "snapshotter"}}
	if s.cfg.Dir == "" {
		d, err := os.MkdirTemp("/tmp", "lp-sn-")
		if err != nil {
			return nil, err
		}
		s.cfg.Dir, s.ownDir = d, true
	}
	defer func() {
		if retErr != nil {
			s.Close()
		}
	}()
	if s.cfg.Address == "" {
		s.cfg.Address = filepath.Join(s.cfg.Dir, "sn.sock")
	}
	if len(s.cfg.Address) >= 108 {
		return nil, fmt.Errorf("snapshotter socket path %q is too long", s.cfg.Address)
	}
	if s.cfg.Root == "" {
		s.cfg.Root = filepath.Join(s.cfg.Dir, "root")
	}
	if s.cfg.StartTimeout == 0 {
		s.cfg.StartTimeout = 30 * time.Second
	}
	if err := os.MkdirAll(s.cfg.Root, 0o700); err != nil {
		return nil, err
	}
	if s.cfg.ConfigPath == "" {
		s.cfg.ConfigPath = filepath.Join(s.cfg.Dir, "config.toml")
		if err := os.WriteFile(s.cfg.ConfigPath, []byte(s.cfg.Config), 0o600); err != nil {
			return nil, err
		}
	}
	s.logPath = filepath.Join(s.cfg.Dir, "snapshotter.log")
	if err := s.Start(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// NewSnapshotter starts the daemon for the test. When the test ends it is
// stopped and its directory cleaned; its log is dumped if the test failed,
// and a data race the daemon reported fails the test.
func NewSnapshotter(t testing.TB, cfg SnapshotterConfig) *Snapshotter {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := StartSnapshotter(ctx, cfg)
	if err != nil {
		t.Fatalf("start snapshotter: %v", err)
	}
	t.Cleanup(func() {
		err := s.Stop()
		if b, rerr := os.ReadFile(s.logPath); rerr == nil && strings.Contains(string(b), "WARNING: DATA RACE") {
			t.Errorf("snapshotter reported a data race; see its log")
		}
		if b, rerr := os.ReadFile(s.ManagerLogPath()); rerr == nil && strings.Contains(string(b), "WARNING: DATA RACE") {
			t.Errorf("the fuse manager reported a data race; see its log")
		}
		if t.Failed() {
			dumpLog(t, "snapshotter", s.logPath, 0)
			if _, err := os.Stat(s.ManagerLogPath()); err == nil {
				dumpLog(t, "fuse manager", s.ManagerLogPath(), 0)
			}
		}
		if err != nil {
			t.Errorf("stop snapshotter: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("close snapshotter: %v", err)
		}
	})
	return s
}

// Address is the daemon's gRPC socket, for ContainerdConfig.ProxySnapshotters.
func (s *Snapshotter) Address() string { return s.cfg.Address }

// Root is the daemon's --root.
func (s *Snapshotter) Root() string { return s.cfg.Root }

// Dir holds everything the daemon writes.
func (s *Snapshotter) Dir() string { return s.cfg.Dir }

// LogPath collects the daemon's output across restarts.
func (s *Snapshotter) LogPath() string { return s.logPath }

// Start starts the daemon (again, after Stop or Kill) and waits for its
// socket. A stale socket file from a killed daemon is removed first.
func (s *Snapshotter) Start(ctx context.Context) error {
	return s.launch(ctx, func() *exec.Cmd {
		os.Remove(s.cfg.Address)
		args := []string{"--address", s.cfg.Address, "--root", s.cfg.Root, "--config", s.cfg.ConfigPath}
		if s.cfg.LogLevel != "" {
			args = append(args, "--log-level", s.cfg.LogLevel)
		}
		args = append(args, s.cfg.Args...)
		cmd := exec.Command(s.cfg.Binary, args...)
		cmd.Env = append(envWithPath(""), s.cfg.Env...)
		cmd.Dir = s.cfg.Dir
		return cmd
	}, s.cfg.StartTimeout, "listen on "+s.cfg.Address, func() bool {
		conn, err := net.DialTimeout("unix", s.cfg.Address, time.Second)
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
}

// Stop stops the daemon with SIGTERM and waits for it (SIGKILL after 20s,
// reported as an error). It reports a daemon that had crashed.
func (s *Snapshotter) Stop() error { return s.halt(syscall.SIGTERM, 20*time.Second) }

// Kill stops the daemon with SIGKILL, leaving whatever it mounted behind,
// as a crash would.
func (s *Snapshotter) Kill() error { return s.halt(syscall.SIGKILL, 10*time.Second) }

// Restart is Stop then Start.
func (s *Snapshotter) Restart(ctx context.Context) error {
	if err := s.Stop(); err != nil {
		return err
	}
	return s.Start(ctx)
}

// ManagerLogPath is the log of the fuse manager the daemon starts with
// [fuse_manager] enable = true.
func (s *Snapshotter) ManagerLogPath() string { return filepath.Join(s.cfg.Root, "fuse-manager.log") }

// Logs returns what the daemon and its fuse manager (the default mode,
// where layers are served, recorded and verified) have logged so far.
func (s *Snapshotter) Logs() string {
	d, _ := os.ReadFile(s.logPath)
	m, _ := os.ReadFile(s.ManagerLogPath())
	return string(d) + string(m)
}

// StopManager stops the fuse manager the daemon started, if one runs on
// the root (`fuse-manager --stop`: every layer unmounted, the manager
// gone); a manager that does not go is killed. The daemon must be
// stopped first, or it starts a new manager on its next call.
func (s *Snapshotter) StopManager() error {
	if _, err := os.Stat(filepath.Join(s.cfg.Root, "fuse-manager.sock")); err != nil {
		return nil
	}
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, s.cfg.Binary, "fuse-manager", "--stop", "--root", s.cfg.Root, "--config", s.cfg.ConfigPath).CombinedOutput()
	if err != nil {
		errs = append(errs, fmt.Errorf("fuse-manager --stop: %w: %s", err, out))
	}
	for _, pid := range ProcessesNaming(s.cfg.Root) {
		errs = append(errs, fmt.Errorf("process %d on %s still runs after fuse-manager --stop; killed", pid, s.cfg.Root))
		syscall.Kill(pid, syscall.SIGKILL)
	}
	return errors.Join(errs...)
}

// ManagerPid is the pid of the fuse manager serving the daemon's root
// (the default, [fuse_manager] enable = true), or 0 if none runs. Its CPU
// and memory are the layers': they are fetched, decompressed and served
// there, not in the daemon.
func (s *Snapshotter) ManagerPid() int {
	for _, pid := range ProcessesNaming(s.cfg.Root) {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if err != nil {
			continue
		}
		if args := strings.Split(string(b), "\x00"); len(args) > 1 && args[1] == "fuse-manager" && !slices.Contains(args, "--stop") {
			return pid
		}
	}
	return 0
}

// ProcessesNaming lists the processes one of whose arguments is arg (the
// daemon and its fuse manager both get --root ROOT).
func ProcessesNaming(arg string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if slices.Contains(strings.Split(string(b), "\x00"), arg) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Close kills the daemon if it still runs, stops its fuse manager if it
// started one (StopManager), unmounts what is left under its directory
// (FUSE mounts of a killed daemon included) and removes the directory if
// StartSnapshotter created it.
func (s *Snapshotter) Close() error {
	var errs []error
	if s.Running() {
		s.halt(syscall.SIGKILL, 10*time.Second)
	}
	if s.cfg.Root != "" {
		if err := s.StopManager(); err != nil {
			errs = append(errs, err)
		}
	}
	if s.cfg.Dir != "" {
		if err := unmountUnder(s.cfg.Dir); err != nil {
			errs = append(errs, err)
		}
		if s.cfg.Root != "" && !strings.HasPrefix(s.cfg.Root, s.cfg.Dir+"/") {
			if err := unmountUnder(s.cfg.Root); err != nil {
				errs = append(errs, err)
			}
		}
		if s.ownDir && os.Getenv("LAZYPULL_KEEP_TEST_DIRS") == "" {
			if err := os.RemoveAll(s.cfg.Dir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// RaceBuild reports whether Build builds binaries with the race detector
// (the tests run with -race): their resident memory then includes the
// detector's shadow memory, several times the program's own.
func RaceBuild() bool { return raceEnabled }
