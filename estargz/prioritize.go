// Prioritization: the files a workload reads at start-up go first, then
// the .prefetch.landmark, then everything else in input order, so that a
// reader can prefetch the start-up set with one range.

package estargz

import (
	"archive/tar"
	"bytes"
	"io"
	"strings"
)

// order puts prioritized entries first — each after its parent directories
// and, for hardlinks, after its target — then the landmark, then the rest
// in input order. It returns the names that were not found.
func (s *spoolFile) order(prioritized []string) ([]*spooledEntry, []string) {
	byName := make(map[string]*spooledEntry, len(s.entries))
	for _, e := range s.entries {
		byName[e.name] = e
	}
	picked := make(map[*spooledEntry]bool)
	var out []*spooledEntry
	var move func(name string, depth int) bool
	move = func(name string, depth int) bool {
		e, ok := byName[name]
		if !ok || depth > maxHardlinkDepth {
			return false
		}
		if picked[e] {
			return true
		}
		// Parents, outermost first.
		parts := strings.Split(name, "/")
		for i := 1; i < len(parts); i++ {
			if p, ok := byName[strings.Join(parts[:i], "/")]; ok && !picked[p] {
				picked[p] = true
				out = append(out, p)
			}
		}
		if e.h.Typeflag == tar.TypeLink {
			if t, err := CleanName(e.h.Linkname); err == nil {
				move(t, depth+1)
			}
		}
		picked[e] = true
		out = append(out, e)
		return true
	}
	var missing []string
	for _, p := range prioritized {
		name, err := CleanName(p)
		if err != nil || !move(name, 0) {
			missing = append(missing, p)
		}
	}
	landmark := NoPrefetchLandmark
	if len(out) > 0 {
		landmark = PrefetchLandmark
	}
	out = append(out, &spooledEntry{h: landmarkHeader(landmark), name: landmark, off: -1})
	for _, e := range s.entries {
		if !picked[e] {
			out = append(out, e)
		}
	}
	return out, missing
}

type spooledSource struct {
	sp    *spoolFile
	order []*spooledEntry
	i     int
}

func (s *spooledSource) next() (*tar.Header, io.Reader, error) {
	if s.i >= len(s.order) {
		return nil, nil, io.EOF
	}
	e := s.order[s.i]
	s.i++
	if e.off < 0 {
		return e.h, bytes.NewReader([]byte{landmarkContents}), nil
	}
	size := int64(0)
	if e.h.Typeflag == tar.TypeReg || e.h.Typeflag == tar.TypeRegA || e.h.Typeflag == tar.TypeGNUSparse || e.h.Typeflag == tar.TypeCont {
		size = e.h.Size
	}
	return e.h, io.NewSectionReader(s.sp.f, e.off, size), nil
}
