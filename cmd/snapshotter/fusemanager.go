package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/internal/fusemanager"
	"github.com/lazypull/lazypull/keychain"
	"github.com/lazypull/lazypull/service"
	"github.com/lazypull/lazypull/snapshot"
)

// managerStartTimeout bounds the wait for a fuse manager the daemon started.
const managerStartTimeout = 30 * time.Second

// managerAddress is the fuse manager's socket for the daemon's config.
func managerAddress(cfg *service.Config, root string) string {
	if cfg.FuseManager.Address != "" {
		return cfg.FuseManager.Address
	}
	return filepath.Join(root, "fuse-manager.sock")
}

// credentialsAddress is the daemon's credential socket, which the fuse
// manager asks for the credentials the CRI proxy captured.
func credentialsAddress(root string) string {
	return filepath.Join(root, "credentials.sock")
}

// connectManager connects to the running fuse manager, starting it (this
// binary in fuse-manager mode, in a session of its own so that it outlives
// the daemon) if none answers.
func connectManager(ctx context.Context, dc daemonConfig, root string) (*fusemanager.Client, error) {
	addr := managerAddress(dc.cfg, root)
	start := func(ctx context.Context) error { return startManager(ctx, dc, root, addr) }
	c, err := fusemanager.Dial(ctx, addr)
	if err == nil {
		h := c.Manager()
		log.G(ctx).WithField("pid", h.Pid).WithField("version", h.Version).WithField("address", addr).Info("reconnected to the running fuse manager")
	} else {
		if errors.Is(err, errdefs.ErrFailedPrecondition) {
			return nil, err
		}
		if err := start(ctx); err != nil {
			return nil, err
		}
		if c, err = fusemanager.Dial(ctx, addr); err != nil {
			return nil, err
		}
	}
	// A manager that dies later is replaced on the next call; its layers
	// are mounted again as the snapshotter finds them unhealthy.
	c.SetStarter(func(ctx context.Context) error {
		log.G(ctx).WithField("address", addr).Warn("the fuse manager is gone; starting a new one")
		return start(ctx)
	})
	return c, nil
}

// startManager starts a fuse manager (this binary in fuse-manager mode, in
// a session of its own) and waits until it answers on addr.
func startManager(ctx context.Context, dc daemonConfig, root, addr string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("starting the fuse manager: %w", err)
	}
	args := []string{"fuse-manager", "--address", addr, "--root", root, "--log-level", dc.logLevel}
	if dc.configGiven {
		args = append(args, "--config", dc.configPath)
	}
	logPath := filepath.Join(root, "fuse-manager.log")
	lf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("fuse manager log: %w", err)
	}
	defer lf.Close()
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Dir = "/"
	// A session of its own: the daemon's end (a signal to its process
	// group, its terminal going away) is not the manager's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the fuse manager: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps it if it exits while the daemon runs
	log.G(ctx).WithField("pid", cmd.Process.Pid).WithField("log", logPath).Info("started the fuse manager")
	deadline := time.Now().Add(managerStartTimeout)
	for {
		nc, err := net.DialTimeout("unix", addr, time.Second)
		if err == nil {
			nc.Close()
			return nil
		}
		select {
		case werr := <-exited:
			return fmt.Errorf("the fuse manager exited (%v) before answering; see %s", werr, logPath)
		case <-ctx.Done():
			// The daemon stops before the manager it started answered:
			// nobody mounted anything through it yet, so it goes too
			// rather than run on unseen.
			abandonManager(ctx, cmd, exited)
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			abandonManager(ctx, cmd, exited)
			return fmt.Errorf("the fuse manager did not answer on %s within %s: %w", addr, managerStartTimeout, err)
		}
	}
}

// abandonManagerTimeout bounds the wait for a manager that never answered
// to exit on SIGTERM before it is killed.
const abandonManagerTimeout = 10 * time.Second

// abandonManager stops a manager the daemon started that never answered
// (the daemon is stopping, or the manager hangs): SIGTERM, then SIGKILL.
// It has no layers, since only its answering makes it usable.
func abandonManager(ctx context.Context, cmd *exec.Cmd, exited <-chan error) {
	log.G(ctx).WithField("pid", cmd.Process.Pid).Warn("stopping the fuse manager started here: it has not answered yet")
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(abandonManagerTimeout):
		_ = cmd.Process.Kill()
		<-exited
	}
}

// runManager is `lazypull-snapshotter fuse-manager`: it serves the layers'
// FUSE file systems for daemons that connect, until SIGTERM/SIGINT or a
// Shutdown call, and unmounts them all before exiting. With --stop it asks
// the running manager to do that instead.
func runManager(args []string, stdout, stderr io.Writer) int {
	fl := flag.NewFlagSet("lazypull-snapshotter fuse-manager", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lazypull-snapshotter fuse-manager [flags]\n\nServes lazypull's layer file systems for the daemon, outliving it (normally started by the daemon).\n--stop unmounts every layer and stops the running manager (uninstall, manager upgrade),\nand detaches layer mounts a dead manager left.\n\nFlags:\n")
		fl.PrintDefaults()
	}
	address := fl.String("address", "", "unix socket (default: the config's fuse_manager.address, else ROOT/fuse-manager.sock)")
	common := addCommonFlags(fl)
	stop := fl.Bool("stop", false, "unmount every layer of the running manager and stop it")
	if code, ok := common.parse(fl, args, stderr); !ok {
		return code
	}
	cc, code, ok := common.load(fl, stderr)
	if !ok {
		return code
	}
	cfg, r := cc.cfg, cc.root
	addr := *address
	if addr == "" {
		addr = managerAddress(cfg, r)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	if *stop {
		code := stopManager(ctx, addr, stdout, stderr)
		if code == 0 {
			if err := detachStale(r, stdout); err != nil {
				fmt.Fprintf(stderr, "lazypull-snapshotter fuse-manager: %v\n", err)
				return 1
			}
		}
		return code
	}
	if err := serveManager(ctx, addr, r, cfg); err != nil {
		log.G(ctx).WithError(err).Error("fuse manager failed")
		return 1
	}
	return 0
}

// detachStale lazily unmounts the lazypull FUSE mounts left below
// root/snapshots by a manager that died (their connections are dead): the
// uninstall path leaves no mount behind.
func detachStale(root string, stdout io.Writer) error {
	dir := filepath.Join(root, "snapshots")
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		dir = r
	}
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("listing mounts below %s: %w", dir, err)
	}
	var errs []error
	for _, m := range infos {
		if !strings.HasPrefix(m.FSType, "fuse") || !strings.HasPrefix(m.Source, "lazypull") {
			continue
		}
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("detaching %s: %w", m.Mountpoint, err))
			continue
		}
		fmt.Fprintf(stdout, "detached stale layer mount %s\n", m.Mountpoint)
	}
	return errors.Join(errs...)
}

// stopManager asks the manager at addr to unmount everything and exit,
// and waits for it to go.
func stopManager(ctx context.Context, addr string, stdout, stderr io.Writer) int {
	c, err := fusemanager.Dial(ctx, addr)
	if err != nil {
		if errors.Is(err, errdefs.ErrFailedPrecondition) {
			fmt.Fprintf(stderr, "lazypull-snapshotter fuse-manager: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "no fuse manager running at %s\n", addr)
		return 0
	}
	pid := c.Manager().Pid
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err = c.Shutdown(sctx)
	c.Close() // lets the manager exit at once
	if err != nil {
		fmt.Fprintf(stderr, "lazypull-snapshotter fuse-manager: %v\n", err)
		return 1
	}
	for range 200 { // the manager exits right after answering
		if syscall.Kill(pid, 0) != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Fprintf(stdout, "fuse manager (pid %d) unmounted every layer and stopped\n", pid)
	return 0
}

// serveManager runs the fuse manager until ctx is done or Shutdown.
func serveManager(ctx context.Context, addr, root string, cfg *service.Config) (retErr error) {
	setMemoryLimit(ctx, cfg)
	l, err := listen(addr)
	if err != nil {
		return err
	}
	// The socket is removed at exit only if it is still this manager's:
	// a manager started while this one drains must keep its own.
	if ul, ok := l.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(false)
	}
	if own, err := os.Stat(addr); err == nil {
		defer func() {
			if now, err := os.Stat(addr); err == nil && os.SameFile(own, now) {
				os.Remove(addr)
			}
		}()
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		l.Close()
		return err
	}
	// The manager's metrics reach Prometheus through the daemon's
	// /metrics (fusemanager.Client.Gather); its Go runtime and process
	// metrics are prefixed so that they do not collide with the daemon's.
	reg := prometheus.NewRegistry()
	prefixed := prometheus.WrapRegistererWithPrefix("lazypull_fuse_manager_", reg)
	prefixed.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts := service.Options{
		Config:    cfg,
		Root:      root,
		UserAgent: "lazypull-snapshotter/" + versionString(),
		Metrics:   reg,
	}
	if cfg.CRI.Enable {
		// The daemon's CRI proxy captures kubelet's pull credentials; the
		// manager asks it for them (credential providers and the docker
		// config it reads itself, from the same config).
		creds := fusemanager.NewCredentialSource(credentialsAddress(root))
		defer creds.Close()
		opts.CapturedCredentials = creds
	}
	// The daemon serves the fetch log at /debug/fetches on its [metrics]
	// address; the manager keeps it when that is set.
	var fetchesJSON func() ([]byte, error)
	if cfg.Metrics.Address != "" {
		fetchesJSON = withFetchLog(&opts).JSON
	}
	svc, err := service.New(ctx, opts)
	if err != nil {
		l.Close()
		return fmt.Errorf("setting up the layer file system: %w", err)
	}
	failures := fusemanager.NewFailureLog()
	svc.OnLayerFailure(func(_ context.Context, f service.LayerFailure) {
		failures.Add(fusemanager.Failure{Mountpoint: f.Mountpoint, Image: f.Image, Layer: f.Layer.String(), ChainID: f.ChainID, Err: f.Err.Error()})
	})
	var once sync.Once
	var closeErr error
	closeSvc := func() error {
		once.Do(func() { closeErr = svc.Close() })
		return closeErr
	}
	defer func() {
		if err := closeSvc(); err != nil && retErr == nil {
			retErr = err
		}
	}()
	log.G(ctx).WithField("address", addr).WithField("root", root).WithField("pid", os.Getpid()).WithField("version", versionString()).Info("fuse manager serving")
	err = fusemanager.Serve(ctx, l, svc.LayerFS(), fusemanager.ServerOptions{
		Version:  versionString(),
		Failures: failures,
		Metrics:  reg,
		Fetches:  fetchesJSON,
		Shutdown: func(context.Context) error {
			log.G(ctx).Info("shutdown requested: unmounting every layer")
			return closeSvc()
		},
	})
	log.G(ctx).Info("fuse manager stopping; unmounting every layer")
	return err
}

// managerLayerFailed is told by the manager about a layer it failed
// (whole-layer verification): the daemon logs it and removes its
// snapshot, as it does when it serves the layers itself. A failure may be
// reported again after a reconnection; removing it again is harmless.
func managerLayerFailed(ctx context.Context, sn *snapshot.Snapshotter, f fusemanager.Failure) {
	log.G(ctx).WithField("image", f.Image).WithField("layer", f.Layer).WithField("chain_id", f.ChainID).
		WithField("mountpoint", f.Mountpoint).WithField("failed_at", f.At.Format(time.RFC3339)).WithField("error", f.Err).
		Error("LAYER FAILED VERIFICATION (reported by the fuse manager): it does not match what its image commits to; removing its snapshot")
	sn.LayerFailed(ctx, f.Mountpoint, errors.New(f.Err))
}

// managerMetrics gathers the fuse manager's metrics for the daemon's
// /metrics, with lazypull_fuse_manager_up telling whether it answered.
type managerMetrics struct{ c *fusemanager.Client }

var managerUpDesc = prometheus.NewDesc("lazypull_fuse_manager_up",
	"Whether the fuse manager answered the daemon's metrics request (1) or not (0): without it its metrics are missing.", nil, nil)

// Gather implements prometheus.Gatherer.
func (m managerMetrics) Gather() ([]*dto.MetricFamily, error) {
	mfs, err := m.c.Gather()
	up := 1.0
	if err != nil {
		up = 0
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(constCollector{prometheus.MustNewConstMetric(managerUpDesc, prometheus.GaugeValue, up)})
	own, gerr := reg.Gather()
	return append(mfs, own...), errors.Join(err, gerr)
}

// constCollector collects one constant metric.
type constCollector struct{ m prometheus.Metric }

func (c constCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.m.Desc() }
func (c constCollector) Collect(ch chan<- prometheus.Metric) { ch <- c.m }

// serveCredentials serves the credentials captured in captured to the
// fuse manager on a unix socket only root can reach, until the returned
// function is called.
func serveCredentials(ctx context.Context, addr string, captured *keychain.Captured) (func(), error) {
	l, err := listen(addr)
	if err != nil {
		return nil, fmt.Errorf("credential socket: %w", err)
	}
	if err := os.Chmod(addr, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("credential socket: %w", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := fusemanager.ServeCredentials(cctx, l, captured); err != nil {
			log.G(ctx).WithError(err).Error("serving credentials to the fuse manager")
		}
	}()
	return func() { cancel(); <-done }, nil
}
