package fusemanager

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/rpc"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// ServerOptions configure Serve.
type ServerOptions struct {
	// Version is reported to clients (the binary's version).
	Version string
	// Shutdown is called by a client's Shutdown: it must unmount every
	// layer. Serve returns after it.
	Shutdown func(ctx context.Context) error
	// Failures holds the layers the manager failed, for Failures calls;
	// nil means none are reported.
	Failures *FailureLog
	// Metrics is what Metrics calls answer with; nil means no metrics.
	Metrics prometheus.Gatherer
	// Fetches, if set, returns the manager's log of registry requests as
	// JSON, for Fetches calls; nil means the manager keeps none.
	Fetches func() ([]byte, error)
}

// maxFailuresWait bounds how long a Failures call waits for a failure.
const maxFailuresWait = time.Minute

// rpcServer is the net/rpc receiver.
type rpcServer struct {
	ctx     context.Context
	backend Backend
	opts    ServerOptions

	mu    sync.Mutex
	locks map[string]*sync.Mutex // per mountpoint

	shutdownOnce sync.Once
	shutdown     chan struct{}
}

// connServer is the net/rpc receiver of one client connection: the
// server's methods, plus those that must know when their client hangs up.
type connServer struct {
	*rpcServer
	// gone is closed when the client hangs up (a read fails): net/rpc
	// keeps a connection (its descriptor, its goroutines) until its calls
	// are answered, and a daemon that was killed never reads the answer
	// of a Failures call waiting for a failure.
	gone chan struct{}
}

// watchedConn closes gone when a read fails.
type watchedConn struct {
	net.Conn
	once sync.Once
	gone chan struct{}
}

func (c *watchedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.once.Do(func() { close(c.gone) })
	}
	return n, err
}

// Serve answers clients on l until ctx is done or a client asks for
// Shutdown (after which it returns nil). It closes l.
func Serve(ctx context.Context, l net.Listener, backend Backend, opts ServerOptions) error {
	if opts.Failures == nil {
		opts.Failures = NewFailureLog()
	}
	s := &rpcServer{ctx: ctx, backend: backend, opts: opts, locks: map[string]*sync.Mutex{}, shutdown: make(chan struct{})}
	// One net/rpc server per connection, so that a method can tell that
	// its client hung up (connServer).
	newServer := func(gone chan struct{}) (*rpc.Server, error) {
		srv := rpc.NewServer()
		if err := srv.RegisterName(serviceName, &connServer{rpcServer: s, gone: gone}); err != nil {
			return nil, fmt.Errorf("registering the fuse manager service: %w", err)
		}
		return srv, nil
	}
	if _, err := newServer(nil); err != nil {
		return err
	}
	var wg sync.WaitGroup
	conns := map[net.Conn]bool{}
	var connsMu sync.Mutex
	acceptErr := make(chan error, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			connsMu.Lock()
			conns[c] = true
			connsMu.Unlock()
			wg.Go(func() {
				gone := make(chan struct{})
				srv, err := newServer(gone)
				if err != nil {
					c.Close()
					return
				}
				srv.ServeConn(&watchedConn{Conn: c, gone: gone})
				connsMu.Lock()
				delete(conns, c)
				connsMu.Unlock()
			})
		}
	}()
	var err error
	select {
	case <-ctx.Done():
	case <-s.shutdown:
	case err = <-acceptErr:
		err = fmt.Errorf("accepting fuse manager clients: %w", err)
	}
	l.Close()
	// The Shutdown reply is sent after its method returned: give the
	// clients a moment to read it and hang up before cutting them off.
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(shutdownGrace):
	}
	connsMu.Lock()
	for c := range conns {
		c.Close()
	}
	connsMu.Unlock()
	<-finished
	return err
}

// shutdownGrace is how long Serve waits for clients to hang up once it
// stops.
const shutdownGrace = 2 * time.Second

func (s *rpcServer) lock(mountpoint string) func() {
	s.mu.Lock()
	m := s.locks[mountpoint]
	if m == nil {
		m = &sync.Mutex{}
		s.locks[mountpoint] = m
	}
	s.mu.Unlock()
	m.Lock()
	return m.Unlock
}

// Hello identifies the manager.
func (s *rpcServer) Hello(_ Empty, reply *HelloReply) error {
	*reply = HelloReply{Protocol: Protocol, Version: s.opts.Version, Pid: os.Getpid(), Goroutines: runtime.NumGoroutine()}
	return nil
}

// Mount mounts a layer; a healthy mount already there is kept (a daemon
// that restarted asks again for every layer it knows).
func (s *rpcServer) Mount(a MountArgs, reply *Result) error {
	defer s.lock(a.Mountpoint)()
	ctx := s.ctx
	for _, mp := range s.backend.Mountpoints() {
		if mp != a.Mountpoint {
			continue
		}
		err := s.backend.Check(ctx, a.Mountpoint, a.Labels)
		if err == nil {
			*reply = Result{}
			return nil
		}
		log.G(ctx).WithError(err).WithField("mountpoint", a.Mountpoint).Warn("layer mount unhealthy; mounting it again")
		if err := s.backend.Unmount(ctx, a.Mountpoint); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", a.Mountpoint).Warn("unmounting unhealthy layer")
		}
	}
	s.opts.Failures.Drop(a.Mountpoint)
	*reply = toResult(s.backend.Mount(ctx, a.Mountpoint, a.Labels))
	return nil
}

// Check checks a layer mount.
func (s *rpcServer) Check(a MountArgs, reply *Result) error {
	*reply = toResult(s.backend.Check(s.ctx, a.Mountpoint, a.Labels))
	return nil
}

// Unmount unmounts a layer.
func (s *rpcServer) Unmount(a MountArgs, reply *Result) error {
	defer s.lock(a.Mountpoint)()
	err := s.backend.Unmount(s.ctx, a.Mountpoint)
	if err == nil || errdefs.IsNotFound(err) {
		s.opts.Failures.Drop(a.Mountpoint)
	}
	*reply = toResult(err)
	return nil
}

// Failures answers with the failures numbered above a.After, waiting up
// to a.Wait (at most maxFailuresWait) for one.
func (s *connServer) Failures(a FailuresArgs, reply *FailuresReply) error {
	reply.Pid = os.Getpid()
	timer := time.NewTimer(min(max(a.Wait, 0), maxFailuresWait))
	defer timer.Stop()
	for {
		fs, changed := s.opts.Failures.after(a.After)
		if len(fs) > 0 {
			reply.Failures = fs
			return nil
		}
		select {
		case <-changed:
		case <-timer.C:
			return nil
		case <-s.gone:
			return nil
		case <-s.shutdown:
			return nil
		case <-s.ctx.Done():
			return nil
		}
	}
}

// Metrics answers with the manager's metrics.
func (s *rpcServer) Metrics(_ Empty, reply *MetricsReply) error {
	if s.opts.Metrics == nil {
		return nil
	}
	mfs, err := s.opts.Metrics.Gather()
	if err != nil {
		// What could be gathered is still worth answering with.
		log.G(s.ctx).WithError(err).Warn("gathering the fuse manager's metrics")
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeProtoDelim))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			return fmt.Errorf("encoding metric family %s: %w", mf.GetName(), err)
		}
	}
	reply.Families = buf.Bytes()
	return nil
}

// Fetches answers with the manager's fetch log.
func (s *rpcServer) Fetches(_ Empty, reply *FetchesReply) error {
	if s.opts.Fetches == nil {
		return nil
	}
	b, err := s.opts.Fetches()
	if err != nil {
		return fmt.Errorf("encoding the fetch log: %w", err)
	}
	*reply = FetchesReply{Kept: true, JSON: b}
	return nil
}

// LayerSize sizes a mounted layer.
func (s *rpcServer) LayerSize(a MountArgs, reply *SizeReply) error {
	reply.Size, reply.OK = s.backend.LayerSize(a.Mountpoint)
	return nil
}

// List lists the mountpoints served.
func (s *rpcServer) List(_ Empty, reply *ListReply) error {
	reply.Mountpoints = s.backend.Mountpoints()
	return nil
}

// Shutdown unmounts every layer and stops the manager.
func (s *rpcServer) Shutdown(_ Empty, reply *Result) error {
	var err error
	s.shutdownOnce.Do(func() {
		if s.opts.Shutdown != nil {
			err = s.opts.Shutdown(s.ctx)
		} else {
			for _, mp := range s.backend.Mountpoints() {
				err = errors.Join(err, s.backend.Unmount(s.ctx, mp))
			}
		}
		close(s.shutdown)
	})
	*reply = toResult(err)
	return nil
}
