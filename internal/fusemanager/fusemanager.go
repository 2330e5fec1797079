// Package fusemanager lets the layers' FUSE file systems live in a process
// of their own, the fuse manager, which outlives the snapshotter daemon: a
// daemon that is killed, restarted or upgraded reconnects to the running
// manager and finds its mounts there, and the containers reading those
// layers never lose their FUSE server.
//
// The manager (Serve) exposes a Backend over net/rpc on a unix socket; the
// daemon drives it with a Client, which implements snapshot.LayerFS,
// snapshot.LayerSizer and snapshot.MountLister. The same socket carries
// what the daemon needs back from the manager: the layers the manager
// failed (whole-layer verification, Client.WatchFailures), the
// manager's Prometheus metrics (Client is a prometheus.Gatherer) and its
// log of registry requests (Client.Fetches, the daemon's /debug/fetches). The
// manager in turn asks the daemon for the registry credentials the daemon
// captured (ServeCredentials, CredentialSource). The protocol is versioned
// (Protocol): a daemon refuses a manager speaking another version, and
// the manager is upgraded by draining it (Client.Shutdown).
package fusemanager

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
)

// Protocol is the version of the RPC protocol. A change that a peer of
// the same version could not handle (a method removed or renamed, an
// argument's or reply's meaning changed) bumps it, and a daemon refuses a
// manager of another version: that manager must be drained to upgrade. A
// method added that a daemon can do without does not bump it: the client
// reports a manager that does not know it with errdefs.ErrNotImplemented
// (Fetches, added after version 2). Version 2 added Failures and Metrics.
const Protocol = 2

// serviceName is the net/rpc service name.
const serviceName = "FuseManager"

// Backend is what the manager serves: a snapshot.LayerFS that can also
// size and list its mounts (service.LayerFS).
type Backend interface {
	Mount(ctx context.Context, mountpoint string, labels map[string]string) error
	Check(ctx context.Context, mountpoint string, labels map[string]string) error
	Unmount(ctx context.Context, mountpoint string) error
	LayerSize(mountpoint string) (int64, bool)
	Mountpoints() []string
}

// MountArgs names a layer mount.
type MountArgs struct {
	Mountpoint string
	Labels     map[string]string
}

// Result carries an error across the socket with its errdefs class.
type Result struct {
	Err  string
	Kind string
}

// HelloReply identifies the manager.
type HelloReply struct {
	Protocol int
	Version  string
	Pid      int
	// Goroutines is the manager's goroutine count (leak checks).
	Goroutines int
}

// SizeReply is a LayerSize answer.
type SizeReply struct {
	Size int64
	OK   bool
}

// ListReply lists the mountpoints served.
type ListReply struct {
	Mountpoints []string
}

// Failure is a layer the manager failed closed: its whole-layer
// verification found it differs from what its image commits to.
type Failure struct {
	// Seq numbers the manager's failures from 1, in order; a new manager
	// starts again (compare Pid).
	Seq uint64
	// Mountpoint is where the layer is mounted.
	Mountpoint string
	// Image, Layer and ChainID name the layer (its image reference, blob
	// digest and the chain ID containerd commits it under).
	Image, Layer, ChainID string
	// Err says how the layer differs.
	Err string
	// At is when the layer was failed.
	At time.Time
}

// FailuresArgs asks for the failures after Seq After, waiting up to Wait
// for one if there is none yet.
type FailuresArgs struct {
	After uint64
	Wait  time.Duration
}

// FailuresReply lists failures of layers still mounted, oldest first.
type FailuresReply struct {
	Failures []Failure
	// Pid is the manager's: sequence numbers are per manager.
	Pid int
}

// MetricsReply carries the manager's metric families, length-delimited
// protobuf (expfmt.TypeProtoDelim).
type MetricsReply struct {
	Families []byte
}

// FetchesReply carries the manager's fetch log.
type FetchesReply struct {
	// Kept tells whether the manager keeps a fetch log (it does when the
	// config's [metrics] address is set).
	Kept bool
	// JSON is the log as the daemon serves it at /debug/fetches.
	JSON []byte
}

// Empty is an empty argument or reply.
type Empty struct{}

// kinds maps errdefs classes to their wire names, most specific first.
var kinds = []struct {
	name string
	err  error
}{
	{"notfound", errdefs.ErrNotFound},
	{"invalid", errdefs.ErrInvalidArgument},
	{"dataloss", errdefs.ErrDataLoss},
	{"unavailable", errdefs.ErrUnavailable},
	{"exists", errdefs.ErrAlreadyExists},
	{"precondition", errdefs.ErrFailedPrecondition},
	{"deadline", context.DeadlineExceeded},
	{"canceled", context.Canceled},
}

func toResult(err error) Result {
	if err == nil {
		return Result{}
	}
	r := Result{Err: err.Error()}
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			r.Kind = k.name
			break
		}
	}
	return r
}

// remoteError is an error the manager returned.
type remoteError struct {
	msg  string
	kind error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.kind }

func (r Result) err() error {
	if r.Err == "" {
		return nil
	}
	e := &remoteError{msg: r.Err}
	for _, k := range kinds {
		if k.name == r.Kind {
			e.kind = k.err
		}
	}
	return fmt.Errorf("fuse manager: %w", e)
}
