package fusemanager

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/rpc"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/lazypull/lazypull/keychain"
	"github.com/lazypull/lazypull/remote"
)

// credentialsService is the net/rpc name of the daemon's credential
// service.
const credentialsService = "Credentials"

// CredentialArgs names what credentials are for.
type CredentialArgs struct {
	Repo, Host string
}

// CredentialReply is a credential lookup's answer.
type CredentialReply struct {
	Username, Secret, RegistryToken string
	OK                              bool
	Result
}

type credentialServer struct {
	ctx context.Context
	src keychain.Source
}

// Lookup looks the credentials up in the daemon's source.
func (s *credentialServer) Lookup(a CredentialArgs, reply *CredentialReply) error {
	ctx, cancel := context.WithTimeout(s.ctx, time.Minute)
	defer cancel()
	cred, ok, err := s.src.Lookup(ctx, a.Repo, a.Host)
	*reply = CredentialReply{Username: cred.Username, Secret: cred.Secret, RegistryToken: cred.RegistryToken, OK: ok, Result: toResult(err)}
	return nil
}

// Forget makes the daemon's source forget what it cached.
func (s *credentialServer) Forget(a CredentialArgs, reply *Empty) error {
	s.src.Forget(a.Repo, a.Host)
	return nil
}

// ServeCredentials answers the fuse manager's credential lookups from src
// (the credentials the daemon captured from CRI pulls) on l until ctx is
// done; it closes l. The secrets cross the socket only: l must be a unix
// socket only root can reach.
func ServeCredentials(ctx context.Context, l net.Listener, src keychain.Source) error {
	srv := rpc.NewServer()
	if err := srv.RegisterName(credentialsService, &credentialServer{ctx: ctx, src: src}); err != nil {
		return fmt.Errorf("registering the credential service: %w", err)
	}
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	var wg sync.WaitGroup
	stopped := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-stopped:
		}
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	defer wg.Wait()
	defer close(stopped)
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accepting credential lookups: %w", err)
		}
		mu.Lock()
		conns[c] = true
		mu.Unlock()
		wg.Go(func() {
			srv.ServeConn(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		})
	}
}

// CredentialSource is a keychain.Source that asks the daemon's credential
// service (ServeCredentials) at a unix socket: the fuse manager, which
// fetches, reads with the credentials the daemon captured. While the
// daemon is away (a restart) a lookup waits for it up to a few seconds,
// then fails with errdefs.ErrUnavailable. Safe for concurrent use.
type CredentialSource struct {
	addr string
	// wait bounds how long a lookup waits for the daemon.
	wait time.Duration

	mu sync.Mutex
	c  *rpc.Client
}

var _ keychain.Source = (*CredentialSource)(nil)

// NewCredentialSource returns a source asking the daemon at addr.
func NewCredentialSource(addr string) *CredentialSource {
	return &CredentialSource{addr: addr, wait: 5 * time.Second}
}

func (s *CredentialSource) conn(ctx context.Context) (*rpc.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c != nil {
		return s.c, nil
	}
	deadline := time.Now().Add(s.wait)
	for {
		nc, err := dial(ctx, s.addr)
		if err == nil {
			s.c = rpc.NewClient(nc)
			return s.c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the daemon's credential service: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (s *CredentialSource) call(ctx context.Context, method string, args, reply any) error {
	for attempt := 1; ; attempt++ {
		rc, err := s.conn(ctx)
		if err != nil {
			return err
		}
		err = wait(ctx, rc, credentialsService+"."+method, args, reply)
		if err == nil {
			return nil
		}
		var se rpc.ServerError
		if errors.As(err, &se) || ctx.Err() != nil {
			return fmt.Errorf("credential lookup: %w", err)
		}
		// The connection broke: the daemon restarted.
		s.mu.Lock()
		if s.c == rc {
			s.c = nil
		}
		s.mu.Unlock()
		rc.Close()
		if attempt >= 2 {
			return fmt.Errorf("credential lookup: %w: %w", err, errdefs.ErrUnavailable)
		}
	}
}

// Lookup implements keychain.Source.
func (s *CredentialSource) Lookup(ctx context.Context, repo, host string) (remote.Credential, bool, error) {
	var r CredentialReply
	if err := s.call(ctx, "Lookup", CredentialArgs{Repo: repo, Host: host}, &r); err != nil {
		return remote.Credential{}, false, err
	}
	if err := r.Result.err(); err != nil {
		return remote.Credential{}, false, err
	}
	return remote.Credential{Username: r.Username, Secret: r.Secret, RegistryToken: r.RegistryToken}, r.OK, nil
}

// Forget implements keychain.Source: the daemon's source forgets what it
// cached (best effort: a daemon that is away has nothing cached anyway).
func (s *CredentialSource) Forget(repo, host string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.call(ctx, "Forget", CredentialArgs{Repo: repo, Host: host}, &Empty{}); err != nil {
		log.G(ctx).WithError(err).Debug("asking the daemon to forget credentials")
	}
}

// Close closes the connection to the daemon.
func (s *CredentialSource) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.c == nil {
		return nil
	}
	err := s.c.Close()
	s.c = nil
	return err
}
