// Validating the TOC while the Index is built from it: names are
// cleaned and must be unique, types known, chunks must cover their file
// exactly with offsets inside the payload region, hardlinks must point at
// files that exist, and implied directories are bounded.

package estargz

import (
	"path"
	"slices"
	"sort"
	"strings"
	"time"
)

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
	maxChunk    int64 // Limits.MaxChunkSize
	// Owner names seen so far by uid and gid: writers may record a name
	// only on the first entry with a given id (the upstream builder does).
	unames, gnames map[int]string
}

func buildIndex(toc *TOC, payloadEnd, maxChunk int64) (*Index, error) {
	if toc.Version != 1 {
		return nil, errorf(ErrFormat, "", -1, "TOC version %d, want 1", toc.Version)
	}
	ix := &Index{
		TOC:         toc,
		PrefetchEnd: -1,
		PayloadEnd:  payloadEnd,
		nodes:       make(map[string]*Node, len(toc.Entries)+1),
	}
	b := &indexBuilder{ix: ix, nextID: 1, maxImplicit: len(toc.Entries) + implicitDirSlack, maxChunk: maxChunk}
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
	// Reading a chunk holds it in memory whole: bound it, and the inner
	// bytes of its member that are decompressed only to be skipped.
	if size > b.maxChunk || e.InnerOffset > b.maxChunk-size {
		return errorf(ErrTOCTooLarge, name, e.ChunkOffset, "chunk of %d bytes at inner offset %d exceeds the %d-byte chunk limit", size, e.InnerOffset, b.maxChunk)
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
// An extent longer than its member's plain bytes can explain (maxExtent)
// is refused: it would make a read of a few bytes fetch and hold the whole
// gap.
func (b *indexBuilder) computeExtents() error {
	var offsets []int64
	for _, e := range b.ix.TOC.Entries {
		if e.Offset >= 0 && (e.Type == TypeChunk || (e.Type == TypeReg && e.Size > 0)) {
			offsets = append(offsets, e.Offset)
		}
	}
	slices.Sort(offsets)
	offsets = slices.Compact(offsets)
	// The plain bytes of each member, as far as its chunks reach.
	memberPlain := make(map[int64]int64, len(offsets))
	for name, n := range b.ix.nodes {
		if n == nil || n.Type != TypeReg || n.Name != name {
			continue
		}
		for _, c := range n.Chunks {
			memberPlain[c.Offset] = max(memberPlain[c.Offset], c.InnerOffset+c.Size)
		}
	}
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
			if limit := maxExtent(memberPlain[c.Offset]); c.End-c.Offset > limit {
				return errorf(ErrTOCTooLarge, name, c.FileOffset, "chunk's compressed extent [%d,%d) is %d bytes, more than %d for %d plain bytes",
					c.Offset, c.End, c.End-c.Offset, limit, memberPlain[c.Offset])
			}
		}
	}
	return nil
}

// maxExtent is the longest compressed extent accepted for a member of
// plain bytes.
func maxExtent(plain int64) int64 {
	return plain + plain/64 + MaxExtentSlack
}
