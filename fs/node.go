package fs

import (
	"context"
	"errors"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/whiteout"
)

const (
	whiteoutPrefix = whiteout.Prefix
	opaqueWhiteout = whiteout.Opaque
	// whiteoutInoBase keeps whiteout devices' inode numbers apart from
	// TOC nodes' (which count up from 1).
	whiteoutInoBase = 1 << 62
	blockSize       = 4096
)

// Directories holding ".wh..wh..opq" carry the opaque xattr overlayfs
// reads: the trusted one, or the user one when overlayfs is mounted with
// userxattr (in a user namespace). Only one is set: overlayfs hides its own
// trusted.overlay.* from containers but not user.overlay.* when it does not
// use it.
const (
	opaqueXattr     = whiteout.OpaqueXattr
	userOpaqueXattr = whiteout.UserOpaqueXattr
)

// node is a FUSE inode backed by a TOC node, or a whiteout device when
// whiteout is set.
type node struct {
	gofs.Inode
	fs       *layerFS
	n        *estargz.Node
	whiteout bool

	once sync.Once
	view *dirView

	// Open handles, by kind (see Open).
	omu         sync.Mutex
	cachedOpens int
	ptOpens     int
	ptFile      *os.File // the backing file while ptOpens > 0
}

// layerFS is what all nodes of one mount share.
type layerFS struct {
	onOp        func(op string, d time.Duration)
	layer       *Layer
	passthrough bool
	opaqueXattr string
	// refused is done when the kernel has turned passthrough down.
	refused sync.Once
}

// dirView is a directory as overlayfs must see it: whiteout files turned
// into devices, the opaque marker turned into an xattr.
type dirView struct {
	names   []string
	entries map[string]dirEntry
	opaque  bool
}

type dirEntry struct {
	n        *estargz.Node
	whiteout bool
}

var (
	_ gofs.NodeLookuper       = (*node)(nil)
	_ gofs.NodeReaddirer      = (*node)(nil)
	_ gofs.NodeGetattrer      = (*node)(nil)
	_ gofs.NodeOpener         = (*node)(nil)
	_ gofs.NodeReader         = (*node)(nil)
	_ gofs.NodeReadlinker     = (*node)(nil)
	_ gofs.NodeGetxattrer     = (*node)(nil)
	_ gofs.NodeFlusher        = (*node)(nil)
	_ gofs.NodeListxattrer    = (*node)(nil)
	_ gofs.NodeStatfser       = (*node)(nil)
	_ gofs.NodeOpendirHandler = (*node)(nil)
)

func (nd *node) dir() *dirView {
	nd.once.Do(func() {
		v := &dirView{entries: make(map[string]dirEntry, len(nd.n.Names()))}
		for _, name := range nd.n.Names() {
			c, _ := nd.n.Child(name)
			switch {
			case name == opaqueWhiteout:
				v.opaque = true
			case strings.HasPrefix(name, whiteoutPrefix):
				target := name[len(whiteoutPrefix):]
				if _, real := nd.n.Child(target); !real && target != "" && target != "." && target != ".." {
					v.entries[target] = dirEntry{n: c, whiteout: true}
				}
			default:
				v.entries[name] = dirEntry{n: c}
			}
		}
		v.names = make([]string, 0, len(v.entries))
		for name := range v.entries {
			v.names = append(v.names, name)
		}
		sort.Strings(v.names)
		nd.view = v
	})
	return nd.view
}

func (e dirEntry) mode() uint32 {
	if e.whiteout {
		return syscall.S_IFCHR
	}
	return typeBits(e.n.Type)
}

func (e dirEntry) ino() uint64 {
	if e.whiteout {
		return whiteoutInoBase + e.n.ID
	}
	return e.n.ID
}

func typeBits(t string) uint32 {
	switch t {
	case estargz.TypeDir:
		return syscall.S_IFDIR
	case estargz.TypeReg:
		return syscall.S_IFREG
	case estargz.TypeSymlink:
		return syscall.S_IFLNK
	case estargz.TypeChar:
		return syscall.S_IFCHR
	case estargz.TypeBlock:
		return syscall.S_IFBLK
	case estargz.TypeFifo:
		return syscall.S_IFIFO
	}
	return syscall.S_IFREG
}

// Lookup implements gofs.NodeLookuper.
func (nd *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	defer nd.fs.observe("lookup", time.Now())
	if nd.n.Type != estargz.TypeDir || nd.whiteout {
		return nil, syscall.ENOTDIR
	}
	e, ok := nd.dir().entries[name]
	if !ok {
		return nil, syscall.ENOENT
	}
	child := &node{fs: nd.fs, n: e.n, whiteout: e.whiteout}
	child.fill(&out.Attr)
	return nd.NewInode(ctx, child, gofs.StableAttr{Mode: e.mode(), Ino: e.ino()}), 0
}

// Readdir implements gofs.NodeReaddirer.
func (nd *node) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	v := nd.dir()
	list := make([]fuse.DirEntry, 0, len(v.names)+2)
	parentIno := nd.n.ID
	if _, p := nd.Parent(); p != nil {
		parentIno = p.StableAttr().Ino
	}
	list = append(list,
		fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: nd.n.ID},
		fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: parentIno})
	for _, name := range v.names {
		e := v.entries[name]
		list = append(list, fuse.DirEntry{Name: name, Mode: e.mode(), Ino: e.ino()})
	}
	return gofs.NewListDirStream(list), 0
}

// OpendirHandle implements gofs.NodeOpendirHandler: listings never change,
// so the kernel may cache them.
func (nd *node) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	defer nd.fs.observe("opendir", time.Now())
	if nd.n.Type != estargz.TypeDir || nd.whiteout {
		return nil, 0, syscall.ENOTDIR
	}
	// The list stream is also a directory file handle (it reads, seeks
	// and releases).
	ds, errno := nd.Readdir(ctx)
	return ds, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, errno
}

// Getattr implements gofs.NodeGetattrer.
func (nd *node) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	defer nd.fs.observe("getattr", time.Now())
	nd.fill(&out.Attr)
	return 0
}

func (nd *node) fill(a *fuse.Attr) {
	n := nd.n
	a.Ino = n.ID
	a.Uid, a.Gid = n.UID, n.GID
	t := n.ModTime
	a.SetTimes(&t, &t, &t)
	a.Blksize = blockSize
	if nd.whiteout {
		a.Ino = whiteoutInoBase + n.ID
		a.Mode = syscall.S_IFCHR
		a.Nlink = 1
		a.Rdev = 0
		a.Size, a.Blocks = 0, 0
		return
	}
	a.Mode = typeBits(n.Type) | n.Mode
	a.Nlink = uint32(n.NumLink)
	switch n.Type {
	case estargz.TypeReg:
		a.Size = uint64(n.Size)
	case estargz.TypeSymlink:
		a.Size = uint64(len(n.LinkName))
	case estargz.TypeDir:
		a.Size = blockSize
	case estargz.TypeChar, estargz.TypeBlock:
		a.Rdev = uint32(unix.Mkdev(n.DevMajor, n.DevMinor))
	}
	a.Blocks = (a.Size + 511) / 512
}

// Open implements gofs.NodeOpener. Content never changes, so the page
// cache is kept across opens. A regular file whose content is on disk in
// one cache entry is handed to the kernel for passthrough reads.
//
// The kernel does not let an inode be open for passthrough and for cached
// reads at the same time (the open that would mix them fails with EIO): a
// program mapped from a file opened before its chunks were cached keeps it
// open in cached mode, and the next exec of it must not ask for
// passthrough. So each inode counts its open handles of each kind, and an
// open follows the kind already in use.
func (nd *node) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	defer nd.fs.observe("open", time.Now())
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	if nd.n.Type != estargz.TypeReg || nd.whiteout {
		return nil, fuse.FOPEN_KEEP_CACHE, 0
	}
	if err := nd.fs.layer.Err(); err != nil {
		log.G(ctx).WithError(err).WithField("file", nd.n.Name).Debug("open of a failed layer")
		return nil, 0, syscall.EIO
	}
	nd.omu.Lock()
	defer nd.omu.Unlock()
	if nd.fs.passthrough && nd.cachedOpens == 0 {
		if nd.ptOpens == 0 {
			nd.ptFile = nd.fs.layer.backingFile(ctx, nd.n)
		}
		if nd.ptFile != nil {
			nd.ptOpens++
			nd.fs.layer.notePassthroughOpen(nd.n)
			return &passthroughFile{nd: nd}, fuse.FOPEN_KEEP_CACHE, 0
		}
	}
	nd.cachedOpens++
	return &cachedFile{nd: nd}, fuse.FOPEN_KEEP_CACHE, 0
}

// cachedFile is a handle read through FUSE (and the page cache).
type cachedFile struct{ nd *node }

var _ gofs.FileReleaser = (*cachedFile)(nil)

// Release implements gofs.FileReleaser.
func (c *cachedFile) Release(ctx context.Context) syscall.Errno {
	c.nd.omu.Lock()
	c.nd.cachedOpens--
	c.nd.omu.Unlock()
	return 0
}

// passthroughFile is a handle the kernel reads from a cache file directly.
// All passthrough handles of an inode share one backing file.
type passthroughFile struct{ nd *node }

var (
	_ gofs.FilePassthroughFder = (*passthroughFile)(nil)
	_ gofs.FileReleaser        = (*passthroughFile)(nil)
)

// PassthroughFd implements gofs.FilePassthroughFder.
func (p *passthroughFile) PassthroughFd() (int, bool) {
	p.nd.omu.Lock()
	defer p.nd.omu.Unlock()
	if p.nd.ptFile == nil {
		return 0, false
	}
	return int(p.nd.ptFile.Fd()), true
}

// Release implements gofs.FileReleaser.
func (p *passthroughFile) Release(ctx context.Context) syscall.Errno {
	p.nd.omu.Lock()
	defer p.nd.omu.Unlock()
	p.nd.ptOpens--
	if p.nd.ptOpens == 0 && p.nd.ptFile != nil {
		p.nd.ptFile.Close()
		p.nd.ptFile = nil
	}
	return 0
}

// read serves reads when the kernel declined passthrough.
func (p *passthroughFile) read(dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	p.nd.omu.Lock()
	f := p.nd.ptFile
	p.nd.omu.Unlock()
	if f == nil {
		return nil, syscall.EIO
	}
	n, err := f.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Read implements gofs.NodeReader.
func (nd *node) Read(ctx context.Context, f gofs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	defer nd.fs.observe("read", time.Now())
	if pf, ok := f.(*passthroughFile); ok {
		// The kernel sends READs for a passthrough handle only when it
		// refused the backing file (no CAP_SYS_ADMIN, or the cache on
		// a stacked file system such as overlayfs): say so once.
		nd.fs.refused.Do(func() {
			log.G(ctx).WithField("layer", nd.fs.layer.digest).Warn("FUSE passthrough refused by the kernel; cached files are read through FUSE")
		})
		return pf.read(dest, off)
	}
	if nd.n.Type != estargz.TypeReg || nd.whiteout {
		return nil, syscall.EISDIR
	}
	n, err := nd.fs.layer.ReadAt(ctx, nd.n, dest, off)
	if err != nil {
		if !errors.Is(err, context.Canceled) {
			log.G(ctx).WithError(err).WithField("file", nd.n.Name).Debug("read failed")
		}
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Readlink implements gofs.NodeReadlinker.
func (nd *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	defer nd.fs.observe("readlink", time.Now())
	if nd.n.Type != estargz.TypeSymlink || nd.whiteout {
		return nil, syscall.EINVAL
	}
	return []byte(nd.n.LinkName), 0
}

// xattrs returns the extended attributes the node shows: the TOC's, less
// any overlayfs control attribute the image carries, plus the opaque
// marker derived from a ".wh..wh..opq" entry.
//
// overlayfs acts on trusted.overlay.* (and, with userxattr, user.overlay.*)
// attributes of its lower layers: redirect, metacopy, opaque, origin. An
// image that could set them would steer the overlay stacked on its layer,
// for instance redirect a directory to another layer's contents, so none
// of them is served from the TOC; the only one shown is the opaque marker
// lazypull derives itself.
func (nd *node) xattrs() map[string][]byte {
	if nd.whiteout {
		return nil
	}
	x := nd.n.Xattrs
	opaque := nd.n.Type == estargz.TypeDir && nd.dir().opaque
	if !opaque && !hasOverlayXattr(x) {
		return x
	}
	m := make(map[string][]byte, len(x)+1)
	for k, v := range x {
		if !isOverlayXattr(k) {
			m[k] = v
		}
	}
	if opaque {
		m[nd.fs.opaqueXattr] = []byte("y")
	}
	return m
}

// isOverlayXattr reports whether name is in a namespace overlayfs
// interprets.
func isOverlayXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.")
}

func hasOverlayXattr(x map[string][]byte) bool {
	for k := range x {
		if isOverlayXattr(k) {
			return true
		}
	}
	return false
}

// Getxattr implements gofs.NodeGetxattrer.
func (nd *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	defer nd.fs.observe("getxattr", time.Now())
	v, ok := nd.xattrs()[attr]
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) == 0 {
		return uint32(len(v)), 0
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

// Listxattr implements gofs.NodeListxattrer.
func (nd *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	defer nd.fs.observe("listxattr", time.Now())
	x := nd.xattrs()
	names := make([]string, 0, len(x))
	for k := range x {
		names = append(names, k)
	}
	sort.Strings(names)
	size := 0
	for _, k := range names {
		size += len(k) + 1
	}
	if len(dest) == 0 {
		return uint32(size), 0
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	off := 0
	for _, k := range names {
		off += copy(dest[off:], k)
		dest[off] = 0
		off++
	}
	return uint32(size), 0
}

// Statfs implements gofs.NodeStatfser.
func (nd *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	size := nd.fs.layer.plainBytes
	out.Bsize = blockSize
	out.Frsize = blockSize
	out.Blocks = uint64(size+blockSize-1) / blockSize
	out.Files = uint64(nd.fs.layer.index.NumNodes())
	out.NameLen = 255
	return 0
}

// observe reports a FUSE operation's duration to MountOptions.OnOp.
func (f *layerFS) observe(op string, start time.Time) {
	if f.onOp != nil {
		f.onOp(op, time.Since(start))
	}
}

// Flush implements gofs.NodeFlusher: ENOSYS, which tells the kernel never
// to send FLUSH on this connection again. A read-only layer has nothing to
// flush, and every close(2) then skips a round trip to the daemon — and a
// process that serves a layer and has files of it open (tests, `lazypull
// mount`) cannot deadlock at exit, when the kernel would otherwise flush
// those files to a server that is no longer running.
func (nd *node) Flush(ctx context.Context, f gofs.FileHandle) syscall.Errno {
	return syscall.ENOSYS
}
