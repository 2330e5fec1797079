// Read-ahead: what a cache miss pulls in besides the chunk it needs.
//
// A program that reads one file of a directory (a module of a package, a
// library) tends to read its neighbours next, and a file read at one offset
// tends to be read further on. So a miss fetches, in a second request that
// the reader does not wait for, the uncached chunks of the following files
// of the same directory (up to LayerOptions.DirReadAhead compressed bytes,
// never spanning more than twice that in the blob) and the chunks that
// follow in the blob (up to LayerOptions.ReadAhead). The decision is
// readAheadChunks, a pure function of the layer's chunks, the directory
// index and what is cached.

package fs

import (
	"path"
	"sort"

	"github.com/lazypull/lazypull/estargz"
)

// dirIndex maps chunks to the directories of their files.
type dirIndex struct {
	chunkDir  []string         // directory of each chunk's file
	dirChunks map[string][]int // indexes into chunks, per directory
}

func (l *Layer) buildDirIndex() {
	type key struct{ off, inner int64 }
	dirs := make(map[key]string, len(l.chunks))
	seen := make(map[*estargz.Node]bool)
	l.index.Walk(func(name string, n *estargz.Node) bool {
		if n.Type == estargz.TypeReg && !seen[n] {
			seen[n] = true
			for _, c := range n.Chunks {
				dirs[key{c.Offset, c.InnerOffset}] = path.Dir(name)
			}
		}
		return true
	})
	di := &dirIndex{chunkDir: make([]string, len(l.chunks)), dirChunks: make(map[string][]int)}
	for i, c := range l.chunks {
		d := dirs[key{c.Offset, c.InnerOffset}]
		di.chunkDir[i] = d
		di.dirChunks[d] = append(di.dirChunks[d], i)
	}
	l.dirIndex.Store(di)
}

// readAheadGroup returns c and the chunks to fetch alongside it: the
// uncached chunks of the files of c's directory that follow it (a program
// that reads one file of a directory — a module of a package, a library —
// tends to read its neighbours next), up to DirReadAhead compressed bytes,
// then the chunks that follow in the blob within ReadAhead.
func (l *Layer) readAheadGroup(c estargz.Chunk) []estargz.Chunk {
	group := []estargz.Chunk{c}
	if l.opts.ReadAhead <= 0 {
		return group
	}
	i := sort.Search(len(l.chunks), func(i int) bool { return l.chunks[i].Offset >= c.Offset })
	for i < len(l.chunks) && l.chunks[i].Digest != c.Digest {
		i++
	}
	if i == len(l.chunks) {
		return group
	}
	if di := l.dirIndex.Load(); di != nil { // nil: not built yet
		budget := l.opts.DirReadAhead
		for _, j := range di.dirChunks[di.chunkDir[i]] {
			next := l.chunks[j]
			if j <= i || l.store.Has(next.Digest) {
				continue
			}
			// The group is fetched as one range: a directory whose files
			// are far apart (subdirectories sort between them) must not
			// drag in everything between.
			if next.End-c.Offset > 2*l.opts.DirReadAhead {
				break
			}
			if budget -= next.End - next.Offset; budget < 0 {
				break
			}
			group = append(group, next)
		}
	}
	for j := i + 1; j < len(l.chunks); j++ {
		next := l.chunks[j]
		if next.End-c.End > l.opts.ReadAhead {
			break
		}
		group = append(group, next)
	}
	return group
}
