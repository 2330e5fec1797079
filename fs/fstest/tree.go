package fstest

import (
	"archive/tar"
	"bytes"
	"io"
	"path"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Kind is a file type.
type Kind string

// File types.
const (
	KindDir     Kind = "dir"
	KindReg     Kind = "reg"
	KindSymlink Kind = "symlink"
	KindChar    Kind = "char"
	KindBlock   Kind = "block"
	KindFifo    Kind = "fifo"
	KindOther   Kind = "other"
)

// Node is what a tree shows at one path. Hardlinked names share a *Node in
// expected trees; a walked tree has one Node per path, with Dev and Ino.
type Node struct {
	Kind Kind
	// Mode holds the permission, setuid, setgid and sticky bits.
	Mode         uint32
	UID, GID     uint32
	Size         int64 // regular files and symlinks
	Mtime        time.Time
	Target       string // symlink target
	Major, Minor uint32 // devices
	Xattrs       map[string]string
	Nlink        uint32
	Digest       digest.Digest // regular files' content
	Data         []byte        // expected content (expected trees only)

	Dev, Ino uint64 // walked trees only

	whiteout bool // a layer's whiteout device (expected trees only)
	opaque   bool // a directory marked opaque in its layer
}

// Tree maps cleaned slash-separated paths ("." is the root) to nodes.
type Tree map[string]*Node

// Paths returns the tree's paths, sorted (parents before children).
func (t Tree) Paths() []string {
	ps := make([]string, 0, len(t))
	for p := range t {
		ps = append(ps, p)
	}
	sort.Strings(ps)
	return ps
}

// Files returns the paths of the regular files.
func (t Tree) Files() []string {
	var ps []string
	for _, p := range t.Paths() {
		if t[p].Kind == KindReg {
			ps = append(ps, p)
		}
	}
	return ps
}

// Read parses a tar stream (plain) back into entries.
func Read(t testing.TB, tarBytes []byte) []Entry {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(tarBytes))
	var out []Entry
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("fstest: reading tar: %v", err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("fstest: reading tar entry %q: %v", h.Name, err)
		}
		out = append(out, Entry{Header: *h, Data: data})
	}
}

// Clean cleans a tar entry name the way layers do: no leading "/" or
// "./", no trailing "/"; the root is ".".
func Clean(name string) string {
	p := strings.Trim(path.Clean("/"+name), "/")
	if p == "" {
		return "."
	}
	return p
}

const (
	whPrefix  = ".wh."
	whOpaque  = ".wh..wh..opq"
	ovlPrefix = "trusted.overlay."
)

// The overlay xattr a layer mount puts on opaque directories (overlayfs
// hides it from the merged view).
const opaqueXattr = "trusted.overlay.opaque"

func implicitDir() *Node {
	return &Node{Kind: KindDir, Mode: 0o755, Mtime: time.Unix(0, 0).UTC()}
}

// LayerView is the tree a mount of one layer made of entries must show,
// as overlayfs expects a lower directory: ".wh.NAME" files are 0/0
// character devices NAME (mode 0, the whiteout entry's owner and time)
// unless the layer also has NAME, ".wh..wh..opq" is invisible and makes its
// directory carry trusted.overlay.opaque=y,
// hardlinks share a node whose Nlink counts its names, and directories
// count 2 + subdirectories. Later entries of the same name replace earlier
// ones. Parent directories without an entry are 0755 root:root at the
// epoch.
func LayerView(entries []Entry) Tree {
	t := Tree{".": implicitDir()}
	var parent func(p string) *Node
	parent = func(p string) *Node {
		d := path.Dir(p)
		if d == "." {
			return t["."]
		}
		if n, ok := t[d]; ok && n.Kind == KindDir {
			return n
		}
		parent(d)
		n := implicitDir()
		t[d] = n
		return n
	}
	type wh struct {
		dir, target string
		h           tar.Header
	}
	var whs []wh
	for _, e := range entries {
		h := e.Header
		p := Clean(h.Name)
		base := path.Base(p)
		if p != "." {
			parent(p)
		}
		switch {
		case base == whOpaque:
			t[path.Dir(p)].opaque = true
			continue
		case strings.HasPrefix(base, whPrefix):
			whs = append(whs, wh{dir: path.Dir(p), target: base[len(whPrefix):], h: h})
			continue
		}
		if h.Typeflag == tar.TypeLink {
			target := t[Clean(h.Linkname)]
			if target == nil {
				panic("fstest: hardlink " + p + " to missing " + h.Linkname)
			}
			target.Nlink++
			t[p] = target
			continue
		}
		n := &Node{
			Mode: uint32(h.Mode) & 0o7777, UID: uint32(h.Uid), GID: uint32(h.Gid),
			Mtime: h.ModTime.UTC(), Nlink: 1,
		}
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if n.Xattrs == nil {
					n.Xattrs = map[string]string{}
				}
				n.Xattrs[x] = v
			}
		}
		switch h.Typeflag {
		case tar.TypeDir:
			n.Kind = KindDir
			if old, ok := t[p]; ok && old.Kind == KindDir {
				n.opaque = old.opaque
			}
		case tar.TypeReg, tar.TypeRegA:
			n.Kind, n.Size, n.Data, n.Digest = KindReg, int64(len(e.Data)), e.Data, digest.FromBytes(e.Data)
		case tar.TypeSymlink:
			n.Kind, n.Target, n.Size = KindSymlink, h.Linkname, int64(len(h.Linkname))
		case tar.TypeChar:
			n.Kind, n.Major, n.Minor = KindChar, uint32(h.Devmajor), uint32(h.Devminor)
		case tar.TypeBlock:
			n.Kind, n.Major, n.Minor = KindBlock, uint32(h.Devmajor), uint32(h.Devminor)
		case tar.TypeFifo:
			n.Kind = KindFifo
		default:
			continue
		}
		if old, ok := t[p]; ok && old.Kind == KindDir && n.Kind != KindDir {
			t.removeBelow(p)
		}
		t[p] = n
	}
	for _, w := range whs {
		if w.target == "" || w.target == "." || w.target == ".." {
			continue
		}
		p := path.Join(w.dir, w.target)
		if _, real := t[p]; real {
			continue
		}
		t[p] = &Node{Kind: KindChar, UID: uint32(w.h.Uid), GID: uint32(w.h.Gid), Mtime: w.h.ModTime.UTC(), Nlink: 1, whiteout: true}
	}
	for _, n := range t {
		if n.Kind != KindDir {
			continue
		}
		if n.opaque {
			x := make(map[string]string, len(n.Xattrs)+1)
			for k, v := range n.Xattrs {
				x[k] = v
			}
			x[opaqueXattr] = "y"
			n.Xattrs = x
		}
		n.Nlink = 2
	}
	for p, n := range t {
		if n.Kind == KindDir && p != "." {
			t[path.Dir(p)].Nlink++
		}
	}
	return t
}

// removeBelow deletes everything under directory p (not p itself).
func (t Tree) removeBelow(p string) {
	prefix := p + "/"
	if p == "." {
		prefix = ""
	}
	for q := range t {
		if q != "." && strings.HasPrefix(q, prefix) {
			delete(t, q)
		}
	}
}

// Merged is the tree overlayfs shows with layers stacked bottom (first)
// to top (last) as read-only lower directories: a whiteout hides the path
// in the layers below and never shows itself, an opaque directory hides
// the directories of the same path below, a non-directory replaces what is
// below, and a directory's attributes are those of its topmost layer.
// overlayfs hides trusted.overlay.* xattrs; directory link counts are not
// predicted (overlayfs reports 1 for merged directories).
func Merged(layers ...[]Entry) Tree {
	out := Tree{}
	for _, entries := range layers {
		v := LayerView(entries)
		for _, p := range v.Paths() {
			n := v[p]
			old := out[p]
			switch {
			case n.whiteout:
				if old != nil {
					out.removeBelow(p)
					delete(out, p)
				}
				continue
			case n.Kind == KindDir:
				if old != nil && (old.Kind != KindDir || n.opaque) {
					out.removeBelow(p)
				}
				c := *n
				c.Xattrs = nil
				for k, v := range n.Xattrs {
					if !strings.HasPrefix(k, ovlPrefix) {
						if c.Xattrs == nil {
							c.Xattrs = map[string]string{}
						}
						c.Xattrs[k] = v
					}
				}
				out[p] = &c
			default:
				if old != nil && old.Kind == KindDir {
					out.removeBelow(p)
				}
				out[p] = n
			}
		}
	}
	return out
}
