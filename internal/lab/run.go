package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/image-spec/identity"

	"github.com/lazypull/lazypull/internal/fixture"
)

// DefaultSnapshotter is containerd's built-in overlayfs snapshotter.
const DefaultSnapshotter = "overlayfs"

// Pull pulls ref from a plain-HTTP registry on 127.0.0.1 and unpacks it
// into snapshotter, passing the layers' remote-snapshot labels to it
// (snapshotters.AppendInfoHandlerWrapper, as CRI does), so a remote
// snapshotter can serve layers without containerd fetching them.
func (c *Containerd) Pull(ctx context.Context, ref, snapshotter string, opts ...client.RemoteOpt) (client.Image, error) {
	if snapshotter == "" {
		snapshotter = DefaultSnapshotter
	}
	all := append([]client.RemoteOpt{
		client.WithResolver(Resolver()),
		client.WithPullUnpack,
		client.WithPullSnapshotter(snapshotter),
		client.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	}, opts...)
	img, err := c.client.Pull(ctx, ref, all...)
	if err != nil {
		return nil, fmt.Errorf("pull %s with %s: %w", ref, snapshotter, err)
	}
	return img, nil
}

// RunOptions describes a container for Run.
type RunOptions struct {
	// ID names the container; default a unique "run-N".
	ID string
	// Snapshotter prepares the rootfs; default overlayfs.
	Snapshotter string
	// Args replaces the image's command.
	Args []string
	// Env adds variables to the image's.
	Env []string
	// Stdin, if set, is the process's standard input.
	Stdin io.Reader
	// SpecOpts are applied after the image config, Args and Env.
	SpecOpts []oci.SpecOpts
	// Timeout bounds the run; the task is killed when it expires.
	// Default 60s.
	Timeout time.Duration
}

// RunResult is what a container did.
type RunResult struct {
	Stdout, Stderr string
	ExitCode       uint32
}

// String formats the result for test failures.
func (r *RunResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.ExitCode, r.Stdout, r.Stderr)
}

var runSeq atomic.Int64

// RuntimeOpt makes a container run under io.containerd.runc.v2 with its
// runc state in RuncRoot, not in the machine's /run/containerd/runc.
func (c *Containerd) RuntimeOpt() client.NewContainerOpts {
	return client.WithRuntime("io.containerd.runc.v2", &runcoptions.Options{Root: c.RuncRoot()})
}

// IO returns a creator for a task's stdio, with its FIFOs in FIFODir.
func (c *Containerd) IO(stdin io.Reader, stdout, stderr io.Writer) cio.Creator {
	return cio.NewCreator(cio.WithStreams(stdin, stdout, stderr), cio.WithFIFODir(c.FIFODir()))
}

// Run runs a container from img to completion and removes it with its
// snapshot. A non-zero exit is a result, not an error.
func (c *Containerd) Run(ctx context.Context, img client.Image, o RunOptions) (*RunResult, error) {
	if o.ID == "" {
		o.ID = fmt.Sprintf("run-%d", runSeq.Add(1))
	}
	if o.Snapshotter == "" {
		o.Snapshotter = DefaultSnapshotter
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()

	specOpts := []oci.SpecOpts{oci.WithImageConfig(img), c.WithCgroup()}
	if len(o.Args) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(o.Args...))
	}
	if len(o.Env) > 0 {
		specOpts = append(specOpts, oci.WithEnv(o.Env))
	}
	specOpts = append(specOpts, o.SpecOpts...)
	ctr, err := c.client.NewContainer(ctx, o.ID,
		client.WithImage(img),
		client.WithSnapshotter(o.Snapshotter),
		client.WithNewSnapshot(o.ID+"-rootfs", img),
		c.RuntimeOpt(),
		client.WithNewSpec(specOpts...),
	)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	defer func() {
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer dcancel()
		ctr.Delete(dctx, client.WithSnapshotCleanup)
	}()

	var stdout, stderr syncBuffer
	task, err := ctr.NewTask(ctx, c.IO(o.Stdin, &stdout, &stderr))
	if err != nil {
		return nil, fmt.Errorf("create task %s: %w", o.ID, err)
	}
	statusC, err := task.Wait(ctx)
	if err != nil {
		task.Delete(context.WithoutCancel(ctx), client.WithProcessKill)
		return nil, fmt.Errorf("wait task %s: %w", o.ID, err)
	}
	if err := task.Start(ctx); err != nil {
		task.Delete(context.WithoutCancel(ctx), client.WithProcessKill)
		return nil, fmt.Errorf("start task %s: %w", o.ID, err)
	}
	var status client.ExitStatus
	select {
	case status = <-statusC:
	case <-ctx.Done():
		kctx := context.WithoutCancel(ctx)
		task.Kill(kctx, syscall.SIGKILL, client.WithKillAll)
		task.Delete(kctx, client.WithProcessKill)
		return nil, fmt.Errorf("task %s: %w; stdout so far:\n%s\nstderr so far:\n%s", o.ID, ctx.Err(), stdout.String(), stderr.String())
	}
	// Delete waits for the stdio copies to finish.
	if _, err := task.Delete(context.WithoutCancel(ctx)); err != nil && !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("delete task %s: %w", o.ID, err)
	}
	code, _, err := status.Result()
	if err != nil {
		return nil, fmt.Errorf("task %s: %w", o.ID, err)
	}
	return &RunResult{Stdout: stdout.String(), Stderr: stderr.String(), ExitCode: code}, nil
}

// syncBuffer is a bytes.Buffer safe for the stdio copier and a reader.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// MountImage mounts a read-only view of img's rootfs, as snapshotter has
// it, at target (which must exist). The returned function unmounts it and
// removes the view.
func (c *Containerd) MountImage(ctx context.Context, img client.Image, snapshotter, target string) (unmount func() error, retErr error) {
	if snapshotter == "" {
		snapshotter = DefaultSnapshotter
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return nil, err
	}
	chainID := identity.ChainID(diffIDs).String()
	// A lease keeps the view from the garbage collector while it exists.
	ctx, done, err := c.client.WithLease(ctx)
	if err != nil {
		return nil, err
	}
	sn := c.client.SnapshotService(snapshotter)
	key := fmt.Sprintf("lab-view-%d-%d", os.Getpid(), runSeq.Add(1))
	mounts, err := sn.View(ctx, key, chainID, snapshots.WithLabels(map[string]string{"lazypull.test/view": "true"}))
	if err != nil {
		done(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("view %s of %s in %s: %w", key, chainID, snapshotter, err)
	}
	cleanup := func() error {
		cctx := context.WithoutCancel(ctx)
		return errors.Join(sn.Remove(cctx, key), done(cctx))
	}
	if err := mount.All(mounts, target); err != nil {
		return nil, errors.Join(fmt.Errorf("mount %+v at %s: %w", mounts, target, err), cleanup())
	}
	return func() error {
		return errors.Join(mount.UnmountAll(target, 0), cleanup())
	}, nil
}

// ImageTree reads img's rootfs as snapshotter presents it, through a
// mounted read-only view. The root itself (the view's mount point) and
// overlayfs' own xattrs are left out: they are not part of the image.
func (c *Containerd) ImageTree(ctx context.Context, img client.Image, snapshotter string) (fixture.Tree, error) {
	dir, err := os.MkdirTemp(c.dir, "view-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(dir)
	unmount, err := c.MountImage(ctx, img, snapshotter, dir)
	if err != nil {
		return nil, err
	}
	t, err := fixture.Walk(dir, fixture.WalkOptions{HideOverlayXattrs: true})
	if err = errors.Join(err, unmount()); err != nil {
		return nil, fmt.Errorf("image tree: %w", err)
	}
	delete(t, ".")
	return t, nil
}

// WaitSnapshotter waits until the daemon reaches snapshotter, e.g. a proxy
// snapshotter that was just (re)started: containerd's gRPC connection to it
// backs off for up to seconds after a failure. It probes with a Prepare and
// Remove of an empty snapshot, since containerd answers Stat, Walk and
// Usage of unknown keys from its own metadata without asking the
// snapshotter.
func (c *Containerd) WaitSnapshotter(ctx context.Context, snapshotter string) error {
	return WaitSnapshotter(ctx, c.client, snapshotter)
}

// WaitSnapshotter is Containerd.WaitSnapshotter for any containerd client
// (ctx names the namespace).
func WaitSnapshotter(ctx context.Context, cl *client.Client, snapshotter string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ctx, done, err := cl.WithLease(ctx)
	if err != nil {
		return err
	}
	defer done(context.WithoutCancel(ctx))
	sn := cl.SnapshotService(snapshotter)
	for {
		key := fmt.Sprintf("lab-probe-%d-%d", os.Getpid(), runSeq.Add(1))
		_, err := sn.Prepare(ctx, key, "")
		if err == nil {
			return sn.Remove(ctx, key)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("snapshotter %s unreachable: %w", snapshotter, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
