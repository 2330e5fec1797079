package fstest

import (
	"bytes"
	"errors"
	"fmt"
	iofs "io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// WalkOptions tune Walk.
type WalkOptions struct {
	// NoContent skips reading regular files (Digest stays empty).
	NoContent bool
}

// Walk describes the tree under root the way expected trees are built:
// lstat, readlink, listxattr and getxattr (both with size probes), and the
// sha256 of every regular file's content. It also checks that the type
// readdir reports for each entry agrees with lstat.
func Walk(root string, o WalkOptions) (Tree, error) {
	t := Tree{}
	err := filepath.WalkDir(root, func(p string, d iofs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		n, err := Stat(p, !o.NoContent)
		if err != nil {
			return err
		}
		if rel != "." {
			if got, want := d.Type(), typeOf(n.Kind); got != want {
				return fmt.Errorf("%s: readdir says type %v, lstat says %s", p, got, n.Kind)
			}
		}
		t[filepath.ToSlash(rel)] = n
		return nil
	})
	return t, err
}

func typeOf(k Kind) iofs.FileMode {
	switch k {
	case KindDir:
		return iofs.ModeDir
	case KindSymlink:
		return iofs.ModeSymlink
	case KindChar:
		return iofs.ModeDevice | iofs.ModeCharDevice
	case KindBlock:
		return iofs.ModeDevice
	case KindFifo:
		return iofs.ModeNamedPipe
	case KindReg:
		return 0
	}
	return iofs.ModeIrregular
}

// Stat describes one path (not following symlinks), reading a regular
// file's content if content is set.
func Stat(p string, content bool) (*Node, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, &os.PathError{Op: "lstat", Path: p, Err: err}
	}
	n := &Node{
		Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid, Size: st.Size,
		Mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec).UTC(), Nlink: uint32(st.Nlink),
		Dev: st.Dev, Ino: st.Ino,
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		n.Kind = KindDir
	case unix.S_IFREG:
		n.Kind = KindReg
		if content {
			b, err := os.ReadFile(p)
			if err != nil {
				return nil, err
			}
			if int64(len(b)) != st.Size {
				return nil, fmt.Errorf("%s: read %d bytes, stat says %d", p, len(b), st.Size)
			}
			n.Digest = digest.FromBytes(b)
		}
	case unix.S_IFLNK:
		n.Kind = KindSymlink
		target, err := os.Readlink(p)
		if err != nil {
			return nil, err
		}
		n.Target = target
	case unix.S_IFCHR:
		n.Kind = KindChar
	case unix.S_IFBLK:
		n.Kind = KindBlock
	case unix.S_IFIFO:
		n.Kind = KindFifo
	default:
		n.Kind = KindOther
	}
	if n.Kind == KindChar || n.Kind == KindBlock {
		n.Major, n.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
	}
	x, err := Xattrs(p)
	if err != nil {
		return nil, err
	}
	n.Xattrs = x
	return n, nil
}

// Xattrs lists and reads the extended attributes of p (not following
// symlinks), using the size-probe calls (nil buffers) first like getfattr,
// and checking that a too-small buffer gets ERANGE.
func Xattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, &os.PathError{Op: "listxattr", Path: p, Err: err}
	}
	if size == 0 {
		return nil, nil
	}
	if size > 1 {
		if _, err := unix.Llistxattr(p, make([]byte, size-1)); !errors.Is(err, unix.ERANGE) {
			return nil, fmt.Errorf("%s: listxattr with a short buffer: %v, want ERANGE", p, err)
		}
	}
	buf := make([]byte, size)
	k, err := unix.Llistxattr(p, buf)
	if err != nil {
		return nil, &os.PathError{Op: "listxattr", Path: p, Err: err}
	}
	if k > size {
		// Less is fine: overlayfs answers the probe with the size before
		// filtering out its private xattrs.
		return nil, fmt.Errorf("%s: listxattr size probe said %d, then returned %d", p, size, k)
	}
	out := map[string]string{}
	if k == 0 {
		return out, nil // e.g. overlayfs filtered out all it had
	}
	for _, name := range bytes.Split(bytes.TrimSuffix(buf[:k], []byte{0}), []byte{0}) {
		name := string(name)
		vs, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: getxattr %q (size probe): %w", p, name, err)
		}
		if vs > 1 {
			if _, err := unix.Lgetxattr(p, name, make([]byte, vs-1)); !errors.Is(err, unix.ERANGE) {
				return nil, fmt.Errorf("%s: getxattr %q with a short buffer: %v, want ERANGE", p, name, err)
			}
		}
		v := make([]byte, vs)
		k, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			return nil, fmt.Errorf("%s: getxattr %q: %w", p, name, err)
		}
		out[name] = string(v[:k])
	}
	return out, nil
}
