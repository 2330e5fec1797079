// Command lazypull-snapshotter is lazypull's containerd snapshotter daemon.
// It serves containerd's snapshots gRPC API on a unix socket; containerd
// reaches it as a proxy plugin:
//
//	[proxy_plugins.lazypull]
//	  type = "snapshot"
//	  address = "/run/lazypull/lazypull.sock"
//
// Usage:
//
//	lazypull-snapshotter [--address SOCKET] [--root DIR] [--config FILE] [--log-level LEVEL]
//	lazypull-snapshotter --version
//	lazypull-snapshotter fuse-manager [--stop] [--address SOCKET] [--root DIR] [--config FILE]
//
// With [fuse_manager] enable = true the layers are served by the fuse
// manager, a process the daemon starts if it is not running and which
// outlives it: running containers keep their layers across daemon
// restarts. `fuse-manager --stop` unmounts them all and stops it.
//
// Bad flags exit with status 2, failures with 1. SIGTERM or SIGINT stops
// serving (waiting a while for calls in progress), closes the snapshotter
// and exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/lazypull/lazypull/cri"
	"github.com/lazypull/lazypull/internal/fusemanager"
	"github.com/lazypull/lazypull/keychain"
	"github.com/lazypull/lazypull/service"
	"github.com/lazypull/lazypull/snapshot"
)

const (
	defaultAddress = "/run/lazypull/lazypull.sock"
	defaultRoot    = "/var/lib/lazypull"

	// gracefulTimeout bounds the wait for calls in progress at shutdown.
	gracefulTimeout = 10 * time.Second
)

// version is set at build time with -ldflags "-X main.version=v1.2.3".
var version = ""

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// daemonConfig is what the daemon runs with, flags and file combined.
type daemonConfig struct {
	address string
	commonConfig
}

// run is the whole command; it returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "fuse-manager" {
		return runManager(args[1:], stdout, stderr)
	}
	fl := flag.NewFlagSet("lazypull-snapshotter", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lazypull-snapshotter [flags]\n\nlazypull's containerd remote snapshotter daemon.\n\nFlags:\n")
		fl.PrintDefaults()
	}
	address := fl.String("address", defaultAddress, "unix socket to serve containerd's snapshots API on")
	common := addCommonFlags(fl)
	showVersion := fl.Bool("version", false, "print the version and exit")
	if code, ok := common.parse(fl, args, stderr); !ok {
		return code
	}
	if *showVersion {
		fmt.Fprintf(stdout, "lazypull-snapshotter %s %s\n", versionString(), runtime.Version())
		return 0
	}
	cc, code, ok := common.load(fl, stderr)
	if !ok {
		return code
	}
	dc := daemonConfig{address: *address, commonConfig: cc}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serve(ctx, dc); err != nil {
		log.G(ctx).WithError(err).Error("lazypull-snapshotter failed")
		return 1
	}
	return 0
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

// serve runs the daemon until ctx is done.
func serve(ctx context.Context, dc daemonConfig) (retErr error) {
	setMemoryLimit(ctx, dc.cfg)
	root := dc.root
	// Listen first: a daemon already serving on the address is reported
	// before this one touches anything.
	l, err := listen(dc.address)
	if err != nil {
		return err
	}
	defer l.Close() // after Serve returned: unlinks the socket if still there
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts := service.Options{
		Config:    dc.cfg,
		Root:      root,
		UserAgent: "lazypull-snapshotter/" + versionString(),
		Metrics:   reg,
	}
	// The fetch log (for lazypull bench) is kept only when the metrics
	// endpoint that serves it is on, by whoever fetches: the daemon, or
	// the fuse manager, whose log the daemon serves.
	var fetches http.Handler
	var (
		svc      *service.Service
		mc       *fusemanager.Client
		layerFS  snapshot.LayerFS
		captured *keychain.Captured
		gatherer prometheus.Gatherer = reg
	)
	if dc.cfg.FuseManager.Enable {
		if mc, err = connectManager(ctx, dc, root); err != nil {
			if ctx.Err() != nil {
				// SIGTERM while the manager starts: a clean stop. The
				// manager, once up, stays for the next daemon.
				log.G(ctx).WithError(err).Info("shutting down while connecting to the fuse manager")
				return nil
			}
			return fmt.Errorf("fuse manager: %w", err)
		}
		defer mc.Close() // the manager and its mounts stay
		layerFS = mc
		gatherer = prometheus.Gatherers{reg, managerMetrics{mc}}
		fetches = managerFetches{mc}
		if dc.cfg.CRI.Enable {
			// The manager fetches, the CRI proxy here captures: the
			// manager asks for the credentials over this socket.
			captured = keychain.NewCaptured()
			stopCreds, err := serveCredentials(ctx, credentialsAddress(root), captured)
			if err != nil {
				return err
			}
			defer stopCreds()
		}
	} else {
		if dc.cfg.Metrics.Address != "" {
			fetches = withFetchLog(&opts)
		}
		svc, err = service.New(ctx, opts)
		if err != nil {
			return fmt.Errorf("setting up the layer file system: %w", err)
		}
		defer func() {
			if err := svc.Close(); err != nil {
				log.G(ctx).WithError(err).Error("failed to close the layer file system")
				if retErr == nil {
					retErr = err
				}
			}
		}()
		layerFS = svc.LayerFS()
		captured = svc.Captured
	}

	sn, err := snapshot.New(ctx, snapshot.Options{Root: root, LayerFS: layerFS})
	if err != nil {
		return err
	}
	if svc != nil {
		svc.OnLayerFailed(sn.LayerFailed)
		// Saved TOCs of layers no snapshot uses any more go, before
		// serving. (With the fuse manager, the manager owns layers/.)
		if err := svc.LayerFS().SweepLayers(ctx, sn); err != nil {
			log.G(ctx).WithError(err).Warn("sweeping saved layer metadata failed")
		}
	}
	defer func() {
		if err := sn.Close(); err != nil {
			log.G(ctx).WithError(err).Error("failed to close the snapshotter")
			if retErr == nil {
				retErr = err
			}
		}
	}()
	if mc != nil {
		// Layers the manager fails are removed here, as without it. The
		// watch ends before the snapshotter closes (defers run in reverse).
		wctx, cancel := context.WithCancel(ctx)
		watched := make(chan struct{})
		go func() {
			defer close(watched)
			mc.WatchFailures(wctx, func(f fusemanager.Failure) { managerLayerFailed(wctx, sn, f) })
		}()
		defer func() { cancel(); <-watched }()
	}

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(l) }()

	var proxy *cri.Proxy
	if c := dc.cfg.CRI; c.Enable {
		if proxy, err = startCRIProxy(ctx, c, captured, errc); err != nil {
			srv.Stop()
			return err
		}
	}

	var metrics *http.Server
	if addr := dc.cfg.Metrics.Address; addr != "" {
		ml, err := net.Listen("tcp", addr)
		if err != nil {
			srv.Stop()
			return fmt.Errorf("metrics address: %w", err)
		}
		mux := http.NewServeMux()
		// With the fuse manager, a manager that does not answer leaves
		// its metrics out (and lazypull_fuse_manager_up 0), not the
		// daemon's.
		mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
		mux.Handle("/debug/fetches", fetches)
		if dc.cfg.Metrics.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := metrics.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics server: %w", err)
			}
		}()
		log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
	}
	log.G(ctx).WithField("address", dc.address).WithField("root", root).WithField("version", versionString()).Info("lazypull-snapshotter serving")

	var serveErr error
	select {
	case <-ctx.Done():
		log.G(ctx).Info("shutting down")
	case serveErr = <-errc:
		log.G(ctx).WithError(serveErr).Error("serving failed")
	}
	stopped := make(chan struct{})
	go func() {
		if proxy != nil {
			if err := proxy.Close(); err != nil {
				log.G(ctx).WithError(err).Warn("closing the CRI proxy")
			}
		}
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(gracefulTimeout):
		log.G(ctx).Warn("calls still in progress after the graceful timeout; stopping")
		if proxy != nil {
			proxy.Stop()
		}
		srv.Stop()
		<-stopped
	}
	if metrics != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		_ = metrics.Shutdown(sctx)
		cancel()
	}
	return serveErr
}

// startCRIProxy serves the CRI image-service proxy ([cri]) until Close;
// a serving failure goes to errc.
func startCRIProxy(ctx context.Context, c service.CRIConfig, captured *keychain.Captured, errc chan<- error) (*cri.Proxy, error) {
	l, err := cri.Listen(c.Address)
	if err != nil {
		return nil, err
	}
	p, err := cri.New(cri.Options{Containerd: c.ContainerdAddress, Captured: captured})
	if err != nil {
		l.Close()
		return nil, err
	}
	go func() {
		if err := p.Serve(l); err != nil {
			errc <- fmt.Errorf("cri proxy: %w", err)
		}
	}()
	log.G(ctx).WithField("address", c.Address).WithField("containerd", c.ContainerdAddress).Info("serving the CRI image service proxy")
	return p, nil
}

// listen opens the unix socket at address, creating its directory and
// replacing a stale socket file (one nobody accepts on).
func listen(address string) (net.Listener, error) {
	if address == "" {
		return nil, errors.New("empty --address")
	}
	// sun_path holds 108 bytes including the terminating NUL.
	if len(address) > 107 {
		return nil, fmt.Errorf("socket path %s is too long (%d bytes, at most 107)", address, len(address))
	}
	if err := os.MkdirAll(filepath.Dir(address), 0o711); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(address); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", address)
		}
		if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use: is another lazypull-snapshotter running?", address)
		}
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
		log.L.WithField("address", address).Info("removed stale socket")
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(address, 0o660); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// workingSetAllowance is what the daemon needs besides its memory chunk
// cache: TOC indexes, fetch and decompression buffers, FUSE buffers.
const workingSetAllowance = 96 << 20

// setMemoryLimit gives the Go runtime a soft memory limit (unless GOMEMLIMIT
// is set): the memory chunk cache, the layers' memory budget (indexes and
// fetches in flight) and a working-set allowance. Most of the
// daemon's allocations are short-lived fetch buffers; without a limit the
// heap may grow to twice the live data before a collection.
func setMemoryLimit(ctx context.Context, cfg *service.Config) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	limit := cfg.Cache.MaxMemoryBytes + cfg.Limits.MemoryBudget + workingSetAllowance
	debug.SetMemoryLimit(limit)
	log.G(ctx).WithField("bytes", limit).Debug("soft memory limit set")
}
