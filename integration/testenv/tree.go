package testenv

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Node is what a test compares of one file.
type Node struct {
	Path     string // absolute within the tree: "/etc/passwd"
	Type     string // dir, reg, symlink, hardlink (only inside tars), char, block, fifo, socket
	Mode     uint32 // permission bits with setuid, setgid and sticky (07777); 0777 for symlinks
	UID, GID int
	Size     int64 // regular files
	ModTime  time.Time
	Link     string // symlink target
	DevMajor uint32 // char and block devices
	DevMinor uint32
	Xattrs   map[string]string
	Digest   digest.Digest // regular files: sha256 of the content
	// Hardlink is set on regular files that have more than one name in the
	// tree: the first of those names in sorted order, the same for all.
	Hardlink string
}

// String formats the node in one line, ls -l style.
func (n *Node) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-7s %04o %d:%d", n.Type, n.Mode, n.UID, n.GID)
	switch n.Type {
	case "reg":
		fmt.Fprintf(&b, " size=%d %s", n.Size, shortDigest(n.Digest))
	case "symlink":
		fmt.Fprintf(&b, " -> %s", n.Link)
	case "char", "block":
		fmt.Fprintf(&b, " dev=%d,%d", n.DevMajor, n.DevMinor)
	}
	fmt.Fprintf(&b, " mtime=%s", n.ModTime.UTC().Format(time.RFC3339Nano))
	if len(n.Xattrs) > 0 {
		fmt.Fprintf(&b, " xattrs=%s", formatXattrs(n.Xattrs))
	}
	if n.Hardlink != "" {
		fmt.Fprintf(&b, " hardlink=%s", n.Hardlink)
	}
	return b.String()
}

func shortDigest(d digest.Digest) string {
	s := d.String()
	if len(s) > 19 {
		return s[:19]
	}
	return s
}

func formatXattrs(x map[string]string) string {
	keys := make([]string, 0, len(x))
	for k := range x {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%q", k, x[k])
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// Tree is a file tree keyed by Node.Path. The root itself is not in it.
type Tree map[string]*Node

// Paths returns the tree's paths, sorted.
func (t Tree) Paths() []string {
	ps := make([]string, 0, len(t))
	for p := range t {
		ps = append(ps, p)
	}
	sort.Strings(ps)
	return ps
}

// String lists the tree, one node a line.
func (t Tree) String() string {
	var b strings.Builder
	for _, p := range t.Paths() {
		fmt.Fprintf(&b, "%s %s\n", p, t[p])
	}
	return b.String()
}

// hiddenXattr reports attributes overlayfs keeps for itself; they are never
// part of an image.
func hiddenXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.")
}

// WalkTree reads the tree under root from disk, without following symlinks.
func WalkTree(root string) (Tree, error) {
	t := Tree{}
	type inodeKey struct{ dev, ino uint64 }
	links := map[inodeKey][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return &fs.PathError{Op: "lstat", Path: p, Err: err}
		}
		n := &Node{
			Path:    "/" + filepath.ToSlash(rel),
			Mode:    st.Mode & 0o7777,
			UID:     int(st.Uid),
			GID:     int(st.Gid),
			ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec).UTC(),
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			n.Type = "dir"
		case unix.S_IFREG:
			n.Type = "reg"
			n.Size = st.Size
			if n.Digest, err = fileDigest(p); err != nil {
				return err
			}
			if st.Nlink > 1 {
				k := inodeKey{st.Dev, st.Ino}
				links[k] = append(links[k], n.Path)
			}
		case unix.S_IFLNK:
			n.Type = "symlink"
			n.Mode = 0o777
			if n.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			n.Type = "char"
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				n.Type = "block"
			}
			n.DevMajor, n.DevMinor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
		case unix.S_IFIFO:
			n.Type = "fifo"
		case unix.S_IFSOCK:
			n.Type = "socket"
		default:
			n.Type = fmt.Sprintf("unknown(%o)", st.Mode&unix.S_IFMT)
		}
		if n.Xattrs, err = readXattrs(p); err != nil {
			return err
		}
		t[n.Path] = n
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, names := range links {
		if len(names) < 2 {
			continue
		}
		sort.Strings(names)
		for _, name := range names {
			t[name].Hardlink = names[0]
		}
	}
	return t, nil
}

func fileDigest(p string) (digest.Digest, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return digest.NewDigest(digest.SHA256, h), nil
}

func readXattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, &fs.PathError{Op: "llistxattr", Path: p, Err: err}
	}
	if size == 0 {
		return nil, nil
	}
	buf := make([]byte, size)
	if size, err = unix.Llistxattr(p, buf); err != nil {
		return nil, &fs.PathError{Op: "llistxattr", Path: p, Err: err}
	}
	var x map[string]string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if name == "" || hiddenXattr(name) {
			continue
		}
		vsize, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return nil, &fs.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
		}
		val := make([]byte, vsize)
		if vsize > 0 {
			if vsize, err = unix.Lgetxattr(p, name, val); err != nil {
				return nil, &fs.PathError{Op: "lgetxattr " + name, Path: p, Err: err}
			}
		}
		if x == nil {
			x = map[string]string{}
		}
		x[name] = string(val[:vsize])
	}
	return x, nil
}

// TarEntries lists the entries of a tar stream as nodes, in order, with
// their own names ("/etc/x", "/etc/.wh.y"); hard links have Type "hardlink"
// and Link set to the target. It is for tests that check a layer as such.
func TarEntries(tarball []byte) ([]*Node, error) {
	var out []*Node
	err := readTar(tarball, func(h *tar.Header, data []byte) error {
		n := nodeFromHeader(h, data)
		n.Path = "/" + cleanName(h.Name)
		out = append(out, n)
		return nil
	})
	return out, err
}

func readTar(tarball []byte, fn func(*tar.Header, []byte) error) error {
	tr := tar.NewReader(bytes.NewReader(tarball))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var data []byte
		if h.Typeflag == tar.TypeReg || h.Typeflag == tar.TypeRegA {
			if data, err = io.ReadAll(tr); err != nil {
				return err
			}
		}
		if err := fn(h, data); err != nil {
			return err
		}
	}
}

func nodeFromHeader(h *tar.Header, data []byte) *Node {
	n := &Node{
		Mode:    uint32(h.Mode) & 0o7777,
		UID:     h.Uid,
		GID:     h.Gid,
		ModTime: h.ModTime.UTC(),
	}
	switch h.Typeflag {
	case tar.TypeDir:
		n.Type = "dir"
	case tar.TypeReg, tar.TypeRegA:
		n.Type = "reg"
		n.Size = int64(len(data))
		n.Digest = digest.FromBytes(data)
	case tar.TypeSymlink:
		n.Type = "symlink"
		n.Mode = 0o777
		n.Link = h.Linkname
	case tar.TypeLink:
		n.Type = "hardlink"
		n.Link = "/" + cleanName(h.Linkname)
	case tar.TypeChar:
		n.Type = "char"
		n.DevMajor, n.DevMinor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeBlock:
		n.Type = "block"
		n.DevMajor, n.DevMinor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeFifo:
		n.Type = "fifo"
	default:
		n.Type = fmt.Sprintf("tar-type-%c", h.Typeflag)
	}
	for k, v := range h.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		// Linux refuses user.* attributes on anything but regular files and
		// directories; containerd's unpacker skips them there.
		if strings.HasPrefix(name, "user.") && n.Type != "reg" && n.Type != "dir" && n.Type != "hardlink" {
			continue
		}
		if n.Xattrs == nil {
			n.Xattrs = map[string]string{}
		}
		n.Xattrs[name] = v
	}
	return n
}

// ExpectedTree applies layer tars, bottom first, the way an image's rootfs
// is assembled: later entries replace earlier ones (a directory replacing a
// directory keeps its children), ".wh.NAME" deletes NAME and its subtree
// from the layers below, ".wh..wh..opq" empties its directory of what the
// layers below put there, and a hard link shares its target's inode.
// Parent directories a tar lacks are made with mode 0755 and a zero mtime.
func ExpectedTree(layers ...[]byte) (Tree, error) {
	files := map[string]*Node{} // path -> inode; hard links share one *Node
	children := func(dir string) []string {
		var out []string
		for p := range files {
			if strings.HasPrefix(p, dir+"/") || dir == "/" && p != "/" {
				out = append(out, p)
			}
		}
		return out
	}
	remove := func(p string, keep map[string]bool) {
		if !keep[p] {
			delete(files, p)
		}
		for _, c := range children(p) {
			if !keep[c] {
				delete(files, c)
			}
		}
	}
	for i, layer := range layers {
		added := map[string]bool{} // paths this layer made
		err := readTar(layer, func(h *tar.Header, data []byte) error {
			name := "/" + cleanName(h.Name)
			if name == "/" {
				return nil
			}
			dir, base := path.Dir(name), path.Base(name)
			switch {
			case base == OpaqueWhiteout:
				for _, c := range children(dir) {
					if !added[c] {
						delete(files, c)
					}
				}
				return nil
			case strings.HasPrefix(base, WhiteoutPrefix):
				remove(path.Join(dir, strings.TrimPrefix(base, WhiteoutPrefix)), added)
				return nil
			}
			for p := dir; p != "/"; p = path.Dir(p) {
				if n, ok := files[p]; !ok || n.Type != "dir" {
					if ok {
						remove(p, nil)
					}
					files[p] = &Node{Type: "dir", Mode: 0o755}
					added[p] = true
				}
			}
			n := nodeFromHeader(h, data)
			old, exists := files[name]
			if n.Type == "hardlink" {
				target, ok := files[n.Link]
				if !ok || target.Type != "reg" {
					return fmt.Errorf("layer %d: hard link %s to %s: target is not a regular file", i, name, n.Link)
				}
				if exists && old.Type == "dir" {
					remove(name, nil)
				}
				files[name] = target
				added[name] = true
				return nil
			}
			if exists && (old.Type != "dir" || n.Type != "dir") {
				remove(name, nil)
			}
			files[name] = n
			added[name] = true
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	t := Tree{}
	names := map[*Node][]string{}
	for p, inode := range files {
		n := *inode
		n.Path = p
		t[p] = &n
		if inode.Type == "reg" {
			names[inode] = append(names[inode], p)
		}
	}
	for _, ps := range names {
		if len(ps) < 2 {
			continue
		}
		sort.Strings(ps)
		for _, p := range ps {
			t[p].Hardlink = ps[0]
		}
	}
	return t, nil
}

// DiffOptions narrows what Diff compares.
type DiffOptions struct {
	// IgnorePaths are skipped with their subtrees ("/dev", "/proc").
	IgnorePaths []string
	// IgnoreModTime skips mtimes; IgnoreDirModTime only those of directories.
	IgnoreModTime    bool
	IgnoreDirModTime bool
	// IgnoreHardlinks skips hard link groups.
	IgnoreHardlinks bool
}

func (o *DiffOptions) ignored(p string) bool {
	for _, ig := range o.IgnorePaths {
		if p == ig || strings.HasPrefix(p, strings.TrimSuffix(ig, "/")+"/") {
			return true
		}
	}
	return false
}

// Diff compares two trees and describes each difference in a line:
// "- PATH" for what only want has, "+ PATH" for what only got has,
// "~ PATH: field want X, got Y" for what differs. No lines: equal.
func Diff(want, got Tree, opts *DiffOptions) []string {
	if opts == nil {
		opts = &DiffOptions{}
	}
	all := map[string]bool{}
	for p := range want {
		all[p] = true
	}
	for p := range got {
		all[p] = true
	}
	paths := make([]string, 0, len(all))
	for p := range all {
		if !opts.ignored(p) {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	var out []string
	for _, p := range paths {
		w, g := want[p], got[p]
		switch {
		case g == nil:
			out = append(out, fmt.Sprintf("- %s: missing (want %s)", p, w))
		case w == nil:
			out = append(out, fmt.Sprintf("+ %s: unexpected (%s)", p, g))
		default:
			for _, d := range nodeDiff(w, g, opts) {
				out = append(out, fmt.Sprintf("~ %s: %s", p, d))
			}
		}
	}
	return out
}

func nodeDiff(w, g *Node, opts *DiffOptions) []string {
	var d []string
	f := func(name string, want, got any) {
		d = append(d, fmt.Sprintf("%s want %v, got %v", name, want, got))
	}
	if w.Type != g.Type {
		f("type", w.Type, g.Type)
		return d
	}
	if w.Mode != g.Mode {
		f("mode", fmt.Sprintf("%04o", w.Mode), fmt.Sprintf("%04o", g.Mode))
	}
	if w.UID != g.UID || w.GID != g.GID {
		f("owner", fmt.Sprintf("%d:%d", w.UID, w.GID), fmt.Sprintf("%d:%d", g.UID, g.GID))
	}
	if w.Size != g.Size {
		f("size", w.Size, g.Size)
	}
	if w.Digest != g.Digest {
		f("digest", w.Digest, g.Digest)
	}
	if w.Link != g.Link {
		f("link", w.Link, g.Link)
	}
	if w.DevMajor != g.DevMajor || w.DevMinor != g.DevMinor {
		f("device", fmt.Sprintf("%d,%d", w.DevMajor, w.DevMinor), fmt.Sprintf("%d,%d", g.DevMajor, g.DevMinor))
	}
	if !opts.IgnoreModTime && !(opts.IgnoreDirModTime && w.Type == "dir") && !w.ModTime.Equal(g.ModTime) {
		f("mtime", w.ModTime.UTC().Format(time.RFC3339Nano), g.ModTime.UTC().Format(time.RFC3339Nano))
	}
	if formatXattrs(w.Xattrs) != formatXattrs(g.Xattrs) {
		f("xattrs", formatXattrs(w.Xattrs), formatXattrs(g.Xattrs))
	}
	if !opts.IgnoreHardlinks && w.Hardlink != g.Hardlink {
		f("hardlink", quoteEmpty(w.Hardlink), quoteEmpty(g.Hardlink))
	}
	return d
}

func quoteEmpty(s string) string {
	if s == "" {
		return `""`
	}
	return s
}

// FormatDiff joins Diff's lines for an error message, at most max of them.
func FormatDiff(lines []string, max int) string {
	if len(lines) > max {
		lines = append(lines[:max:max], fmt.Sprintf("... and %d more", len(lines)-max))
	}
	return strings.Join(lines, "\n")
}
