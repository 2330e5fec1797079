// Package cri is a CRI image-service proxy for Kubernetes nodes. kubelet's
// image endpoint (--image-service-endpoint, imageServiceEndpoint in
// KubeletConfiguration) points at the proxy's socket; the proxy forwards
// every gRPC call, unchanged, to containerd's CRI socket, and on
// runtime.v1.ImageService/PullImage keeps the request's AuthConfig in a
// keychain.Captured store, keyed by image repository and registry host,
// before forwarding it. The lazy reads of that image's layers then use the
// credentials kubelet had for it (imagePullSecrets, kubelet's own
// credential providers), which lazypull would otherwise never see.
//
// Forwarding is at the gRPC frame level: messages other than PullImage
// requests are not decoded, so every method of the image service
// (including ones newer than this package, such as StreamImages) and any
// other service on the socket keep working, with containerd's status codes
// and metadata passed through.
//
// Credentials are held in memory only; nothing here logs them or writes
// them anywhere.
package cri

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/lazypull/lazypull/keychain"
)

// PullImageMethod is the full gRPC method name of CRI's PullImage.
const PullImageMethod = "/runtime.v1.ImageService/PullImage"

// maxMessage is the largest gRPC message forwarded (ListImages answers
// on nodes with many images are large; containerd allows 16 MiB).
const maxMessage = 16 << 20

// Options configures a [Proxy].
type Options struct {
	// Containerd is containerd's CRI socket, e.g.
	// "/run/containerd/containerd.sock" (a unix path, or a gRPC target
	// such as "unix:///run/containerd/containerd.sock").
	Containerd string
	// Captured receives the credentials of PullImage requests. Required.
	Captured *keychain.Captured
}

// Proxy forwards CRI calls to containerd and captures pull credentials.
type Proxy struct {
	conn     *grpc.ClientConn
	captured *keychain.Captured
	server   *grpc.Server

	mu   sync.Mutex
	sock string // socket created by ListenAndServe, removed by Close
}

// New returns a Proxy connected (lazily) to containerd.
func New(opts Options) (*Proxy, error) {
	if opts.Captured == nil {
		return nil, errors.New("cri proxy: no credential store")
	}
	target := opts.Containerd
	if target == "" {
		return nil, errors.New("cri proxy: no containerd socket configured")
	}
	if strings.HasPrefix(target, "/") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
	)
	if err != nil {
		return nil, fmt.Errorf("cri proxy: containerd at %s: %w", opts.Containerd, err)
	}
	p := &Proxy{conn: conn, captured: opts.Captured}
	p.server = grpc.NewServer(
		grpc.ForceServerCodec(rawCodec{}),
		grpc.UnknownServiceHandler(p.forward),
		grpc.MaxRecvMsgSize(maxMessage),
		grpc.MaxSendMsgSize(maxMessage),
	)
	return p, nil
}

// Serve serves CRI on l until Close.
func (p *Proxy) Serve(l net.Listener) error {
	return p.server.Serve(l)
}

// ListenAndServe creates the unix socket path (replacing a stale one,
// mode 0660) and serves on it until Close, which removes it.
func (p *Proxy) ListenAndServe(path string) error {
	l, err := Listen(path)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.sock = path
	p.mu.Unlock()
	return p.Serve(l)
}

// Listen creates a unix socket at path for [Proxy.Serve], replacing a
// stale socket left by a crash (but not another kind of file).
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("cri proxy: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("cri proxy: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("cri proxy: remove stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("cri proxy: listen: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("cri proxy: %w", err)
	}
	return l, nil
}

// Close stops serving (waiting for calls in flight, which containerd
// bounds), closes the connection to containerd and removes the socket
// ListenAndServe created.
func (p *Proxy) Close() error {
	p.server.GracefulStop()
	err := p.conn.Close()
	p.mu.Lock()
	sock := p.sock
	p.mu.Unlock()
	if sock != "" {
		if rerr := os.Remove(sock); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

// Stop stops serving at once, cancelling calls in flight, for when Close
// takes too long; Close returns promptly after it.
func (p *Proxy) Stop() {
	p.server.Stop()
}

// forward relays one call, in both directions, to containerd.
func (p *Proxy) forward(_ any, ss grpc.ServerStream) (retErr error) {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "cri proxy: no method in stream")
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	md, _ := metadata.FromIncomingContext(ctx)
	outCtx := metadata.NewOutgoingContext(ctx, md.Copy())
	cs, err := p.conn.NewStream(outCtx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}

	// A failed pull puts back the credentials it displaced.
	var undo atomic.Pointer[func()]
	defer func() {
		if u := undo.Load(); u != nil && retErr != nil {
			(*u)()
		}
	}()

	// Client to containerd.
	upErr := make(chan error, 1)
	go func() {
		for {
			f := &frame{}
			if err := ss.RecvMsg(f); err != nil {
				if errors.Is(err, io.EOF) {
					upErr <- cs.CloseSend()
					return
				}
				upErr <- err
				return
			}
			if method == PullImageMethod {
				if u := p.capture(ctx, f.data); u != nil {
					undo.Store(&u)
				}
			}
			if err := cs.SendMsg(f); err != nil {
				// containerd's status comes from RecvMsg below.
				upErr <- nil
				return
			}
		}
	}()

	// Containerd to client.
	first := true
	for {
		f := &frame{}
		err := cs.RecvMsg(f)
		if first {
			first = false
			if h, herr := cs.Header(); herr == nil {
				if err := ss.SendHeader(h); err != nil && !errors.Is(err, io.EOF) {
					log.G(ctx).WithError(err).Debug("cri proxy: send header")
				}
			}
		}
		if errors.Is(err, io.EOF) {
			ss.SetTrailer(cs.Trailer())
			return nil
		}
		if err != nil {
			ss.SetTrailer(cs.Trailer())
			return err // containerd's status, as is
		}
		if err := ss.SendMsg(f); err != nil {
			return err
		}
		select {
		case err := <-upErr:
			if err != nil {
				return status.Errorf(codes.Canceled, "cri proxy: client stream: %v", err)
			}
			upErr = nil // closed send side; keep relaying answers
		default:
		}
	}
}

// capture stores the credentials of a PullImage request and returns the
// function putting back what they replaced (nil when nothing was stored).
// A request that does not decode is forwarded anyway (containerd will
// answer it); nothing about its content is logged.
func (p *Proxy) capture(ctx context.Context, raw []byte) func() {
	var req runtimeapi.PullImageRequest
	if err := proto.Unmarshal(raw, &req); err != nil || req.GetImage().GetImage() == "" {
		log.G(ctx).Debug("cri proxy: PullImage request without a decodable image; not capturing credentials")
		return nil
	}
	image := req.GetImage().GetImage()
	a := req.GetAuth()
	undo, err := p.captured.Swap(image, keychain.AuthConfig{
		Username:      a.GetUsername(),
		Password:      a.GetPassword(),
		Auth:          a.GetAuth(),
		ServerAddress: a.GetServerAddress(),
		IdentityToken: a.GetIdentityToken(),
		RegistryToken: a.GetRegistryToken(),
	})
	if err != nil {
		// The error names the image and what is wrong, never the secret.
		log.G(ctx).WithError(err).Warn("cri proxy: credentials of a pull not captured")
		return nil
	}
	log.G(ctx).WithField("image", image).WithField("credentials", a != nil).Debug("cri proxy: pull")
	return undo
}

// frame is one gRPC message, undecoded.
type frame struct{ data []byte }

// rawCodec passes message bytes through untouched.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	f, ok := v.(*frame)
	if !ok {
		return nil, fmt.Errorf("cri proxy: cannot marshal %T", v)
	}
	return f.data, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	f, ok := v.(*frame)
	if !ok {
		return fmt.Errorf("cri proxy: cannot unmarshal into %T", v)
	}
	f.data = append(f.data[:0], data...)
	return nil
}

// Name is "proto": the frames are protobuf, and clients send
// application/grpc+proto or plain application/grpc.
func (rawCodec) Name() string { return "proto" }
