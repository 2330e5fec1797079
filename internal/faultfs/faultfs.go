// Package faultfs mounts, for tests, a FUSE file system whose files fail
// to read with a real I/O error: it stands in for a failing disk under a
// cache entry (a symlink to one of its files opens and stats as a regular
// file of the expected size, and every read of it returns EIO).
package faultfs

import (
	"context"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// eioFile is a regular file of a given size whose reads fail with EIO.
type eioFile struct {
	fs.Inode
	size uint64
}

var (
	_ fs.NodeGetattrer = (*eioFile)(nil)
	_ fs.NodeOpener    = (*eioFile)(nil)
	_ fs.NodeReader    = (*eioFile)(nil)
)

func (f *eioFile) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o644
	out.Size = f.size
	return 0
}

func (f *eioFile) Open(context.Context, uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (f *eioFile) Read(context.Context, fs.FileHandle, []byte, int64) (fuse.ReadResult, syscall.Errno) {
	return nil, syscall.EIO
}

// EIOFile mounts a file system holding one file of size bytes whose every
// read fails with EIO, and returns the file's path. The mount is removed
// when the test ends.
func EIOFile(t testing.TB, size int64) string {
	t.Helper()
	dir := t.TempDir()
	root := &fs.Inode{}
	server, err := fs.Mount(dir, root, &fs.Options{
		OnAdd: func(ctx context.Context) {
			ch := root.NewPersistentInode(ctx, &eioFile{size: uint64(size)}, fs.StableAttr{Mode: syscall.S_IFREG})
			root.AddChild("eio", ch, false)
		},
		MountOptions: fuse.MountOptions{FsName: "lazypull-faultfs", DisableXAttrs: true},
	})
	if err != nil {
		t.Fatalf("mounting the EIO file system: %v", err)
	}
	t.Cleanup(func() {
		if err := server.Unmount(); err != nil {
			t.Errorf("unmounting the EIO file system: %v", err)
		}
	})
	return dir + "/eio"
}
