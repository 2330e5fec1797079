package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
)

// Version is a containerd release line the harness can run: where its
// daemon is, which config schema it reads and what else it needs.
type Version struct {
	// Name names the version in subtests and logs, e.g. "containerd-1.6".
	Name string
	// Binary is the containerd daemon.
	Binary string
	// ConfigVersion is the config schema written for the daemon: 2 for
	// containerd 1.x, 3 for 2.x (2.4 migrates 3 to its own 4 on load).
	ConfigVersion int
	// BinDir is put first in the daemon's PATH so that it starts the runc
	// shim of its own release (containerd looks shims up in PATH).
	BinDir string
	// Needs lists other binaries the version needs: absolute paths, or
	// names looked up in PATH.
	Needs []string
	// ServerVersion is a prefix the daemon's reported version must have,
	// so a test never silently runs against the wrong daemon.
	ServerVersion string
}

// ToolsDir is where hack/install-deps.sh installs containerd 2.x: the
// LAZYPULL_TOOLS environment variable, or /usr/local/lib/lazypull-tools.
func ToolsDir() string {
	if d := os.Getenv("LAZYPULL_TOOLS"); d != "" {
		return d
	}
	return "/usr/local/lib/lazypull-tools"
}

// Containerd16 is Debian 12's packaged containerd 1.6.
func Containerd16() Version {
	return Version{
		Name:          "containerd-1.6",
		Binary:        "/usr/bin/containerd",
		ConfigVersion: 2,
		BinDir:        "/usr/bin",
		Needs:         []string{"/usr/bin/containerd-shim-runc-v2", "runc"},
		ServerVersion: "1.6.",
	}
}

// Containerd2 is containerd 2.x built by hack/install-deps.sh into ToolsDir.
func Containerd2() Version {
	bin := filepath.Join(ToolsDir(), "bin")
	return Version{
		Name:          "containerd-2.4",
		Binary:        filepath.Join(bin, "containerd"),
		ConfigVersion: 3,
		BinDir:        bin,
		Needs:         []string{filepath.Join(bin, "containerd-shim-runc-v2"), "runc"},
		ServerVersion: "v2.",
	}
}

// Versions lists every containerd version the integration tests run against.
func Versions() []Version { return []Version{Containerd16(), Containerd2()} }

// Check reports a missing or non-executable binary of v, naming the script
// that installs it.
func (v Version) Check() error {
	var missing []string
	for _, p := range append([]string{v.Binary}, v.Needs...) {
		if !filepath.IsAbs(p) {
			if _, err := exec.LookPath(p); err != nil {
				missing = append(missing, p+" (not in PATH)")
			}
			continue
		}
		fi, err := os.Stat(p)
		if err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s: missing %s; run hack/install-deps.sh as root", v.Name, strings.Join(missing, ", "))
	}
	return nil
}

// ContainerdConfig configures a daemon started by StartContainerd.
type ContainerdConfig struct {
	Version Version
	// Dir holds the daemon's root, state, sockets, config and log. Empty
	// means a new directory under /tmp, removed by Close. Keep it short:
	// unix socket paths must fit in 108 bytes.
	Dir string
	// ProxySnapshotters maps snapshotter names to gRPC socket addresses:
	// each becomes [proxy_plugins.NAME] type = "snapshot".
	ProxySnapshotters map[string]string
	// RegistryConfigPath is a hosts.toml directory (certs.d layout) for
	// pulls done by the daemon itself (2.x transfer service). Pulls through
	// this package's Pull resolve on the client side and do not use it.
	RegistryConfigPath string
	// LogLevel is the daemon's --log-level; default "debug".
	LogLevel string
	// ExtraConfig is appended verbatim to the generated TOML.
	ExtraConfig string
}

// Containerd is a running containerd daemon owned by a test.
type Containerd struct {
	cfg        ContainerdConfig
	ownDir     bool
	dir        string
	address    string
	configPath string
	version    string
	client     *client.Client
	nsSeq      atomic.Int64
	daemon
}

// The daemon's directory layout under Dir.
const (
	ctdRootDir  = "root"
	ctdStateDir = "state"
	ctdSocket   = "c.sock"
	ctdShimDir  = "s"    // 2.x shim sockets (socket_dir, max 42 bytes)
	ctdRuncRoot = "runc" // runc --root for containers started by Run
	ctdFIFODir  = "fifo" // cio FIFOs
)

// StartContainerd starts a daemon and waits until it serves its API.
// The caller must Close it.
func StartContainerd(ctx context.Context, cfg ContainerdConfig) (_ *Containerd, retErr error) {
	if err := cfg.Version.Check(); err != nil {
		return nil, err
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "debug"
	}
	c := &Containerd{cfg: cfg, dir: cfg.Dir, daemon: daemon{name: cfg.Version.Name}}
	if c.dir == "" {
		d, err := os.MkdirTemp("/tmp", "lp-ctd-")
		if err != nil {
			return nil, err
		}
		c.dir, c.ownDir = d, true
	}
	defer func() {
		if retErr != nil {
			c.Close()
		}
	}()
	c.address = filepath.Join(c.dir, ctdSocket)
	if len(c.address)+len(".ttrpc") >= 108 || len(filepath.Join(c.dir, ctdShimDir)) > 42 {
		return nil, fmt.Errorf("containerd dir %q is too long for unix socket paths", c.dir)
	}
	for _, d := range []string{ctdRootDir, ctdStateDir, ctdShimDir, ctdRuncRoot, ctdFIFODir, "opt"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	c.configPath = filepath.Join(c.dir, "config.toml")
	if err := os.WriteFile(c.configPath, []byte(c.configTOML()), 0o600); err != nil {
		return nil, err
	}
	c.logPath = filepath.Join(c.dir, "containerd.log")
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	cl, err := client.New(c.address, client.WithTimeout(5*time.Second))
	if err != nil {
		return nil, err
	}
	c.client = cl
	v, err := cl.Version(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: version: %w", cfg.Version.Name, err)
	}
	if !strings.HasPrefix(v.Version, cfg.Version.ServerVersion) {
		return nil, fmt.Errorf("%s: daemon %s reports version %q, want prefix %q",
			cfg.Version.Name, cfg.Version.Binary, v.Version, cfg.Version.ServerVersion)
	}
	c.version = v.Version
	return c, nil
}

// NewContainerd starts a daemon for the test, dumps its log if the test
// fails and closes it when the test ends.
func NewContainerd(t testing.TB, cfg ContainerdConfig) *Containerd {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := StartContainerd(ctx, cfg)
	if err != nil {
		t.Fatalf("start %s: %v", cfg.Version.Name, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLog(t, c.cfg.Version.Name, c.logPath, 0)
		}
		if err := c.Close(); err != nil {
			t.Errorf("close %s: %v", c.cfg.Version.Name, err)
		}
	})
	return c
}

// Client is a containerd v2 Go client connected to the daemon. It has no
// default namespace: use a context from Namespace or namespaces.WithNamespace.
func (c *Containerd) Client() *client.Client { return c.client }

// Address is the daemon's gRPC socket.
func (c *Containerd) Address() string { return c.address }

// Dir is the directory holding everything the daemon writes.
func (c *Containerd) Dir() string { return c.dir }

// Root is the daemon's root directory (config "root").
func (c *Containerd) Root() string { return filepath.Join(c.dir, ctdRootDir) }

// State is the daemon's state directory (config "state").
func (c *Containerd) State() string { return filepath.Join(c.dir, ctdStateDir) }

// ConfigPath is the generated config file.
func (c *Containerd) ConfigPath() string { return c.configPath }

// LogPath is the file that collects the daemon's output, across restarts.
func (c *Containerd) LogPath() string { return c.logPath }

// Version is the version the running daemon reports.
func (c *Containerd) Version() string { return c.version }

// Config is the configuration the daemon was started with.
func (c *Containerd) Config() ContainerdConfig { return c.cfg }

func (c *Containerd) configTOML() string {
	q := strconv.Quote
	var b strings.Builder
	v := c.cfg.Version
	fmt.Fprintf(&b, "version = %d\n", v.ConfigVersion)
	fmt.Fprintf(&b, "root = %s\nstate = %s\n", q(c.Root()), q(c.State()))
	fmt.Fprintf(&b, "temp = %s\n", q(filepath.Join(c.dir, "tmp")))
	fmt.Fprintf(&b, "imports = []\n")
	// Plugins that are slow to load, need things this machine lacks, or
	// read and write outside the daemon's directory.
	disabled := []string{
		"io.containerd.grpc.v1.cri",
		"io.containerd.snapshotter.v1.btrfs",
		"io.containerd.snapshotter.v1.zfs",
		"io.containerd.snapshotter.v1.devmapper",
		"io.containerd.internal.v1.tracing",
		"io.containerd.tracing.processor.v1.otlp",
	}
	if v.ConfigVersion >= 3 {
		disabled = append(disabled,
			"io.containerd.cri.v1.images",
			"io.containerd.cri.v1.runtime",
			"io.containerd.podsandbox.controller.v1.podsandbox",
			"io.containerd.snapshotter.v1.blockfile",
			"io.containerd.snapshotter.v1.erofs",
			"io.containerd.differ.v1.erofs",
			"io.containerd.mount-handler.v1.erofs",
			"io.containerd.nri.v1.nri",
			"io.containerd.image-verifier.v1.bindir",
			"io.containerd.monitor.container.v1.restart",
		)
	} else {
		disabled = append(disabled,
			"io.containerd.snapshotter.v1.aufs",
			"io.containerd.internal.v1.restart",
			// Not io.containerd.runtime.v1.linux: 1.6's tasks service
			// fails to load without it.
		)
	}
	fmt.Fprintf(&b, "disabled_plugins = [%s]\n", quoteList(disabled))
	fmt.Fprintf(&b, "required_plugins = [%s]\n", quoteList([]string{
		"io.containerd.snapshotter.v1.overlayfs",
		"io.containerd.runtime.v2.task",
	}))
	fmt.Fprintf(&b, "\n[grpc]\n  address = %s\n", q(c.address))
	fmt.Fprintf(&b, "\n[ttrpc]\n  address = %s\n", q(c.address+".ttrpc"))
	fmt.Fprintf(&b, "\n[debug]\n  address = \"\"\n")
	fmt.Fprintf(&b, "\n[metrics]\n  address = \"\"\n")
	fmt.Fprintf(&b, "\n[plugins]\n")
	fmt.Fprintf(&b, "  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = %s\n", q(filepath.Join(c.dir, "opt")))
	if v.ConfigVersion >= 3 {
		fmt.Fprintf(&b, "  [plugins.\"io.containerd.shim.v1.manager\"]\n    socket_dir = %s\n", q(filepath.Join(c.dir, ctdShimDir)))
		if c.cfg.RegistryConfigPath != "" {
			fmt.Fprintf(&b, "  [plugins.\"io.containerd.transfer.v1.local\"]\n    config_path = %s\n", q(c.cfg.RegistryConfigPath))
		}
	}
	names := make([]string, 0, len(c.cfg.ProxySnapshotters))
	for n := range c.cfg.ProxySnapshotters {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "\n[proxy_plugins.%s]\n  type = \"snapshot\"\n  address = %s\n", q(n), q(c.cfg.ProxySnapshotters[n]))
	}
	if c.cfg.ExtraConfig != "" {
		b.WriteString("\n" + c.cfg.ExtraConfig + "\n")
	}
	return b.String()
}

func quoteList(l []string) string {
	q := make([]string, len(l))
	for i, s := range l {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

// Start starts the daemon after Stop or Kill (StartContainerd starts it the
// first time) and waits until it serves its API. The Client reconnects.
func (c *Containerd) Start(ctx context.Context) error {
	v := c.cfg.Version
	return c.launch(ctx, func() *exec.Cmd {
		cmd := exec.Command(v.Binary, "--config", c.configPath, "--log-level", c.cfg.LogLevel)
		cmd.Env = envWithPath(v.BinDir)
		cmd.Dir = c.dir
		return cmd
	}, 30*time.Second, "serve "+c.address, func() bool {
		// A served Version call. The client used here is private:
		// c.client may not exist yet.
		_, err := os.Stat(c.address)
		return err == nil && probeContainerd(ctx, c.address) == nil
	})
}

func probeContainerd(ctx context.Context, address string) error {
	cl, err := client.New(address, client.WithTimeout(time.Second))
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, err = cl.Version(ctx)
	return err
}

// Stop stops the daemon with SIGTERM (SIGKILL after 10s). Containers and
// their shims keep running, as in a real daemon restart.
func (c *Containerd) Stop() error { return c.halt(syscall.SIGTERM, 10*time.Second) }

// Kill stops the daemon with SIGKILL.
func (c *Containerd) Kill() error { return c.halt(syscall.SIGKILL, 10*time.Second) }

// Restart is Stop then Start.
func (c *Containerd) Restart(ctx context.Context) error {
	if err := c.Stop(); err != nil {
		return err
	}
	return c.Start(ctx)
}

// Close removes every task and container the daemon knows, stops it, kills
// shims it left, unmounts whatever is still mounted under its directory and
// removes the directory if StartContainerd created it.
func (c *Containerd) Close() error {
	var errs []error
	if c.client != nil && c.Running() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := c.removeAllContainers(ctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if c.client != nil {
		c.client.Close()
	}
	if err := c.Stop(); err != nil {
		errs = append(errs, err)
	}
	if c.address != "" {
		killRuncContainers(c.RuncRoot())
		killShims(c.address)
	}
	if c.dir != "" {
		removeCgroups(c.CgroupParent())
		if err := unmountUnder(c.dir); err != nil {
			errs = append(errs, err)
		}
		if c.ownDir && os.Getenv("LAZYPULL_KEEP_TEST_DIRS") == "" {
			if err := os.RemoveAll(c.dir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// removeAllContainers kills and deletes every task and container in every
// namespace, with their snapshots.
func (c *Containerd) removeAllContainers(ctx context.Context) error {
	nss, err := c.client.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("list namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		if err := c.cleanNamespace(namespaces.WithNamespace(ctx, ns), false); err != nil {
			errs = append(errs, fmt.Errorf("namespace %s: %w", ns, err))
		}
	}
	return errors.Join(errs...)
}

// cleanNamespace deletes the containers (with their tasks and snapshots) of
// the namespace in ctx, and with images also its images and the namespace.
func (c *Containerd) cleanNamespace(ctx context.Context, images bool) error {
	var errs []error
	ctrs, err := c.client.Containers(ctx)
	if err != nil {
		return err
	}
	for _, ctr := range ctrs {
		if err := deleteContainer(ctx, ctr); err != nil {
			errs = append(errs, err)
		}
	}
	if !images {
		return errors.Join(errs...)
	}
	is := c.client.ImageService()
	imgs, err := is.List(ctx)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, img := range imgs {
		if err := is.Delete(ctx, img.Name); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func deleteContainer(ctx context.Context, ctr client.Container) error {
	if task, err := ctr.Task(ctx, nil); err == nil {
		if st, err := task.Status(ctx); err == nil && st.Status != client.Stopped {
			if ch, err := task.Wait(ctx); err == nil {
				if err := task.Kill(ctx, syscall.SIGKILL, client.WithKillAll); err == nil || errdefs.IsNotFound(err) {
					select {
					case <-ch:
					case <-time.After(10 * time.Second):
					}
				}
			}
		}
		if _, err := task.Delete(ctx, client.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("delete task %s: %w", ctr.ID(), err)
		}
	}
	if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("delete container %s: %w", ctr.ID(), err)
	}
	return nil
}

var nsUnsafe = regexp.MustCompile(`[^A-Za-z0-9]+`)

// Namespace returns a context in a namespace of its own for the test, and
// registers a cleanup that deletes the containers and images the test left
// there and, if the test failed, logs what the daemon wrote meanwhile.
func (c *Containerd) Namespace(t testing.TB) context.Context {
	t.Helper()
	name := strings.Trim(nsUnsafe.ReplaceAllString(t.Name(), "-"), "-")
	if len(name) > 60 {
		name = name[len(name)-60:]
		name = strings.TrimLeft(name, "-")
	}
	ns := fmt.Sprintf("%s-%d", name, c.nsSeq.Add(1))
	c.LogOnFailure(t)
	ctx := namespaces.WithNamespace(context.Background(), ns)
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := c.cleanNamespace(cctx, true); err != nil {
			t.Errorf("clean namespace %s: %v", ns, err)
		}
	})
	return ctx
}

// LogOnFailure logs what the daemon writes from now until the end of the
// test if the test fails.
func (c *Containerd) LogOnFailure(t testing.TB) {
	var off int64
	if fi, err := os.Stat(c.logPath); err == nil {
		off = fi.Size()
	}
	name := c.cfg.Version.Name
	t.Cleanup(func() {
		if t.Failed() {
			dumpLog(t, name, c.logPath, off)
		}
	})
}

// CgroupParent is the cgroup (relative to the cgroup roots) under which Run
// puts containers, as PARENT/NAMESPACE/ID: unique to the daemon, and
// removed by Close. See WithCgroup.
func (c *Containerd) CgroupParent() string { return "lazypull-" + filepath.Base(c.dir) }

// WithCgroup places a container's cgroup under CgroupParent, instead of
// containerd's default /NAMESPACE/ID that two daemons could share and
// nothing removes.
func (c *Containerd) WithCgroup() oci.SpecOpts {
	return func(ctx context.Context, cl oci.Client, ctr *containers.Container, s *oci.Spec) error {
		ns, err := namespaces.NamespaceRequired(ctx)
		if err != nil {
			return err
		}
		return oci.WithCgroup(path.Join("/", c.CgroupParent(), ns, ctr.ID))(ctx, cl, ctr, s)
	}
}

// RuncRoot is the runc state directory Run gives containers, instead of
// the shim's default /run/containerd/runc.
func (c *Containerd) RuncRoot() string { return filepath.Join(c.dir, ctdRuncRoot) }

// FIFODir is where Run creates the containers' stdio FIFOs, instead of
// /run/containerd/fifo.
func (c *Containerd) FIFODir() string { return filepath.Join(c.dir, ctdFIFODir) }
