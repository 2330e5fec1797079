package fs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// MountOptions tune Mount.
type MountOptions struct {
	// Passthrough lets the kernel read single-chunk files that are on
	// disk directly from the cache (Linux >= 6.9, root). Where the kernel
	// refuses, reads go through FUSE as usual.
	Passthrough bool
	// CacheTimeout is how long the kernel may cache entries and
	// attributes (default 24h: layers never change).
	CacheTimeout time.Duration
	// MaxRead is the largest read request (default 1 MiB).
	MaxRead int
	// MaxInflightBytes bounds the request buffers the mount holds for
	// requests being read from the kernel and served (default
	// DefaultMaxInflightBytes). Each request reserves MaxRead plus a page
	// whatever its size, so this also bounds the requests served at once;
	// further requests wait in the kernel. A READ's reply buffer is at most
	// its size, so the mount's in-flight request bytes stay under twice
	// this.
	MaxInflightBytes int
	// FsName is shown as the mount's source (default "lazypull").
	FsName string
	// Debug logs every FUSE request.
	Debug bool
	// UserXattr marks opaque directories with user.overlay.opaque instead
	// of trusted.overlay.opaque, for overlayfs mounted with userxattr
	// (unprivileged, in a user namespace).
	UserXattr bool
	// OnOp, when set, is called with the duration of every FUSE operation
	// the daemon serves ("lookup", "getattr", "open", "read", ...).
	OnOp func(op string, d time.Duration)
}

// FUSE bounds of a mount (see MountOptions).
const (
	// DefaultMaxInflightBytes is MountOptions.MaxInflightBytes's default:
	// about 31 requests of 1 MiB at once.
	DefaultMaxInflightBytes = 32 << 20
	// maxBackground is how many asynchronous requests (the kernel's
	// read-ahead of buffered reads) the kernel sends a mount at once; it
	// starts throttling them at 3/4 of it.
	maxBackground = 32
)

// Mount is a mounted layer.
type Mount struct {
	dir    string
	server *fuse.Server
	layer  *Layer
	root   *node
	// release returns the layer's share of the memory budget (set by
	// Manager.Mount); called once, by Unmount.
	release     func()
	releaseOnce sync.Once
}

// MountLayer mounts layer l read-only at dir and serves it until Unmount.
func MountLayer(dir string, l *Layer, o MountOptions) (*Mount, error) {
	if o.CacheTimeout <= 0 {
		o.CacheTimeout = 24 * time.Hour
	}
	if o.MaxRead <= 0 {
		o.MaxRead = 1 << 20
	}
	if o.FsName == "" {
		o.FsName = "lazypull"
	}
	if o.MaxInflightBytes <= 0 {
		o.MaxInflightBytes = DefaultMaxInflightBytes
	}
	lfs := &layerFS{layer: l, passthrough: o.Passthrough, opaqueXattr: opaqueXattr, onOp: o.OnOp}
	if o.UserXattr {
		lfs.opaqueXattr = userOpaqueXattr
	}
	root := &node{fs: lfs, n: l.index.Root()}
	timeout := o.CacheTimeout
	opts := &gofs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		RootStableAttr:  &gofs.StableAttr{Ino: l.index.Root().ID},
		NullPermissions: true,
		MountOptions: fuse.MountOptions{
			AllowOther: true,
			FsName:     o.FsName,
			Name:       "lazypull",
			// nosuid, nodev: an image's setuid files and device nodes
			// take effect in containers through the overlay stacked on
			// the layer, never on the host through this mount.
			Options:      []string{"ro", "default_permissions", "nosuid", "nodev"},
			DirectMount:  true,
			MaxWrite:     o.MaxRead,
			MaxReadAhead: o.MaxRead,
			// In-flight requests: bounded in bytes (go-fuse stops reading
			// requests from the kernel past it) and, for the kernel's
			// asynchronous read-ahead, in number.
			MaxInflightRequestBytes: o.MaxInflightBytes,
			MaxBackground:           maxBackground,
			Debug:                   o.Debug,
		},
	}
	server, err := gofs.Mount(dir, root, opts)
	if err != nil {
		return nil, fmt.Errorf("mounting layer %s at %s: %w", l.digest, dir, err)
	}
	return &Mount{dir: dir, server: server, layer: l, root: root}, nil
}

// Dir returns the mountpoint.
func (m *Mount) Dir() string { return m.dir }

// Layer returns the mounted layer.
func (m *Mount) Layer() *Layer { return m.layer }

// Unmount unmounts the layer (lazily if it is busy) and stops its
// background work.
func (m *Mount) Unmount() error {
	err := m.server.Unmount()
	if err != nil {
		// Busy (e.g. still an overlay lower): detach it.
		if derr := unix.Unmount(m.dir, unix.MNT_DETACH); derr == nil || errors.Is(derr, unix.EINVAL) {
			err = nil
		}
	}
	m.layer.Close()
	if m.release != nil {
		m.releaseOnce.Do(m.release)
	}
	if err != nil {
		return fmt.Errorf("unmounting %s: %w", m.dir, err)
	}
	return nil
}

// Wait blocks until the file system is unmounted.
func (m *Mount) Wait() { m.server.Wait() }

// Check reports whether the mount still answers.
func (m *Mount) Check(ctx context.Context) error {
	if err := m.layer.Err(); err != nil {
		return fmt.Errorf("layer mount %s: %w", m.dir, err)
	}
	// Unmounted from outside (umount -l): the directory still stats.
	if mounted, err := mountinfo.Mounted(m.dir); err == nil && !mounted {
		return fmt.Errorf("layer mount %s is not mounted any more", m.dir)
	}
	done := make(chan error, 1)
	go func() {
		_, err := os.Stat(m.dir)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("layer mount %s: %w", m.dir, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("layer mount %s does not answer: %w", m.dir, ctx.Err())
	}
}
