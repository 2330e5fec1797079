// Package fusemanager lets the layers' FUSE file systems live in a process
// of their own, the fuse manager, which outlives the snapshotter daemon: a
// daemon that is killed, restarted or upgraded reconnects to the running
// manager and finds its mounts there, and the containers reading those
// layers never lose their FUSE server.
//
// The manager (Serve) exposes a Backend over net/rpc on a unix socket; the
// daemon drives it with a Client, which implements snapshot.LayerFS,
// snapshot.LayerSizer and snapshot.MountLister. The protocol is versioned
// (Protocol): a daemon refuses a manager speaking another version, and
// the manager is upgraded by draining it (Client.Shutdown).
package fusemanager

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
)

// Protocol is the version of the RPC protocol. A change of the method set
// or of an argument's meaning bumps it.
const Protocol = 1

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
