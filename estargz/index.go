package estargz

import (
	"bytes"
	"errors"
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"
	"time"

	gojson "github.com/goccy/go-json"
	"github.com/opencontainers/go-digest"
)

// Limits bounds what ParseTOC and Open accept from a blob.
type Limits struct {
	// MaxTOCSize is the largest TOC JSON accepted, in bytes (default
	// 128 MiB, enough for several hundred thousand entries).
	MaxTOCSize int64
	// MaxEntries is the most TOC entries accepted (default 4 Mi).
	MaxEntries int
}

// Default limits.
const (
	DefaultMaxTOCSize = 128 << 20
	DefaultMaxEntries = 4 << 20
	// maxFileSize bounds a regular file's declared size (1 PiB).
	maxFileSize = 1 << 50
	// maxHardlinkDepth bounds hardlink-to-hardlink chains.
	maxHardlinkDepth = 32
	// maxNameLen bounds entry and hardlink target names (PATH_MAX). It
	// also keeps indexing linear: every ancestor of a name is a map key.
	maxNameLen = 4096
	// implicitDirSlack is how many more directories than entries a TOC
	// may imply by the names of its entries.
	implicitDirSlack = 1 << 16
)

func (l Limits) withDefaults() Limits {
	if l.MaxTOCSize <= 0 {
		l.MaxTOCSize = DefaultMaxTOCSize
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	return l
}

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

// ParseTOC parses and validates TOC JSON read from a blob whose payload
// region ends at payloadEnd (Footer.PayloadEnd). It rejects anything a
// well-formed eStargz writer would not produce and that could make a reader
// misbehave: unsafe names, duplicate names, unknown types, chunks that
// overlap, leave gaps or do not add up to the file size, offsets outside the
// payload region, hardlinks to missing or directory targets, and TOCs larger
// than the limits. Besides the limits, a TOC may not imply (by the names of
// its entries) more than 65536 directories beyond its number of entries,
// which keeps indexing time and memory linear in the TOC size.
func ParseTOC(tocJSON []byte, payloadEnd int64, limits Limits) (*Index, error) {
	limits = limits.withDefaults()
	if int64(len(tocJSON)) > limits.MaxTOCSize {
		return nil, errorf(ErrTOCTooLarge, "", -1, "%d bytes, limit %d", len(tocJSON), limits.MaxTOCSize)
	}
	// Decoding allocates an entry for each element of the entries array,
	// however short its JSON ("0," is two bytes): count them first.
	if n := countTopLevelArrayElements(tocJSON, limits.MaxEntries); n > limits.MaxEntries {
		return nil, errorf(ErrTOCTooLarge, "", -1, "more than %d entries", limits.MaxEntries)
	}
	toc, err := decodeTOC(tocJSON)
	if err != nil {
		return nil, wrapErr(ErrFormat, "", -1, err, "decoding TOC JSON")
	}
	if len(toc.Entries) > limits.MaxEntries {
		return nil, errorf(ErrTOCTooLarge, "", -1, "%d entries, limit %d", len(toc.Entries), limits.MaxEntries)
	}
	ix, err := buildIndex(toc, payloadEnd)
	if err != nil {
		return nil, err
	}
	ix.TOCDigest = digest.FromBytes(tocJSON)
	return ix, nil
}

// countTopLevelArrayElements counts the elements of the arrays that are
// values of the top-level JSON object (in a TOC, the entries), stopping
// once the count exceeds limit. It only tracks strings and nesting, so it
// is cheap; the result is exact for well-formed JSON.
func countTopLevelArrayElements(p []byte, limit int) int {
	var (
		depth   int
		inArray bool // inside an array at depth 2 (a top-level value)
		counted bool // the current element of that array was counted
		n       int
	)
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch c {
		case ' ', '\t', '\n', '\r', ':':
			continue
		case ',':
			if depth == 2 && inArray {
				counted = false
			}
			continue
		case '}', ']':
			depth--
			if depth < 2 {
				inArray = false
			}
			continue
		}
		// c starts a value or is part of a literal.
		if depth == 2 && inArray && !counted {
			counted = true
			if n++; n > limit {
				return n
			}
		}
		switch c {
		case '"':
			// Skip to the closing quote: one not preceded by an odd
			// number of backslashes.
			for {
				k := bytes.IndexByte(p[i+1:], '"')
				if k < 0 {
					return n
				}
				i += 1 + k
				bs := 0
				for b := i - 1; b >= 0 && p[b] == '\\'; b-- {
					bs++
				}
				if bs%2 == 0 {
					break
				}
			}
		case '{', '[':
			depth++
			if depth == 2 {
				inArray, counted = c == '[', false
			}
		}
	}
	return n
}

type indexBuilder struct {
	ix          *Index
	nextID      uint64
	hardlinks   []*TOCEntry       // resolved after all entries are known
	linkTo      map[string]string // hardlink name -> cleaned target name
	lastReg     *Node             // the file that "chunk" entries continue
	lastName    string
	sizeSoFar   int64 // plain bytes covered by lastReg's chunks so far
	implicit    int   // directories created only because names imply them
	maxImplicit int
	// Owner names seen so far by uid and gid: writers may record a name
	// only on the first entry with a given id (the upstream builder does).
	unames, gnames map[int]string
}

func buildIndex(toc *TOC, payloadEnd int64) (*Index, error) {
	if toc.Version != 1 {
		return nil, errorf(ErrFormat, "", -1, "TOC version %d, want 1", toc.Version)
	}
	ix := &Index{
		TOC:         toc,
		PrefetchEnd: -1,
		PayloadEnd:  payloadEnd,
		nodes:       make(map[string]*Node, len(toc.Entries)+1),
	}
	b := &indexBuilder{ix: ix, nextID: 1, maxImplicit: len(toc.Entries) + implicitDirSlack}
	ix.root = b.newNode("", TypeDir)
	ix.root.Mode = 0o755
	ix.nodes[""] = ix.root

	for _, e := range toc.Entries {
		if e == nil {
			return nil, errorf(ErrFormat, "", -1, "null TOC entry")
		}
		if err := b.add(e); err != nil {
			return nil, err
		}
	}
	if err := b.finishFile(); err != nil {
		return nil, err
	}
	for _, e := range b.hardlinks {
		if err := b.addHardlink(e); err != nil {
			return nil, err
		}
	}
	if err := b.computeExtents(); err != nil {
		return nil, err
	}
	for _, n := range ix.nodes {
		if n.Type == TypeDir && len(n.children) > 0 && n.names == nil {
			n.names = make([]string, 0, len(n.children))
			for name := range n.children {
				n.names = append(n.names, name)
			}
			sort.Strings(n.names)
		}
	}
	return ix, nil
}

func (b *indexBuilder) newNode(name, typ string) *Node {
	n := &Node{ID: b.nextID, Name: name, Type: typ, NumLink: 1, ModTime: time.Unix(0, 0).UTC()}
	if typ == TypeDir {
		n.NumLink = 2
	}
	b.nextID++
	b.ix.count++
	return n
}

// parentDir returns the directory that will hold name, creating implicit
// directories for missing ancestors.
func (b *indexBuilder) parentDir(name string) (*Node, error) {
	dir := path.Dir(name)
	if dir == "." {
		return b.ix.root, nil
	}
	if p, ok := b.ix.nodes[dir]; ok {
		if p == nil { // reserved for a hardlink, which never names a directory
			return nil, errorf(ErrFormat, name, -1, "parent %q is a hardlink, not a directory", dir)
		}
		if p.Type != TypeDir {
			return nil, errorf(ErrFormat, name, -1, "parent %q is a %s, not a directory", dir, p.Type)
		}
		return p, nil
	}
	if b.implicit++; b.implicit > b.maxImplicit {
		return nil, errorf(ErrTOCTooLarge, name, -1, "the TOC implies more than %d directories", b.maxImplicit)
	}
	gp, err := b.parentDir(dir)
	if err != nil {
		return nil, err
	}
	p := b.newNode(dir, TypeDir)
	p.Mode = 0o755
	b.link(gp, path.Base(dir), p)
	b.ix.nodes[dir] = p
	return p, nil
}

func (b *indexBuilder) link(parent *Node, base string, n *Node) {
	if parent.children == nil {
		parent.children = make(map[string]*Node)
	}
	parent.children[base] = n
	if n.Type == TypeDir {
		parent.NumLink++
	}
}

func (b *indexBuilder) add(e *TOCEntry) error {
	name, err := CleanName(e.Name)
	if err != nil {
		return err
	}
	if e.Type == TypeChunk {
		return b.addChunk(name, e)
	}
	if err := b.finishFile(); err != nil {
		return err
	}
	uname, gname := b.ownerNames(e)
	if e.Type == TypeHardlink {
		if name == "" {
			return errorf(ErrFormat, e.Name, -1, "the root cannot be a hardlink")
		}
		if _, dup := b.ix.nodes[name]; dup {
			return errorf(ErrFormat, name, -1, "duplicate entry")
		}
		target, err := CleanName(e.LinkName)
		if err != nil {
			return err
		}
		// Reserve the name so duplicates are caught; resolved later.
		b.ix.nodes[name] = nil
		b.hardlinks = append(b.hardlinks, e)
		if b.linkTo == nil {
			b.linkTo = make(map[string]string)
		}
		b.linkTo[name] = target
		return nil
	}
	switch e.Type {
	case TypeDir, TypeReg, TypeSymlink, TypeChar, TypeBlock, TypeFifo:
	default:
		return errorf(ErrFormat, name, -1, "unknown entry type %q", e.Type)
	}
	var n *Node
	if existing, ok := b.ix.nodes[name]; ok {
		// Only a directory first created implicitly (as an ancestor of an
		// earlier entry) or the root may be described later.
		if existing == nil || existing.explicit || e.Type != TypeDir || existing.Type != TypeDir {
			return errorf(ErrFormat, name, -1, "duplicate entry")
		}
		n = existing
	} else {
		parent, err := b.parentDir(name)
		if err != nil {
			return err
		}
		n = b.newNode(name, e.Type)
		b.link(parent, path.Base(name), n)
		b.ix.nodes[name] = n
	}
	if err := setAttrs(n, name, e); err != nil {
		return err
	}
	n.Uname, n.Gname = uname, gname
	if e.Type == TypeReg {
		if e.Size < 0 || e.Size > maxFileSize {
			return errorf(ErrFormat, name, -1, "file size %d out of range", e.Size)
		}
		n.Size = e.Size
		if e.Digest != "" {
			d, err := parseDigest(e.Digest)
			if err != nil {
				return wrapErr(ErrFormat, name, -1, err, "bad file digest")
			}
			n.Digest = d
		}
		switch path.Base(name) {
		case PrefetchLandmark:
			if path.Dir(name) == "." {
				b.ix.PrefetchEnd = e.Offset
			}
		case NoPrefetchLandmark:
			if path.Dir(name) == "." {
				b.ix.NoPrefetch = true
			}
		}
		b.lastReg, b.lastName, b.sizeSoFar = n, name, 0
		if e.Size > 0 {
			return b.addChunk(name, e)
		}
		if e.Offset != 0 || e.ChunkSize != 0 || e.ChunkDigest != "" {
			// Tolerated but meaningless on an empty file.
			n.Chunks = nil
		}
	}
	return nil
}

// ownerNames returns e's user and group names, filled in from earlier
// entries with the same uid or gid when e omits them.
func (b *indexBuilder) ownerNames(e *TOCEntry) (string, string) {
	if b.unames == nil {
		b.unames, b.gnames = make(map[int]string), make(map[int]string)
	}
	fill := func(m map[int]string, id int, name string) string {
		if name == "" {
			return m[id]
		}
		m[id] = name
		return name
	}
	return fill(b.unames, e.UID, e.Uname), fill(b.gnames, e.GID, e.Gname)
}

func setAttrs(n *Node, name string, e *TOCEntry) error {
	if e.UID < 0 || e.GID < 0 || int64(e.UID) > 1<<32-1 || int64(e.GID) > 1<<32-1 {
		return errorf(ErrFormat, name, -1, "uid/gid %d/%d out of range", e.UID, e.GID)
	}
	if e.DevMajor < 0 || e.DevMinor < 0 || int64(e.DevMajor) > 1<<32-1 || int64(e.DevMinor) > 1<<32-1 {
		return errorf(ErrFormat, name, -1, "device numbers %d,%d out of range", e.DevMajor, e.DevMinor)
	}
	mt, err := parseModTime(e.ModTime3339)
	if err != nil {
		return wrapErr(ErrFormat, name, -1, err, "bad modtime")
	}
	for k := range e.Xattrs {
		if k == "" || strings.IndexByte(k, 0) >= 0 {
			return errorf(ErrFormat, name, -1, "bad xattr name %q", k)
		}
	}
	if e.Type == TypeSymlink && (e.LinkName == "" || strings.IndexByte(e.LinkName, 0) >= 0) {
		return errorf(ErrFormat, name, -1, "symlink target %q is empty or has a NUL byte", e.LinkName)
	}
	n.explicit = true
	n.Mode = uint32(e.Mode) & 0o7777
	n.UID, n.GID = uint32(e.UID), uint32(e.GID)
	n.Uname, n.Gname = e.Uname, e.Gname
	n.ModTime = mt
	n.LinkName = e.LinkName
	n.DevMajor, n.DevMinor = uint32(e.DevMajor), uint32(e.DevMinor)
	if len(e.Xattrs) > 0 {
		n.Xattrs = e.Xattrs
	}
	return nil
}

// addChunk appends the chunk described by e (a "reg" entry's first chunk
// or a "chunk" entry) to the current file.
func (b *indexBuilder) addChunk(name string, e *TOCEntry) error {
	n := b.lastReg
	if n == nil || name != b.lastName {
		return errorf(ErrFormat, name, e.Offset, "chunk entry does not follow its file's reg entry")
	}
	if e.ChunkOffset != b.sizeSoFar {
		if e.ChunkOffset < b.sizeSoFar {
			return errorf(ErrFormat, name, e.ChunkOffset, "chunk overlaps the previous chunk (which ends at %d)", b.sizeSoFar)
		}
		return errorf(ErrFormat, name, e.ChunkOffset, "gap before chunk: previous chunk ends at %d", b.sizeSoFar)
	}
	if e.ChunkSize < 0 || e.InnerOffset < 0 {
		return errorf(ErrFormat, name, e.ChunkOffset, "negative chunk size or inner offset")
	}
	// Offset 0 is legal: a writer that lets small files share a member
	// (innerOffset) may put the first payload in the blob's first member.
	if e.Offset < 0 || e.Offset >= b.ix.PayloadEnd {
		return errorf(ErrFormat, name, e.ChunkOffset, "chunk member offset %d outside the payload region [0, %d)", e.Offset, b.ix.PayloadEnd)
	}
	d, err := parseDigest(e.ChunkDigest)
	if err != nil {
		return wrapErr(ErrFormat, name, e.ChunkOffset, err, "missing or bad chunkDigest")
	}
	size := e.ChunkSize
	if size == 0 {
		size = n.Size - e.ChunkOffset // last chunk: to the end of the file
	}
	if size <= 0 || size > n.Size-e.ChunkOffset {
		return errorf(ErrFormat, name, e.ChunkOffset, "chunk of %d bytes does not fit in a file of %d bytes", size, n.Size)
	}
	n.Chunks = append(n.Chunks, Chunk{
		FileOffset:  e.ChunkOffset,
		Size:        size,
		Offset:      e.Offset,
		InnerOffset: e.InnerOffset,
		Digest:      d,
	})
	b.sizeSoFar += size
	return nil
}

// finishFile checks that the current file's chunks cover it exactly.
func (b *indexBuilder) finishFile() error {
	n := b.lastReg
	if n == nil {
		return nil
	}
	b.lastReg = nil
	if b.sizeSoFar != n.Size {
		return errorf(ErrFormat, b.lastName, b.sizeSoFar, "chunks cover %d of %d bytes", b.sizeSoFar, n.Size)
	}
	// A one-chunk file's digest is its chunk's: share the string.
	if len(n.Chunks) == 1 && n.Chunks[0].Digest == n.Digest {
		n.Digest = n.Chunks[0].Digest
	}
	return nil
}

func (b *indexBuilder) addHardlink(e *TOCEntry) error {
	name, _ := CleanName(e.Name) // checked in add
	var n *Node
	seen := b.linkTo[name]
	for depth := 0; ; depth++ {
		if depth > maxHardlinkDepth {
			return errorf(ErrFormat, name, -1, "hardlink chain through %q is too long or cyclic", e.LinkName)
		}
		t, ok := b.ix.nodes[seen]
		if !ok {
			return errorf(ErrFormat, name, -1, "hardlink target %q does not exist", e.LinkName)
		}
		if t != nil {
			n = t
			break
		}
		// The target is itself an unresolved hardlink: follow it.
		seen = b.linkTo[seen]
	}
	if n.Type == TypeDir {
		return errorf(ErrFormat, name, -1, "hardlink to directory %q", e.LinkName)
	}
	parent, err := b.parentDir(name)
	if err != nil {
		return err
	}
	b.link(parent, path.Base(name), n)
	b.ix.nodes[name] = n
	n.NumLink++
	return nil
}

// computeExtents gives every chunk the end of its compressed member: the
// next larger member offset in the blob, or the end of the payload region.
func (b *indexBuilder) computeExtents() error {
	var offsets []int64
	for _, e := range b.ix.TOC.Entries {
		if e.Offset >= 0 && (e.Type == TypeChunk || (e.Type == TypeReg && e.Size > 0)) {
			offsets = append(offsets, e.Offset)
		}
	}
	slices.Sort(offsets)
	offsets = slices.Compact(offsets)
	for name, n := range b.ix.nodes {
		if n == nil {
			return errorf(ErrFormat, name, -1, "unresolved hardlink")
		}
		if n.Type != TypeReg || n.Name != name {
			continue
		}
		for i := range n.Chunks {
			c := &n.Chunks[i]
			j, _ := slices.BinarySearch(offsets, c.Offset)
			if j+1 < len(offsets) {
				c.End = offsets[j+1]
			} else {
				c.End = b.ix.PayloadEnd
			}
		}
	}
	return nil
}

// String describes a chunk for log lines.
func (c Chunk) String() string {
	return fmt.Sprintf("chunk [%d,+%d) at blob [%d,%d) %s", c.FileOffset, c.Size, c.Offset, c.End, c.Digest)
}

// parseDigest validates a TOC digest. sha256 digests, all that eStargz
// writers produce, are checked by hand (digest.Parse's regular expression
// is most of the time an index of a large TOC takes); others go through
// digest.Parse.
func parseDigest(s string) (digest.Digest, error) {
	const prefix = "sha256:"
	if len(s) == len(prefix)+64 && s[:len(prefix)] == prefix {
		for i := len(prefix); i < len(s); i++ {
			if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				return "", fmt.Errorf("invalid sha256 digest %q: bad character %q", s, c)
			}
		}
		return digest.Digest(s), nil
	}
	return digest.Parse(s)
}

// decodeTOC decodes TOC JSON with goccy/go-json, about three times as fast
// as encoding/json on large TOCs (it decides how long a large layer's mount
// takes). A panic inside the decoder on hostile input is an error, not a
// crash.
func decodeTOC(b []byte) (toc *TOC, err error) {
	defer func() {
		if r := recover(); r != nil {
			toc, err = nil, errors.New("malformed JSON")
		}
	}()
	toc = new(TOC)
	if err := gojson.Unmarshal(b, toc); err != nil {
		return nil, err
	}
	return toc, nil
}
