package fs

import (
	"errors"
	"fmt"

	gofs "github.com/hanwen/go-fuse/v2/fs"
)

// ErrLayerFailed is returned (wrapped) by every read of a layer that was
// failed with Fail: the layer turned out not to be what its image commits
// to, and none of its bytes may be served any more.
var ErrLayerFailed = errors.New("layer failed verification")

// Fail makes every later read and open of the layer fail with an error
// wrapping ErrLayerFailed and cause. The first cause is kept.
func (l *Layer) Fail(cause error) {
	err := fmt.Errorf("%w: %w", ErrLayerFailed, cause)
	l.failure.CompareAndSwap(nil, &err)
}

// Err returns the error the layer was failed with, or nil.
func (l *Layer) Err() error {
	if p := l.failure.Load(); p != nil {
		return *p
	}
	return nil
}

// Fail fails the mounted layer (see Layer.Fail) and drops what the kernel
// cached of its files, so that no page read before the failure is served
// again. Handles already open for FUSE passthrough keep reading their
// backing cache file, which holds only chunks that matched their digests.
func (m *Mount) Fail(cause error) {
	m.layer.Fail(cause)
	var walk func(*gofs.Inode)
	walk = func(in *gofs.Inode) {
		if in.IsDir() {
			for _, c := range in.Children() {
				walk(c)
			}
			return
		}
		// ENOENT: the kernel has forgotten the inode already.
		_ = in.NotifyContent(0, 0)
	}
	walk(m.root.EmbeddedInode())
}
