package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/service"
)

// execInRootfsCommand is the hidden command optimize runs itself as to
// start the workload: in a new mount and PID namespace it mounts /proc,
// /dev and /sys into the root file system, changes root into it and
// executes the workload.
const execInRootfsCommand = "__exec-in-rootfs"

// defaultPath is the PATH of a workload whose image sets none (the one
// containerd and Docker use).
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func newOptimizeCommand() *cobra.Command {
	var (
		rf         registryFlags
		bf         buildFlags
		timeout    time.Duration
		ready      string
		recordFile string
		cacheDir   string
	)
	cmd := &cobra.Command{
		Use:   "optimize [flags] SRC DST [--] CMD [ARGS...]",
		Short: "Record what a command reads from an image at start-up and convert the image with those files first",
		Long: `Mount the eStargz image SRC lazily, run CMD in it (a private mount and PID
namespace, changed root into the image's file system with a writable layer
on top, /proc, /dev and /sys mounted, the image's environment, working
directory and user), record the files CMD reads, in order, then convert SRC
to DST with those files prioritized: they go first in each layer, before
.prefetch.landmark, where lazypull and other eStargz snapshotters prefetch
them at start-up. This is "lazypull convert --prioritize" with the list
made by a run; SRC layers already in eStargz form are rebuilt.

The recording stops when CMD exits (it must exit with status 0), when a line
of its output matches --ready (for servers that do not exit: their start-up
is done once they print it), or fails after --timeout. CMD's output is
copied to standard error.

Flags come before SRC. SRC and DST are references or oci-layout:DIR[:TAG].
The recording runs on an eStargz image in a registry: any other SRC is first
converted to DST (which must then be a registry reference), recorded there,
and converted again from SRC with the record (a failed recording leaves
that first conversion in DST).`,
		Example: `  lazypull optimize 127.0.0.1:5000/app:esgz 127.0.0.1:5000/app:opt -- python3 -c 'import pandas'
  lazypull optimize --ready 'listening on' --timeout 2m registry.example.com/web:esgz registry.example.com/web:opt -- /usr/sbin/nginx -g 'daemon off;'`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(workload(args)) == 0 {
				return usageError{fmt.Errorf("optimize needs SRC, DST and CMD, got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			o := optimizer{cmd: cmd, src: args[0], dst: args[1], argv: workload(args), timeout: timeout, recordFile: recordFile, cacheDir: cacheDir}
			if timeout <= 0 {
				return usageError{fmt.Errorf("--timeout %s: must be positive", timeout)}
			}
			if ready != "" {
				re, err := regexp.Compile(ready)
				if err != nil {
					return usageError{fmt.Errorf("--ready %q: %w", ready, err)}
				}
				o.ready = re
			}
			var err error
			if o.opts, err = bf.options(); err != nil {
				return err
			}
			if o.reg, err = rf.registry(); err != nil {
				return err
			}
			return o.run(cmd.Context())
		},
	}
	cmd.Flags().SetInterspersed(false) // CMD's own flags are not ours
	rf.add(cmd)
	bf.add(cmd)
	f := cmd.Flags()
	f.DurationVar(&timeout, "timeout", 5*time.Minute, "fail if CMD has not exited (or printed a line matching --ready) by then")
	f.StringVar(&ready, "ready", "", "stop recording when a line of CMD's output matches this regular expression (CMD is then killed)")
	f.StringVar(&recordFile, "record", "", "also write the recorded file list to this file (the format of convert --prioritize)")
	f.StringVar(&cacheDir, "cache-dir", "", "directory for the recording run's chunks and layer metadata (default: a temporary directory, removed at the end; the recording needs a cold cache)")
	return cmd
}

// workload returns CMD [ARGS...] of optimize's arguments: flags end at
// SRC, so a "--" after DST is an argument, and dropped.
func workload(args []string) []string {
	if len(args) < 3 {
		return nil
	}
	if args[2] == "--" {
		return args[3:]
	}
	return args[2:]
}

// optimizer is one run of lazypull optimize.
type optimizer struct {
	cmd        *cobra.Command
	reg        *remote.Registry
	src, dst   string
	argv       []string
	timeout    time.Duration
	ready      *regexp.Regexp
	recordFile string
	cacheDir   string
	opts       convert.Options
}

func (o *optimizer) progress(format string, args ...any) {
	fmt.Fprintf(o.cmd.ErrOrStderr(), "lazypull: "+format+"\n", args...)
}

func (o *optimizer) run(ctx context.Context) error {
	// The recording needs an eStargz image in a registry. Any other SRC
	// is converted to DST first, recorded there, and converted again
	// from SRC with the record.
	recordRef := o.src
	lazy, err := o.isLazy(ctx)
	if err != nil {
		return err
	}
	if !lazy {
		if strings.HasPrefix(o.dst, convert.LayoutPrefix) {
			return usageError{fmt.Errorf("%s is not an eStargz image in a registry, and the recording run needs one: convert it to a registry first (lazypull convert %s REF), then optimize REF", o.src, o.src)}
		}
		o.progress("%s is not eStargz: converting it to %s for the recording run", o.src, o.dst)
		if _, err := convertImage(o.cmd, o.reg, o.src, o.dst, o.opts); err != nil {
			return err
		}
		recordRef = o.dst
	}
	files, err := o.record(ctx, recordRef)
	if err != nil {
		return err
	}
	if o.recordFile != "" {
		if err := os.WriteFile(o.recordFile, []byte(strings.Join(files, "\n")+"\n"), 0o644); err != nil {
			return fmt.Errorf("--record: %w", err)
		}
	}
	if len(files) == 0 {
		o.progress("warning: %s read no file from the image; converting without a prioritized region", o.argv[0])
	}
	o.progress("converting %s to %s with %d prioritized files", o.src, o.dst, len(files))
	o.opts.Build.Prioritized = files
	res, err := convertImage(o.cmd, o.reg, o.src, o.dst, o.opts)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.cmd.OutOrStdout(), "%s %s (%d layers, %d blobs uploaded, %d files prioritized)\n", o.dst, res.Desc.Digest, len(res.Layers), res.Uploaded, len(files))
	return nil
}

// isLazy reports whether SRC is in a registry with every layer (of the
// host's platform) in eStargz form.
func (o *optimizer) isLazy(ctx context.Context) (bool, error) {
	if strings.HasPrefix(o.src, convert.LayoutPrefix) {
		return false, nil
	}
	img, err := o.reg.Resolve(ctx, o.src, nil)
	if err != nil {
		return false, fmt.Errorf("resolving %s: %w", o.src, err)
	}
	for _, l := range img.Manifest.Layers {
		if l.Annotations[estargz.TOCDigestAnnotation] == "" {
			return false, nil
		}
	}
	return true, nil
}

// record mounts ref, runs the workload in it and returns the files it
// read, in order.
func (o *optimizer) record(ctx context.Context, ref string) ([]string, error) {
	img, err := o.reg.Resolve(ctx, ref, nil)
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", ref, err)
	}
	tmp, err := os.MkdirTemp("", "lazypull-optimize-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	cacheDir := o.cacheDir
	if cacheDir == "" {
		cacheDir = filepath.Join(tmp, "cache")
	}
	recordDir := filepath.Join(tmp, "record")
	cfg := service.DefaultConfig()
	cfg.RecordDir = recordDir
	// Every read must reach the daemon to be recorded: no passthrough,
	// and nothing fetched ahead of the workload.
	cfg.Fetch.Passthrough = false
	cfg.Fetch.Prefetch = false
	cfg.Fetch.BackgroundFetch = false
	cfg.Verify.Policy = service.VerifyOff
	svc, err := service.New(ctx, service.Options{
		Config:   cfg,
		Root:     filepath.Join(cacheDir, "meta"),
		CacheDir: filepath.Join(cacheDir, "chunks"),
		Registry: o.reg,
	})
	if err != nil {
		return nil, err
	}
	svcOpen := true
	defer func() {
		if svcOpen {
			svc.Close()
		}
	}()

	o.progress("mounting %s (%d layers)", img.Ref, len(img.Manifest.Layers))
	lowers, cleanup, err := mountLayers(ctx, o.reg, svc.Manager, img, false)
	defer func() { cleanup() }()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	root := filepath.Join(tmp, "root")
	if err := mountWritable(lowers, filepath.Join(tmp, "rw"), root); err != nil {
		return nil, err
	}
	runErr := o.runWorkload(ctx, root, img)
	if err := unix.Unmount(root, unix.MNT_DETACH); err != nil {
		log.G(ctx).WithError(err).Warn("unmounting the workload's root")
	}
	if runErr != nil {
		return nil, runErr
	}
	cleanup()
	cleanup = func() {}
	svcOpen = false
	if err := svc.Close(); err != nil {
		return nil, fmt.Errorf("closing the recording mount: %w", err)
	}
	lines, err := readLines(filepath.Join(recordDir, lfs.RecordFileName(img.Ref)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading the record: %w", err)
	}
	chunks, _ := readLines(filepath.Join(recordDir, lfs.RecordFileName(img.Ref)+".chunks"))
	files := dedupe(lines)
	o.progress("recorded %d files read (%d chunks)", len(files), len(chunks))
	return files, nil
}

// dedupe keeps the first of equal lines.
func dedupe(lines []string) []string {
	seen := make(map[string]bool, len(lines))
	out := lines[:0]
	for _, l := range lines {
		if !seen[l] {
			seen[l] = true
			out = append(out, l)
		}
	}
	return out
}

// mountWritable stacks lowers (bottom first) at dir under a writable
// upper layer kept in rw, so that the workload can write (and /proc, /dev
// and /sys can be mounted even if the image lacks the directories).
func mountWritable(lowers []string, rw, dir string) error {
	upper, work := filepath.Join(rw, "upper"), filepath.Join(rw, "work")
	for _, d := range []string{upper, work, dir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	top := make([]string, len(lowers))
	for i, l := range lowers {
		top[len(lowers)-1-i] = l
	}
	m := mount.Mount{Type: "overlay", Source: "overlay", Options: []string{"nodev", "lowerdir=" + strings.Join(top, ":"), "upperdir=" + upper, "workdir=" + work}}
	if err := m.Mount(dir); err != nil {
		return fmt.Errorf("mounting the workload's root at %s: %w", dir, err)
	}
	return nil
}

// execSpec is what the hidden exec command needs to start the workload.
type execSpec struct {
	Root string   `json:"root"`
	Args []string `json:"args"`
	Env  []string `json:"env"`
	Dir  string   `json:"dir"`
	User string   `json:"user"`
}

// runWorkload runs the workload in root until it exits, prints a line
// matching o.ready, or o.timeout passes.
func (o *optimizer) runWorkload(ctx context.Context, root string, img *remote.Image) error {
	c := img.Config.Config
	spec := execSpec{Root: root, Args: o.argv, Env: c.Env, Dir: c.WorkingDir, User: c.User}
	hasPath := false
	for _, e := range spec.Env {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		spec.Env = append(spec.Env, "PATH="+defaultPath)
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer errR.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		errW.Close()
		return err
	}
	defer outR.Close()
	child := exec.Command("/proc/self/exe", execInRootfsCommand, string(raw))
	child.Stdout, child.Stderr = outW, outW
	child.ExtraFiles = []*os.File{errW} // fd 3: why the workload could not start
	child.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWPID,
		// The workload is PID 1 of its namespace: killing it kills
		// whatever it started. It must not outlive lazypull.
		Pdeathsig: syscall.SIGKILL,
	}
	o.progress("running %s in %s (timeout %s)", strings.Join(o.argv, " "), img.Ref, o.timeout)
	start := time.Now()
	err = child.Start()
	errW.Close()
	outW.Close()
	if err != nil {
		return fmt.Errorf("starting the workload: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- child.Wait() }()
	setupErr := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(errR, 64<<10))
		setupErr <- strings.TrimSpace(string(b))
	}()
	matched := make(chan string, 1)
	outDone := make(chan struct{})
	go func() {
		defer close(outDone)
		w := o.cmd.ErrOrStderr()
		sc := bufio.NewScanner(outR)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(w, line)
			if o.ready != nil && o.ready.MatchString(line) {
				select {
				case matched <- line:
				default:
				}
			}
		}
		// A workload that writes a line too long to scan is still
		// drained, so that it never blocks on its output.
		_, _ = io.Copy(io.Discard, outR)
	}()
	timer := time.NewTimer(o.timeout)
	defer timer.Stop()
	kill := func() error {
		_ = child.Process.Kill()
		return <-exited
	}
	select {
	case err := <-exited:
		if msg := <-setupErr; msg != "" {
			return fmt.Errorf("%s: %s", img.Ref, msg)
		}
		<-outDone
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("%s exited with %s after %s: the recording of a failed start-up is not used (see its output above)", o.argv[0], ee.ProcessState, time.Since(start).Round(time.Millisecond))
		} else if err != nil {
			return fmt.Errorf("waiting for the workload: %w", err)
		}
		o.progress("%s exited after %s", o.argv[0], time.Since(start).Round(time.Millisecond))
	case line := <-matched:
		_ = kill()
		o.progress("ready after %s (%q matches --ready); stopped the workload", time.Since(start).Round(time.Millisecond), line)
	case <-timer.C:
		_ = kill()
		if msg := <-setupErr; msg != "" {
			return fmt.Errorf("%s: %s", img.Ref, msg)
		}
		if o.ready != nil {
			return fmt.Errorf("timeout: %s printed no line matching --ready %q within %s", o.argv[0], o.ready, o.timeout)
		}
		return fmt.Errorf("timeout: %s did not exit within %s (for a server, give --ready)", o.argv[0], o.timeout)
	case <-ctx.Done():
		_ = kill()
		return ctx.Err()
	}
	return nil
}

// newExecInRootfsCommand is the hidden command that becomes the workload:
// lazypull optimize starts it in new mount and PID namespaces.
func newExecInRootfsCommand() *cobra.Command {
	return &cobra.Command{
		Use:    execInRootfsCommand + " SPEC",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := execInRootfs(args[0])
			// Only reached when the workload could not be executed:
			// tell lazypull optimize on fd 3 (closed on a successful
			// exec).
			if report := os.NewFile(3, "setup-errors"); report != nil {
				if _, werr := fmt.Fprintln(report, err); werr == nil {
					os.Exit(125)
				}
			}
			return err
		},
	}
}

// execInRootfs prepares the root file system of spec and executes the
// workload; it returns only on failure.
func execInRootfs(raw string) error {
	var spec execSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		return fmt.Errorf("bad exec spec: %w", err)
	}
	if len(spec.Args) == 0 {
		return errors.New("no command")
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making the mount namespace private: %w", err)
	}
	if err := mountSpecial(spec.Root); err != nil {
		return err
	}
	if err := unix.Chroot(spec.Root); err != nil {
		return fmt.Errorf("chroot %s: %w", spec.Root, err)
	}
	dir := spec.Dir
	if dir == "" {
		dir = "/"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("working directory %s: %w", dir, err)
	}
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("working directory %s: %w", dir, err)
	}
	path, err := lookPath(spec.Args[0], spec.Env)
	if err != nil {
		return err
	}
	env := spec.Env
	if !slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, "HOME=") }) {
		env = append(env, "HOME="+homeOf(spec.User))
	}
	if spec.User != "" {
		uid, gid, err := resolveUser(spec.User)
		if err != nil {
			return fmt.Errorf("user %q: %w", spec.User, err)
		}
		if err := unix.Setgroups([]int{gid}); err != nil {
			return fmt.Errorf("setgroups: %w", err)
		}
		if err := unix.Setgid(gid); err != nil {
			return fmt.Errorf("setgid %d: %w", gid, err)
		}
		if err := unix.Setuid(uid); err != nil {
			return fmt.Errorf("setuid %d: %w", uid, err)
		}
	}
	unix.CloseOnExec(3) // the setup-error pipe: EOF to lazypull once the workload runs
	if err := unix.Exec(path, spec.Args, env); err != nil {
		return fmt.Errorf("executing %s: %w", path, err)
	}
	return nil
}

// mountSpecial mounts /proc, /sys (read-only) and a small /dev into root.
func mountSpecial(root string) error {
	for _, d := range []string{"proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return fmt.Errorf("creating /%s in the image: %w", d, err)
		}
	}
	if err := unix.Mount("proc", filepath.Join(root, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mounting /proc: %w", err)
	}
	sys := filepath.Join(root, "sys")
	if err := unix.Mount("sysfs", sys, "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		// sysfs cannot be mounted again without a network namespace
		// in some setups: bind the host's, read-only.
		if err := unix.Mount("/sys", sys, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("mounting /sys: %w", err)
		}
		if err := unix.Mount("", sys, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("making /sys read-only: %w", err)
		}
	}
	dev := filepath.Join(root, "dev")
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=755,size=65536k"); err != nil {
		return fmt.Errorf("mounting /dev: %w", err)
	}
	for _, n := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		p := filepath.Join(dev, n)
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o666)
		if err != nil {
			return fmt.Errorf("creating /dev/%s: %w", n, err)
		}
		f.Close()
		if err := unix.Mount("/dev/"+n, p, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding /dev/%s: %w", n, err)
		}
	}
	for _, d := range []string{"pts", "shm"} {
		if err := os.Mkdir(filepath.Join(dev, d), 0o755); err != nil {
			return fmt.Errorf("creating /dev/%s: %w", d, err)
		}
	}
	if err := unix.Mount("devpts", filepath.Join(dev, "pts"), "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"); err != nil {
		return fmt.Errorf("mounting /dev/pts: %w", err)
	}
	if err := unix.Mount("shm", filepath.Join(dev, "shm"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=1777,size=65536k"); err != nil {
		return fmt.Errorf("mounting /dev/shm: %w", err)
	}
	for link, target := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"} {
		if err := os.Symlink(target, filepath.Join(dev, link)); err != nil {
			return fmt.Errorf("creating /dev/%s: %w", link, err)
		}
	}
	return nil
}

// lookPath finds name in the PATH of env (within the current root), the
// way a shell would.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		if err := executable(name); err != nil {
			return "", fmt.Errorf("command %s not found in the image: %w", name, err)
		}
		return name, nil
	}
	path := defaultPath
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("command %s not found in the image (PATH=%s)", name, path)
}

func executable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", p)
	}
	return nil
}

// resolveUser turns an image config's user ("uid", "uid:gid", "name",
// "name:group") into ids, reading /etc/passwd and /etc/group of the
// current root for names.
func resolveUser(user string) (int, int, error) {
	u, g, hasGroup := strings.Cut(user, ":")
	uid, gid := -1, -1
	if n, err := strconv.Atoi(u); err == nil {
		uid = n
		if fields, ok := lookupDB("/etc/passwd", 2, u); ok {
			gid, _ = strconv.Atoi(fields[3])
		}
	} else if fields, ok := lookupDB("/etc/passwd", 0, u); ok {
		uid, _ = strconv.Atoi(fields[2])
		gid, _ = strconv.Atoi(fields[3])
	} else {
		return 0, 0, fmt.Errorf("no user %q in the image's /etc/passwd", u)
	}
	if hasGroup {
		if n, err := strconv.Atoi(g); err == nil {
			gid = n
		} else if fields, ok := lookupDB("/etc/group", 0, g); ok {
			gid, _ = strconv.Atoi(fields[2])
		} else {
			return 0, 0, fmt.Errorf("no group %q in the image's /etc/group", g)
		}
	}
	if gid < 0 {
		gid = 0
	}
	return uid, gid, nil
}

// homeOf returns the home directory of an image config's user (root when
// empty) from the image's /etc/passwd, or "/", as containerd sets HOME.
func homeOf(user string) string {
	u, _, _ := strings.Cut(user, ":")
	if u == "" {
		u = "0"
	}
	col := 0
	if _, err := strconv.Atoi(u); err == nil {
		col = 2
	}
	if fields, ok := lookupDB("/etc/passwd", col, u); ok && len(fields) > 5 && fields[5] != "" {
		return fields[5]
	}
	return "/"
}

// lookupDB returns the fields of the first line of a passwd or group file
// whose field col is key.
func lookupDB(file string, col int, key string) ([]string, bool) {
	f, err := os.Open(file)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) >= 4 && fields[col] == key {
			return fields, true
		}
	}
	return nil, false
}
