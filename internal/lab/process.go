package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// process is a daemon started by the harness, its output appended to a log
// file.
type process struct {
	cmd       *exec.Cmd
	done      chan struct{}
	waitErr   error // valid once done is closed
	signalled bool  // the harness asked it to stop
}

func startProcess(cmd *exec.Cmd, logPath string) (*process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(f, "==== lab %s: exec %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(cmd.Args, " "))
	cmd.Stdout, cmd.Stderr = f, f
	// If the test binary dies, so does the daemon.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		fmt.Fprintf(f, "==== lab %s: pid %d exited: %v\n", time.Now().Format(time.RFC3339Nano), cmd.Process.Pid, p.waitErr)
		f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// err is the process's exit error; call only once it exited.
func (p *process) err() error { <-p.done; return p.waitErr }

func (p *process) signal(sig syscall.Signal) {
	if !p.exited() {
		p.signalled = true
		p.cmd.Process.Signal(sig)
	}
}

func (p *process) wait(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// stop signals the process and waits for it, escalating to SIGKILL after
// timeout. It reports an exit the harness did not ask for (a crash), and a
// process that ignored sig.
func (p *process) stop(sig syscall.Signal, timeout time.Duration) error {
	if p.exited() {
		if !p.signalled && p.waitErr != nil {
			return fmt.Errorf("%s had exited on its own: %w", filepath.Base(p.cmd.Path), p.waitErr)
		}
		return nil
	}
	p.signal(sig)
	if p.wait(timeout) {
		return nil
	}
	p.signal(syscall.SIGKILL)
	p.wait(timeout)
	return fmt.Errorf("%s (pid %d) did not exit within %v of %v", filepath.Base(p.cmd.Path), p.pid(), timeout, sig)
}

// daemon is the restartable process behind a Containerd or a Snapshotter.
// Its output goes to logPath, across restarts.
type daemon struct {
	name    string // in messages
	logPath string

	mu   sync.Mutex
	proc *process
}

// Pid is the daemon's process id, 0 if it never started.
func (d *daemon) Pid() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil {
		return 0
	}
	return d.proc.pid()
}

// Running reports whether the daemon process is alive.
func (d *daemon) Running() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.proc != nil && !d.proc.exited()
}

// launch starts the command newCmd makes, unless the daemon runs, and
// polls ready every 20ms until it holds. A daemon that exits meanwhile, or
// is not ready within timeout or before ctx ends, is reported with the tail
// of its log (and killed); waitingFor says what it was expected to do.
func (d *daemon) launch(ctx context.Context, newCmd func() *exec.Cmd, timeout time.Duration, waitingFor string, ready func() bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc != nil && !d.proc.exited() {
		return fmt.Errorf("%s is already running (pid %d)", d.name, d.proc.pid())
	}
	p, err := startProcess(newCmd(), d.logPath)
	if err != nil {
		return fmt.Errorf("start %s: %w", d.name, err)
	}
	d.proc = p
	deadline := time.Now().Add(timeout)
	for {
		if p.exited() {
			return fmt.Errorf("%s exited during start-up: %v; log %s:\n%s", d.name, p.err(), d.logPath, tailFile(d.logPath, 40))
		}
		if ready() {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			p.signal(syscall.SIGKILL)
			p.wait(5 * time.Second)
			return fmt.Errorf("%s did not %s in time; log %s:\n%s", d.name, waitingFor, d.logPath, tailFile(d.logPath, 40))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// halt stops the daemon (see process.stop); one never started is no error.
func (d *daemon) halt(sig syscall.Signal, timeout time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil {
		return nil
	}
	return d.proc.stop(sig, timeout)
}

// envWithPath is the test's environment with dir first in PATH and the
// usual system directories present.
func envWithPath(dir string) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	} else {
		for _, d := range []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
			if !strings.Contains(":"+path+":", ":"+d+":") {
				path += ":" + d
			}
		}
	}
	if dir != "" {
		path = dir + ":" + path
	}
	env := []string{"PATH=" + path}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	return env
}

// unmountUnder lazily unmounts every mount at or below dir, deepest
// first, FUSE mounts of dead daemons included.
func unmountUnder(dir string) error {
	if err := mount.UnmountRecursive(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount under %s: %w", dir, err)
	}
	return nil
}

// removeCgroups removes the cgroup directory parent (relative to the
// cgroup roots) and its sub-cgroups, deepest first, from every mounted
// cgroup hierarchy, v1 and v2. Busy cgroups stay.
func removeCgroups(parent string) {
	parent = strings.Trim(parent, "/")
	if parent == "" {
		return
	}
	ms, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("cgroup", "cgroup2"))
	if err != nil {
		return
	}
	for _, m := range ms {
		var dirs []string
		filepath.WalkDir(filepath.Join(m.Mountpoint, parent), func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			unix.Rmdir(dirs[i])
		}
	}
}

// MountedUnder lists the mount points at or below dir, for tests that check
// nothing was left mounted.
func MountedUnder(dir string) ([]string, error) {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil, fmt.Errorf("mounts under %s: %w", dir, err)
	}
	under := make([]string, len(ms))
	for i, m := range ms {
		under[i] = m.Mountpoint
	}
	return under, nil
}

// killShims kills the runc shims serving the containerd at address and the
// containers they ran, which outlive the daemon. It is the last resort of
// Close, after the daemon was asked to delete every task.
func killShims(address string) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if !strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for i, a := range args {
			if (a == "-address" || a == "--address") && i+1 < len(args) && args[i+1] == address {
				syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}

// killRuncContainers kills the init processes of the containers whose runc
// state is under root (runc --root, one subdirectory per namespace).
func killRuncContainers(root string) {
	states, _ := filepath.Glob(filepath.Join(root, "*", "*", "state.json"))
	for _, st := range states {
		raw, err := os.ReadFile(st)
		if err != nil {
			continue
		}
		var s struct {
			InitProcessPid int `json:"init_process_pid"`
		}
		if json.Unmarshal(raw, &s) == nil && s.InitProcessPid > 0 {
			syscall.Kill(s.InitProcessPid, syscall.SIGKILL)
		}
	}
}

// tailFile returns the last n lines of a file.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

const maxLogDump = 256 << 10

// dumpLog logs a daemon's log file from offset off, at most its last
// maxLogDump bytes.
func dumpLog(t testing.TB, name, path string, off int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Logf("%s log: %v", name, err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return
	}
	if fi.Size()-off > maxLogDump {
		off = fi.Size() - maxLogDump
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return
	}
	b, _ := io.ReadAll(f)
	t.Logf("==== %s log %s (from byte %d) ====\n%s\n==== end of %s log ====", name, path, off, b, name)
}
