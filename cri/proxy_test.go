package cri

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/lazypull/lazypull/keychain"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// containerdBinary is containerd 2.x as hack/install-deps.sh installs it.
func containerdBinary() string {
	dir := os.Getenv("LAZYPULL_TOOLS")
	if dir == "" {
		dir = "/usr/local/lib/lazypull-tools"
	}
	return filepath.Join(dir, "bin", "containerd")
}

// criContainerd is a containerd 2.x daemon with its CRI plugin, owned by
// a test.
type criContainerd struct {
	socket string
	log    string
}

// startCRIContainerd starts containerd 2.x with CRI, its registry hosts
// taken from hostsDir. Pulls over plain HTTP need a hosts.toml there.
func startCRIContainerd(t *testing.T, hostsDir string) *criContainerd {
	t.Helper()
	bin := containerdBinary()
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("containerd 2.x: %v (run hack/install-deps.sh as root)", err)
	}
	dir, err := os.MkdirTemp("/tmp", "lp-cri-")
	if err != nil {
		t.Fatal(err)
	}
	c := &criContainerd{socket: filepath.Join(dir, "c.sock"), log: filepath.Join(dir, "containerd.log")}
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	cfg := strings.Join([]string{
		"version = 3",
		"root = " + q(filepath.Join(dir, "root")),
		"state = " + q(filepath.Join(dir, "state")),
		"temp = " + q(filepath.Join(dir, "tmp")),
		`disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs", "io.containerd.mount-handler.v1.erofs", "io.containerd.nri.v1.nri"]`,
		`required_plugins = ["io.containerd.grpc.v1.cri"]`,
		"[grpc]\n  address = " + q(c.socket),
		"[ttrpc]\n  address = " + q(c.socket+".ttrpc"),
		"[debug]\n  address = \"\"",
		"[metrics]\n  address = \"\"",
		"[plugins]",
		"  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = " + q(filepath.Join(dir, "opt")),
		"  [plugins.\"io.containerd.shim.v1.manager\"]\n    socket_dir = " + q(filepath.Join(dir, "s")),
		"  [plugins.\"io.containerd.cri.v1.runtime\"]\n    restrict_oom_score_adj = true",
		"  [plugins.\"io.containerd.cri.v1.runtime\".cni]\n    conf_dir = " + q(filepath.Join(dir, "cni")) + "\n    bin_dirs = [" + q(filepath.Join(dir, "cni-bin")) + "]",
		"  [plugins.\"io.containerd.cri.v1.images\".registry]\n    config_path = " + q(hostsDir),
		"",
	}, "\n")
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(c.log)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfgPath, "--log-level", "debug")
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(c.log)
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("containerd log (tail):\n%s", b)
		}
		exec.Command("umount", "-R", filepath.Join(dir, "root")).Run()
		os.RemoveAll(dir)
	})
	// Wait until CRI answers.
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-done:
			b, _ := os.ReadFile(c.log)
			t.Fatalf("containerd exited during start-up:\n%s", b)
		default:
		}
		if _, err := os.Stat(c.socket); err == nil {
			conn := dial(t, c.socket)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err := runtimeapi.NewRuntimeServiceClient(conn).Version(ctx, &runtimeapi.VersionRequest{})
			cancel()
			conn.Close()
			if err == nil {
				return c
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(c.log)
			t.Fatalf("containerd CRI not ready:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func dial(t *testing.T, sock string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// tarGz is a gzip-compressed tar holding one file, and its diff ID.
func tarGz(t *testing.T, name, content string) ([]byte, digest.Digest) {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg})
	tw.Write([]byte(content))
	tw.Close()
	var gb bytes.Buffer
	gw := gzip.NewWriter(&gb)
	gw.Write(tb.Bytes())
	gw.Close()
	return gb.Bytes(), digest.FromBytes(tb.Bytes())
}

// hostsDir writes a hosts.toml making containerd use plain HTTP for reg.
func hostsDir(t *testing.T, reg *remotetest.Registry) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, reg.Host()), 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.URL(), reg.URL())
	if err := os.WriteFile(filepath.Join(dir, reg.Host(), "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// logCapture collects everything logged through containerd/log.
type logCapture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logCapture) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logCapture) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func TestProxyAgainstContainerdCRI(t *testing.T) {
	const password = "pw-7f3c9a-secret"
	reg := remotetest.NewRegistry(t, remotetest.WithBasicAuth("alice", password))
	layer, diffID := tarGz(t, "hello.txt", "hello from a private image\n")
	img := reg.PushImage(t, "private/app", "v1", remotetest.Layer{Data: layer, DiffID: diffID})
	other := reg.PushImage(t, "private/other", "v1", remotetest.Layer{Data: layer, DiffID: diffID})

	ctd := startCRIContainerd(t, hostsDir(t, reg))

	logs := &logCapture{}
	logger := logrus.New()
	logger.SetOutput(logs)
	logger.SetLevel(logrus.DebugLevel)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(logger))

	captured := keychain.NewCaptured()
	p, err := New(Options{Containerd: ctd.socket, Captured: captured})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "cri.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	p.server = grpc.NewServer(
		grpc.ForceServerCodec(rawCodec{}),
		grpc.UnknownServiceHandler(p.forward),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			return h(srv, &ctxStream{ServerStream: ss, ctx: log.WithLogger(ss.Context(), log.G(ctx))})
		}),
	)
	go p.Serve(l)
	t.Cleanup(func() { p.Close() })

	conn := dial(t, sock)
	defer conn.Close()
	images := runtimeapi.NewImageServiceClient(conn)
	cctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Without credentials: containerd's own error, code and all.
	_, err = images.PullImage(cctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err == nil {
		t.Fatal("pull of a private image without credentials succeeded")
	}
	if !strings.Contains(err.Error(), "authorization") {
		t.Fatalf("pull without credentials: %v", err)
	}
	if captured.Len() != 0 {
		t.Fatal("anonymous pull captured something")
	}

	// With credentials: the pull works and they are captured.
	resp, err := images.PullImage(cctx, &runtimeapi.PullImageRequest{
		Image: &runtimeapi.ImageSpec{Image: img.Ref},
		Auth:  &runtimeapi.AuthConfig{Username: "alice", Password: password},
	})
	if err != nil {
		t.Fatalf("pull with credentials: %v", err)
	}
	if !strings.HasPrefix(resp.ImageRef, "sha256:") {
		t.Fatalf("image ref %q", resp.ImageRef)
	}
	got, ok, err := captured.Lookup(cctx, reg.Host()+"/private/app", reg.Host())
	if err != nil || !ok || got != (remote.Credential{Username: "alice", Secret: password}) {
		t.Fatalf("captured %v %v %v", got, ok, err)
	}

	// A pull with a wrong password fails and leaves the working
	// credentials in place.
	if _, err := images.PullImage(cctx, &runtimeapi.PullImageRequest{
		Image: &runtimeapi.ImageSpec{Image: img.Ref},
		Auth:  &runtimeapi.AuthConfig{Username: "alice", Password: "wrong"},
	}); err == nil {
		t.Fatal("pull with a wrong password succeeded")
	}
	got, ok, err = captured.Lookup(cctx, reg.Host()+"/private/app", reg.Host())
	if err != nil || !ok || got.Secret != password {
		t.Fatalf("after a failed pull, captured %v %v %v", got, ok, err)
	}

	// The captured credentials work for lazy reads of the image's layers.
	r, err := remote.New(remote.Options{HostsDir: t.TempDir(), PlainHTTP: true, Keychain: keychain.New(captured)})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := r.OpenBlob(cctx, img.Ref, img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if _, err := blob.ReadAt(cctx, buf, 0); err != nil || !bytes.Equal(buf, layer[:10]) {
		t.Fatalf("lazy read with captured credentials: %v", err)
	}

	// A later pull (of another image of the registry, given as auth)
	// refreshes the host's entry.
	if _, err := images.PullImage(cctx, &runtimeapi.PullImageRequest{
		Image: &runtimeapi.ImageSpec{Image: other.Ref},
		Auth:  &runtimeapi.AuthConfig{Auth: base64.StdEncoding.EncodeToString([]byte("alice:" + password))},
	}); err != nil {
		t.Fatalf("pull with auth: %v", err)
	}
	if captured.Len() != 2 {
		t.Fatalf("%d repositories captured, want 2", captured.Len())
	}

	// Everything else is forwarded: image status, list, fs info, remove,
	// and other services on the socket.
	st, err := images.ImageStatus(cctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil || st.Image == nil || st.Image.Id != resp.ImageRef {
		t.Fatalf("image status: %v %v", st, err)
	}
	list, err := images.ListImages(cctx, &runtimeapi.ListImagesRequest{})
	if err != nil || len(list.Images) == 0 {
		t.Fatalf("list: %v %v", list, err)
	}
	fsinfo, err := images.ImageFsInfo(cctx, &runtimeapi.ImageFsInfoRequest{})
	if err != nil || len(fsinfo.ImageFilesystems) == 0 {
		t.Fatalf("imagefsinfo: %v %v", fsinfo, err)
	}
	if _, err := images.RemoveImage(cctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}}); err != nil {
		t.Fatalf("remove: %v", err)
	}
	st, err = images.ImageStatus(cctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: img.Ref}})
	if err != nil || st.Image != nil {
		t.Fatalf("status after remove: %v %v", st, err)
	}
	v, err := runtimeapi.NewRuntimeServiceClient(conn).Version(cctx, &runtimeapi.VersionRequest{})
	if err != nil || v.RuntimeName != "containerd" {
		t.Fatalf("runtime version through the proxy: %v %v", v, err)
	}
	// An unknown method: containerd's Unimplemented comes back.
	err = conn.Invoke(cctx, "/runtime.v1.ImageService/NoSuchMethod", &runtimeapi.VersionRequest{}, &runtimeapi.VersionResponse{})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("unknown method: %v", err)
	}

	// The password is in no log line, ours or containerd's.
	ctdLog, _ := os.ReadFile(ctd.log)
	for name, text := range map[string]string{"proxy": logs.String(), "containerd": string(ctdLog)} {
		if strings.Contains(text, password) {
			t.Errorf("the password appears in the %s log", name)
		}
	}
	if !strings.Contains(logs.String(), "cri proxy: pull") {
		t.Errorf("proxy log has no pull line:\n%s", logs.String())
	}
}

// ctxStream replaces a server stream's context (to give the handler the
// test's logger).
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }
