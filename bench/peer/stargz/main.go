// Command containerd-stargz-grpc is the bench's build of
// stargz-snapshotter's daemon: the peer lazypull is measured against.
//
// It lives in a Go module of its own (bench/peer/stargz) so that lazypull's
// module never depends on stargz-snapshotter. It is a thin main around the
// library's own service (github.com/containerd/stargz-snapshotter/service,
// the code upstream's containerd-stargz-grpc runs): the same defaults, the
// docker config for credentials, the snapshots API over a unix socket. It
// takes the command line lazypull's test harness gives every snapshotter:
//
//	containerd-stargz-grpc --address SOCK --root DIR --config FILE [--log-level LEVEL]
//
// SIGINT or SIGTERM stops it; its snapshots and FUSE mounts are cleaned up
// on the way out.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

// config is the daemon's TOML: stargz-snapshotter's service settings at the
// top level, as upstream's daemon reads them.
type config struct {
	service.Config
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "containerd-stargz-grpc:", err)
		os.Exit(1)
	}
}

func run() error {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "the snapshotter's gRPC socket")
	configPath := flag.String("config", "", "TOML configuration file (default: upstream's defaults)")
	logLevel := flag.String("log-level", "info", "log level: trace, debug, info, warn, error")
	rootDir := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	flag.Parse()

	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg config
	if *configPath != "" {
		b, err := os.ReadFile(*configPath)
		if err != nil {
			return fmt.Errorf("reading the config: %w", err)
		}
		if err := toml.Unmarshal(b, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", *configPath, err)
		}
	}
	if err := os.MkdirAll(*rootDir, 0o700); err != nil {
		return fmt.Errorf("root: %w", err)
	}
	sn, err := service.NewStargzSnapshotterService(ctx, *rootDir, &cfg.Config,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)))
	if err != nil {
		return fmt.Errorf("starting stargz-snapshotter: %w", err)
	}
	defer func() {
		if err := sn.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the snapshotter")
		}
	}()

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	if err := os.Remove(*address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stale socket: %w", err)
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	served := make(chan error, 1)
	go func() { served <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", *address).Info("serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v, exiting", s)
		rpc.GracefulStop()
		return nil
	case err := <-served:
		return fmt.Errorf("serving: %w", err)
	}
}
