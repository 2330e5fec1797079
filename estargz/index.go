// The Index: a layer's inode tree as the TOC describes it, and the
// lookups a file system needs (paths, directory listings, hardlinks, the
// chunk holding a byte of a file, every chunk in blob order). Building and
// validating it from TOC JSON is in parse.go.

package estargz

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Chunk is one independently compressed piece of a regular file.
type Chunk struct {
	// FileOffset is where the chunk starts in the file.
	FileOffset int64
	// Size is the chunk's length in plain bytes.
	Size int64
	// Offset and End delimit the compressed member (or frame) holding the
	// chunk: fetch blob bytes [Offset, End) to decode it.
	Offset, End int64
	// InnerOffset is where the chunk starts inside the decompressed member.
	InnerOffset int64
	// Digest is the sha256 of the chunk's plain bytes.
	Digest digest.Digest
}

// Node is one inode of a layer: a file, directory, link or device. All
// hardlinked names of a file share one Node.
type Node struct {
	// ID is a stable inode number: 1 for the root, then in TOC order.
	ID uint64
	// Name is the cleaned path of the node's first name ("" for the root).
	Name string
	// Type is one of TypeDir, TypeReg, TypeSymlink, TypeChar, TypeBlock,
	// TypeFifo (never TypeHardlink or TypeChunk).
	Type string
	// Mode holds the permission, setuid, setgid and sticky bits.
	Mode uint32
	// UID and GID own the node; Uname and Gname are the tar names.
	UID, GID     uint32
	Uname, Gname string
	// Size is a regular file's size.
	Size int64
	// ModTime is the modification time.
	ModTime time.Time
	// LinkName is a symlink's target.
	LinkName string
	// DevMajor and DevMinor are a device's numbers.
	DevMajor, DevMinor uint32
	// Xattrs are the extended attributes.
	Xattrs map[string][]byte
	// Digest is the sha256 of a regular file's content, when recorded.
	Digest digest.Digest
	// Chunks cover a regular file's content in order.
	Chunks []Chunk
	// NumLink is the link count: names for files, 2 + subdirectories for
	// directories.
	NumLink int

	explicit bool             // a TOC entry (not only a child path) created it
	children map[string]*Node // directory entries, by base name
	names    []string         // sorted keys of children
}

// Child returns the directory entry called name.
func (n *Node) Child(name string) (*Node, bool) {
	c, ok := n.children[name]
	return c, ok
}

// Names returns a directory's entry names in sorted order. The slice must
// not be modified.
func (n *Node) Names() []string { return n.names }

// ChunkAt returns the index of the chunk holding byte off of a regular
// file, or -1 if off is outside the file.
func (n *Node) ChunkAt(off int64) int {
	if off < 0 || off >= n.Size || len(n.Chunks) == 0 {
		return -1
	}
	i := sort.Search(len(n.Chunks), func(i int) bool { return n.Chunks[i].FileOffset > off }) - 1
	if i < 0 {
		return -1
	}
	return i
}

// Index is a parsed, validated TOC: the inode tree of one layer.
type Index struct {
	// TOC is the parsed table of contents as found in the blob. Callers
	// that only need the index may drop it (set it to nil) to save memory.
	TOC *TOC
	// TOCDigest is the sha256 of the TOC JSON bytes.
	TOCDigest digest.Digest
	// PrefetchEnd is the compressed offset of the .prefetch.landmark
	// member: chunks starting before it are the prioritized start-up set.
	// It is -1 when the blob has no prefetch landmark.
	PrefetchEnd int64
	// NoPrefetch is true when the blob has a .no.prefetch.landmark.
	NoPrefetch bool
	// PayloadEnd is where the payload region of the blob ends.
	PayloadEnd int64

	root  *Node
	nodes map[string]*Node
	count int
}

// Root returns the root directory.
func (ix *Index) Root() *Node { return ix.root }

// Lookup returns the node at a path ("" or "/" is the root). Names are
// cleaned like TOC names; hardlinks resolve to their target's node.
func (ix *Index) Lookup(name string) (*Node, bool) {
	n, ok := ix.nodes[cleanLookup(name)]
	return n, ok
}

// NumNodes returns the number of distinct inodes.
func (ix *Index) NumNodes() int { return ix.count }

// Walk calls fn for every path in the tree in depth-first, sorted order,
// the root first (with name ""). Hardlinked nodes are visited once per
// name. Returning false from fn stops the walk below that node.
func (ix *Index) Walk(fn func(name string, n *Node) bool) {
	var walk func(string, *Node)
	walk = func(name string, n *Node) {
		if !fn(name, n) {
			return
		}
		for _, c := range n.names {
			walk(path.Join(name, c), n.children[c])
		}
	}
	walk("", ix.root)
}

// Chunks returns every distinct chunk of the layer in blob order, for
// background fetching. Chunks shared by hardlinks appear once.
func (ix *Index) Chunks() []Chunk {
	var out []Chunk
	seen := make(map[*Node]bool)
	for _, n := range ix.nodes {
		if n.Type != TypeReg || seen[n] {
			continue
		}
		seen[n] = true
		out = append(out, n.Chunks...)
	}
	slices.SortFunc(out, func(a, b Chunk) int {
		if a.Offset != b.Offset {
			return cmpInt64(a.Offset, b.Offset)
		}
		return cmpInt64(a.InnerOffset, b.InnerOffset)
	})
	return out
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func cleanLookup(name string) string {
	name = strings.Trim(path.Clean("/"+name), "/")
	return name
}

// CleanName cleans a TOC or tar entry name: it drops leading "/" and "./"
// and trailing "/", and rejects names with ".." components or NUL bytes
// (ErrUnsafePath) and names longer than PATH_MAX, 4096 bytes (ErrFormat).
// The root directory is returned as "".
func CleanName(name string) (string, error) {
	if len(name) > maxNameLen {
		return "", errorf(ErrFormat, name[:64]+"...", -1, "name of %d bytes is longer than %d", len(name), maxNameLen)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", errorf(ErrUnsafePath, name, -1, "name contains a NUL byte")
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", errorf(ErrUnsafePath, name, -1, "name has a \"..\" component")
		}
	}
	return cleanLookup(name), nil
}

// String describes a chunk for log lines.
func (c Chunk) String() string {
	return fmt.Sprintf("chunk [%d,+%d) at blob [%d,%d) %s", c.FileOffset, c.Size, c.Offset, c.End, c.Digest)
}
