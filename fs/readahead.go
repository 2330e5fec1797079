// Read-ahead: what a cache miss suggests will be read next.
//
// A program that reads one file of a directory (a module of a package, a
// library) tends to read its neighbours next, and a file read at one offset
// tends to be read further on. So a miss queues for speculation
// (speculate.go) — never in the request the reader waits for — the chunks
// that follow the missed one in the blob (up to LayerOptions.ReadAhead
// compressed bytes: the rest of a file being read, then the next files),
// then the uncached first chunks of the following files of the same
// directory (up to LayerOptions.DirReadAhead compressed bytes, never spanning more
// than twice that in the blob). The decision is readAheadChunks, a pure
// function of the layer's chunks, the directory index and what is cached.

package fs

import (
	"path"
	"sort"

	"github.com/lazypull/lazypull/estargz"
	"github.com/opencontainers/go-digest"
)

// dirIndex maps chunks to the directories of their files.
type dirIndex struct {
	chunkDir  []string         // directory of each chunk's file
	dirChunks map[string][]int // indexes into chunks, per directory
	// notFirst marks chunks that are not the first of their file:
	// directory read-ahead takes a neighbouring file's first chunk only
	// (all of a small file, the head of a large one).
	notFirst []bool
}

// buildDirIndex builds the layer's directory index; until it is there,
// read-ahead is by blob order only.
func (l *Layer) buildDirIndex() {
	l.dirIndex.Store(newDirIndex(l.index, l.chunks))
}

// newDirIndex maps each of chunks (the index's distinct chunks, in blob
// order) to the directory of the file holding it. A chunk shared by files
// of several directories (identical content) counts for one of them.
func newDirIndex(ix *estargz.Index, chunks []estargz.Chunk) *dirIndex {
	type key struct{ off, inner int64 }
	type where struct {
		dir   string
		first bool
	}
	dirs := make(map[key]where, len(chunks))
	seen := make(map[*estargz.Node]bool)
	ix.Walk(func(name string, n *estargz.Node) bool {
		if n.Type == estargz.TypeReg && !seen[n] {
			seen[n] = true
			for i, c := range n.Chunks {
				k := key{c.Offset, c.InnerOffset}
				if w, ok := dirs[k]; ok && w.first {
					continue // the first chunk of another file too
				}
				dirs[k] = where{path.Dir(name), i == 0}
			}
		}
		return true
	})
	di := &dirIndex{chunkDir: make([]string, len(chunks)), dirChunks: make(map[string][]int), notFirst: make([]bool, len(chunks))}
	for i, c := range chunks {
		w := dirs[key{c.Offset, c.InnerOffset}]
		di.chunkDir[i] = w.dir
		di.notFirst[i] = !w.first
		di.dirChunks[w.dir] = append(di.dirChunks[w.dir], i)
	}
	return di
}

// readAheadGroup returns c and the chunks a miss of it suggests (see
// readAheadChunks).
func (l *Layer) readAheadGroup(c estargz.Chunk) []estargz.Chunk {
	return readAheadChunks(l.chunks, l.dirIndex.Load(), c, l.store.Has, l.opts.DirReadAhead, l.opts.ReadAhead)
}

// readAheadChunks returns c and the chunks a miss of it suggests, most
// likely read first: the chunks that follow c in the blob and end within
// readAhead bytes of its end (its file's next chunks, then the next
// files); then the uncached first chunks of the files of c's directory
// that follow it in the blob (all of a small file, the head of a large
// one: the rest of a large file is read only if its reader gets there),
// up to dirBudget compressed bytes and within
// 2*dirBudget of c's start (a directory whose files are far apart —
// subdirectories sort between them — must not drag in everything
// between), without those listed already. chunks are the layer's
// distinct chunks in blob order; di may be nil (not built yet: no
// directory read-ahead); readAhead <= 0 disables all read-ahead. Whoever
// fetches them skips chunks cached or in flight.
func readAheadChunks(chunks []estargz.Chunk, di *dirIndex, c estargz.Chunk, cached func(digest.Digest) bool, dirBudget, readAhead int64) []estargz.Chunk {
	group := []estargz.Chunk{c}
	if readAhead <= 0 {
		return group
	}
	i := sort.Search(len(chunks), func(i int) bool { return chunks[i].Offset >= c.Offset })
	for i < len(chunks) && chunks[i].Digest != c.Digest {
		i++
	}
	if i == len(chunks) {
		return group
	}
	last := i // the last chunk that follows c in the group
	for j := i + 1; j < len(chunks); j++ {
		next := chunks[j]
		if next.End-c.End > readAhead {
			break
		}
		group = append(group, next)
		last = j
	}
	if di != nil {
		budget := dirBudget
		for _, j := range di.dirChunks[di.chunkDir[i]] {
			next := chunks[j]
			if j <= last || (di.notFirst != nil && di.notFirst[j]) || cached(next.Digest) {
				continue
			}
			if next.End-c.Offset > 2*dirBudget {
				break
			}
			if budget -= next.End - next.Offset; budget < 0 {
				break
			}
			group = append(group, next)
		}
	}
	return group
}
