package fusemanager

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/rpc"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

// Client drives a fuse manager. It implements snapshot.LayerFS,
// snapshot.LayerSizer and snapshot.MountLister. A broken connection is
// dialed again on the next call. Safe for concurrent use.
type Client struct {
	addr string

	mu sync.Mutex
	c  *rpc.Client
	// start, if set, starts a manager when none answers.
	start func(ctx context.Context) error
	// Hello is the manager's answer when the client connected.
	hello HelloReply
}

// Dial connects to the manager at addr and checks that it speaks Protocol.
func Dial(ctx context.Context, addr string) (*Client, error) {
	c := &Client{addr: addr}
	if _, err := c.conn(ctx, false); err != nil {
		return nil, err
	}
	return c, nil
}

// SetStarter makes the client start a manager with fn (and dial again)
// when none answers: a manager that died is replaced on the next call.
func (c *Client) SetStarter(fn func(ctx context.Context) error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.start = fn
}

// Manager returns what the manager said about itself when last connected.
func (c *Client) Manager() HelloReply {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hello
}

// conn returns the connection, dialing (and, with start, starting a
// manager if none answers) when there is none.
func (c *Client) conn(ctx context.Context, start bool) (*rpc.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.c != nil {
		return c.c, nil
	}
	nc, err := dial(ctx, c.addr)
	if err != nil && c.start != nil && start {
		if serr := c.start(ctx); serr != nil {
			return nil, fmt.Errorf("connecting to the fuse manager at %s: %w; starting one: %w", c.addr, err, serr)
		}
		nc, err = dial(ctx, c.addr)
	}
	if err != nil {
		return nil, err
	}
	rc := rpc.NewClient(nc)
	var h HelloReply
	if err := wait(ctx, rc, serviceName+".Hello", Empty{}, &h); err != nil {
		rc.Close()
		return nil, fmt.Errorf("fuse manager at %s: hello: %w", c.addr, err)
	}
	if h.Protocol != Protocol {
		rc.Close()
		return nil, fmt.Errorf("fuse manager at %s (pid %d, version %s) speaks protocol %d, this daemon %d: drain it (lazypull-snapshotter fuse-manager --stop) to upgrade: %w",
			c.addr, h.Pid, h.Version, h.Protocol, Protocol, errdefs.ErrFailedPrecondition)
	}
	c.c, c.hello = rc, h
	return rc, nil
}

func dial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	nc, err := d.DialContext(dctx, "unix", addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to the fuse manager at %s: %w: %w", addr, err, errdefs.ErrUnavailable)
	}
	return nc, nil
}

func wait(ctx context.Context, rc *rpc.Client, method string, args, reply any) error {
	call := rc.Go(method, args, reply, make(chan *rpc.Call, 1))
	select {
	case <-call.Done:
		return call.Error
	case <-ctx.Done():
		return ctx.Err()
	}
}

// call calls method, dialing again once if the connection was broken
// (and starting a manager if none answers, see SetStarter).
func (c *Client) call(ctx context.Context, method string, args, reply any) error {
	return c.callN(ctx, method, args, reply, 2, true)
}

// callN calls method, at most attempts times while the connection breaks;
// start allows starting a manager when none answers.
func (c *Client) callN(ctx context.Context, method string, args, reply any, attempts int, start bool) error {
	for attempt := 1; ; attempt++ {
		rc, err := c.conn(ctx, start)
		if err != nil {
			return err
		}
		err = wait(ctx, rc, serviceName+"."+method, args, reply)
		if err == nil {
			return nil
		}
		var se rpc.ServerError
		if errors.As(err, &se) || ctx.Err() != nil {
			return fmt.Errorf("fuse manager %s: %w", method, err)
		}
		// The connection broke (the manager restarted or died).
		c.mu.Lock()
		if c.c == rc {
			c.c = nil
		}
		c.mu.Unlock()
		rc.Close()
		if attempt >= attempts {
			return fmt.Errorf("fuse manager %s: %w: %w", method, err, errdefs.ErrUnavailable)
		}
	}
}

// Mount implements snapshot.LayerFS.
func (c *Client) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	var r Result
	if err := c.call(ctx, "Mount", MountArgs{Mountpoint: mountpoint, Labels: labels}, &r); err != nil {
		return err
	}
	return r.err()
}

// Check implements snapshot.LayerFS.
func (c *Client) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	var r Result
	if err := c.call(ctx, "Check", MountArgs{Mountpoint: mountpoint, Labels: labels}, &r); err != nil {
		return err
	}
	return r.err()
}

// Unmount implements snapshot.LayerFS.
func (c *Client) Unmount(ctx context.Context, mountpoint string) error {
	var r Result
	if err := c.call(ctx, "Unmount", MountArgs{Mountpoint: mountpoint}, &r); err != nil {
		return err
	}
	return r.err()
}

// LayerSize implements snapshot.LayerSizer.
func (c *Client) LayerSize(mountpoint string) (int64, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var r SizeReply
	if err := c.call(ctx, "LayerSize", MountArgs{Mountpoint: mountpoint}, &r); err != nil {
		return 0, false
	}
	return r.Size, r.OK
}

// Mountpoints implements snapshot.MountLister: the mountpoints the manager
// serves.
func (c *Client) Mountpoints(ctx context.Context) ([]string, error) {
	var r ListReply
	if err := c.call(ctx, "List", Empty{}, &r); err != nil {
		return nil, err
	}
	return r.Mountpoints, nil
}

// Shutdown asks the manager to unmount every layer and exit.
func (c *Client) Shutdown(ctx context.Context) error {
	var r Result
	// Once: a manager that went away meanwhile must not be asked again
	// on a new connection (to a successor).
	if err := c.callN(ctx, "Shutdown", Empty{}, &r, 1, false); err != nil {
		return err
	}
	return r.err()
}

// failuresWait is how long one Failures call of WatchFailures waits.
const failuresWait = 30 * time.Second

// WatchFailures calls fn with each layer the manager failed, until ctx is
// done: first the failures of layers it still serves, then new ones as
// they happen. After a reconnection (a daemon restart, or a new manager)
// fn sees the failures of layers still mounted again: it must be
// idempotent. It never starts a manager; while none answers it retries
// every second.
func (c *Client) WatchFailures(ctx context.Context, fn func(Failure)) {
	var after uint64
	pid := 0
	for ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, failuresWait+10*time.Second)
		var r FailuresReply
		err := c.callN(cctx, "Failures", FailuresArgs{After: after, Wait: failuresWait}, &r, 2, false)
		cancel()
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		if r.Pid != pid && after != 0 {
			// Another manager: its numbers start again.
			pid, after = r.Pid, 0
			continue
		}
		pid = r.Pid
		for _, f := range r.Failures {
			fn(f)
			after = max(after, f.Seq)
		}
	}
}

// Gather implements prometheus.Gatherer with the manager's metrics, so
// that the daemon's /metrics carries them. It never starts a manager.
func (c *Client) Gather() ([]*dto.MetricFamily, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var r MetricsReply
	if err := c.callN(ctx, "Metrics", Empty{}, &r, 2, false); err != nil {
		return nil, err
	}
	dec := expfmt.NewDecoder(bytes.NewReader(r.Families), expfmt.NewFormat(expfmt.TypeProtoDelim))
	var out []*dto.MetricFamily
	for {
		mf := &dto.MetricFamily{}
		err := dec.Decode(mf)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("fuse manager metrics: %w", err)
		}
		out = append(out, mf)
	}
}

// Fetches returns the manager's log of registry requests as JSON (the
// daemon serves it at /debug/fetches). It fails with errdefs.ErrNotFound
// if the manager keeps no log (no [metrics] address in its config), and
// with errdefs.ErrNotImplemented if the manager is older than the Fetches
// call. It never starts a manager.
func (c *Client) Fetches(ctx context.Context) ([]byte, error) {
	var r FetchesReply
	if err := c.callN(ctx, "Fetches", Empty{}, &r, 2, false); err != nil {
		var se rpc.ServerError
		if errors.As(err, &se) && strings.Contains(string(se), "can't find method") {
			h := c.Manager()
			return nil, fmt.Errorf("the fuse manager (pid %d, version %s) keeps no fetch log for the daemon; drain it (lazypull-snapshotter fuse-manager --stop) to upgrade it: %w",
				h.Pid, h.Version, errdefs.ErrNotImplemented)
		}
		return nil, err
	}
	if !r.Kept {
		return nil, fmt.Errorf("the fuse manager keeps no fetch log (its config sets no [metrics] address): %w", errdefs.ErrNotFound)
	}
	return r.JSON, nil
}

// Close closes the connection; the manager keeps running.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.c == nil {
		return nil
	}
	err := c.c.Close()
	c.c = nil
	return err
}
