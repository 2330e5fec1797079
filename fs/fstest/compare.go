package fstest

import (
	"fmt"
	"maps"
	"slices"
	"time"
)

// CompareOptions relax Compare where a producer legitimately differs.
type CompareOptions struct {
	// MtimeRound rounds expected modification times (upstream eStargz
	// records whole seconds, rounded).
	MtimeRound time.Duration
	// IgnoreDirNlink skips directory link counts (overlayfs reports 1 for
	// merged directories).
	IgnoreDirNlink bool
	// Extra, when set, accepts paths that only got has (such as the
	// landmark files a converter adds).
	Extra func(p string) bool
}

// Landmarks accepts the eStargz landmark files at the root.
func Landmarks(p string) bool {
	return p == ".prefetch.landmark" || p == ".no.prefetch.landmark"
}

// Compare lists the differences between an expected and a walked tree:
// missing and unexpected paths, then per path type, mode, owner, size,
// mtime, link target, device numbers, xattrs, link count and content; and
// whether the names of each hardlinked node share one inode (and distinct
// nodes do not).
func Compare(want, got Tree, o CompareOptions) []string {
	var diffs []string
	add := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }
	for _, p := range want.Paths() {
		if _, ok := got[p]; !ok {
			add("%s: missing (want %s)", p, want[p].Kind)
		}
	}
	for _, p := range got.Paths() {
		if _, ok := want[p]; !ok && (o.Extra == nil || !o.Extra(p)) {
			add("%s: unexpected %s", p, got[p].Kind)
		}
	}
	type inode struct{ dev, ino uint64 }
	nodeIno := map[*Node]inode{}
	inoNode := map[inode]*Node{}
	inoPath := map[inode]string{}
	for _, p := range want.Paths() {
		w, g := want[p], got[p]
		if g == nil {
			continue
		}
		if w.Kind != g.Kind {
			add("%s: type %s, want %s", p, g.Kind, w.Kind)
			continue
		}
		if g.Mode != w.Mode {
			add("%s: mode %#o, want %#o", p, g.Mode, w.Mode)
		}
		if g.UID != w.UID || g.GID != w.GID {
			add("%s: owner %d:%d, want %d:%d", p, g.UID, g.GID, w.UID, w.GID)
		}
		if (w.Kind == KindReg || w.Kind == KindSymlink) && g.Size != w.Size {
			add("%s: size %d, want %d", p, g.Size, w.Size)
		}
		wt := w.Mtime
		if o.MtimeRound > 0 {
			wt = wt.Round(o.MtimeRound)
		}
		if !g.Mtime.Equal(wt) {
			add("%s: mtime %s, want %s", p, g.Mtime.Format(time.RFC3339Nano), wt.Format(time.RFC3339Nano))
		}
		if g.Target != w.Target {
			add("%s: link target %q, want %q", p, g.Target, w.Target)
		}
		if (w.Kind == KindChar || w.Kind == KindBlock) && (g.Major != w.Major || g.Minor != w.Minor) {
			add("%s: device %d:%d, want %d:%d", p, g.Major, g.Minor, w.Major, w.Minor)
		}
		if !maps.Equal(g.Xattrs, w.Xattrs) && (len(g.Xattrs) > 0 || len(w.Xattrs) > 0) {
			add("%s: xattrs %s, want %s", p, fmtX(g.Xattrs), fmtX(w.Xattrs))
		}
		if (w.Kind != KindDir || !o.IgnoreDirNlink) && g.Nlink != w.Nlink {
			add("%s: nlink %d, want %d", p, g.Nlink, w.Nlink)
		}
		if w.Kind == KindReg && g.Digest != "" && g.Digest != w.Digest {
			add("%s: content %s, want %s", p, g.Digest, w.Digest)
		}
		if w.Kind == KindDir {
			continue
		}
		in := inode{g.Dev, g.Ino}
		if prev, ok := nodeIno[w]; ok {
			if prev != in {
				add("%s: inode %d, want %d (hardlinked with %s)", p, g.Ino, prev.ino, inoPath[prev])
			}
			continue
		}
		if other, ok := inoNode[in]; ok && other != w {
			add("%s: shares inode %d with %s, which is not a hardlink of it", p, g.Ino, inoPath[in])
			continue
		}
		nodeIno[w], inoNode[in], inoPath[in] = in, w, p
	}
	return diffs
}

func fmtX(x map[string]string) string {
	keys := slices.Sorted(maps.Keys(x))
	s := "{"
	for i, k := range keys {
		if i > 0 {
			s += " "
		}
		v := x[k]
		if len(v) > 40 {
			v = fmt.Sprintf("%.20q...(%d bytes)", v, len(v))
		} else {
			v = fmt.Sprintf("%q", v)
		}
		s += k + "=" + v
	}
	return s + "}"
}
