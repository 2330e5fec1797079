// Later-wins replacement: when a layer holds the same name more than once,
// extraction leaves the last one (and a non-directory replacing a directory
// removes everything below it). The TOC must show what extraction leaves.

package estargz

import (
	"strings"
)

// dedupeTOC drops entries that a later entry of the same name replaces (a
// file's chunk entries go with it), and entries below a directory that a
// later non-directory replaces, so the TOC shows what extraction leaves.
func dedupeTOC(entries []*TOCEntry) []*TOCEntry {
	names := make([]string, len(entries))
	isDir := make([]bool, len(entries))
	for i, e := range entries {
		names[i], _ = CleanName(e.Name)
		isDir[i] = e.Type == TypeDir
		if e.Type == TypeChunk {
			names[i] = "" // never a key: follows its reg entry
		}
	}
	keep := survivors(names, isDir, func(i int) bool { return entries[i].Type == TypeChunk })
	out := entries[:0]
	for i, e := range entries {
		if keep[i] {
			out = append(out, e)
		}
	}
	return out
}

// survivors decides which of a sequence of named entries remain after
// later-wins replacement. follower(i) marks entries that belong to the
// entry before them (chunks) and share its fate. A non-directory that
// replaces a directory — declared, or only implied by the names below it —
// removes everything below it, as extraction does.
func survivors(names []string, isDir []bool, follower func(int) bool) []bool {
	keep := make([]bool, len(names))
	alive := make(map[string]int, len(names))
	// kids links every path (alive or only implied) to the paths directly
	// below it, so a replaced subtree is found without scanning all names.
	kids := make(map[string]map[string]struct{})
	link := func(n string) {
		for n != "" {
			i := strings.LastIndexByte(n, '/')
			parent := ""
			if i >= 0 {
				parent = n[:i]
			}
			k := kids[parent]
			if k == nil {
				k = make(map[string]struct{})
				kids[parent] = k
			}
			if _, ok := k[n]; ok {
				return
			}
			k[n] = struct{}{}
			n = parent
		}
	}
	var removeBelow func(string)
	removeBelow = func(n string) {
		for c := range kids[n] {
			if j, ok := alive[c]; ok {
				drop(keep, j, follower)
				delete(alive, c)
			}
			removeBelow(c)
		}
		delete(kids, n)
	}
	owner := -1
	for i, n := range names {
		if follower != nil && follower(i) {
			keep[i] = owner >= 0 && keep[owner]
			continue
		}
		owner = i
		if prev, ok := alive[n]; ok {
			drop(keep, prev, follower)
		}
		if !isDir[i] && n != "" {
			removeBelow(n)
		}
		alive[n] = i
		keep[i] = true
		link(n)
	}
	return keep
}

func drop(keep []bool, i int, follower func(int) bool) {
	keep[i] = false
	if follower == nil {
		return
	}
	for j := i + 1; j < len(keep) && follower(j); j++ {
		keep[j] = false
	}
}
