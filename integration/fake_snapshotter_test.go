package integration

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"google.golang.org/grpc"
)

// fakeSnapshotterEnv makes the test binary run fakeSnapshotterMain instead
// of the tests: a proxy snapshotter daemon with lazypull-snapshotter's
// command line that serves containerd's overlayfs snapshotter. It lets the
// harness's Snapshotter and proxy-plugin wiring be tested before, and
// independently of, the real daemon.
const fakeSnapshotterEnv = "LAZYPULL_TEST_FAKE_SNAPSHOTTER"

func fakeSnapshotterMain(args []string) int {
	fs := flag.NewFlagSet("fake-snapshotter", flag.ContinueOnError)
	address := fs.String("address", "", "gRPC socket")
	root := fs.String("root", "", "state directory")
	fs.String("config", "", "config file (ignored)")
	fs.String("log-level", "", "log level (ignored)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "fake-snapshotter: --address and --root are required")
		return 2
	}
	sn, err := overlay.NewSnapshotter(*root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake-snapshotter:", err)
		return 1
	}
	defer sn.Close()
	os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake-snapshotter:", err)
		return 1
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		fmt.Fprintln(os.Stderr, "fake-snapshotter: got", s)
		srv.GracefulStop()
	}()
	fmt.Fprintln(os.Stderr, "fake-snapshotter: serving on", *address)
	if err := srv.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "fake-snapshotter:", err)
		return 1
	}
	return 0
}
