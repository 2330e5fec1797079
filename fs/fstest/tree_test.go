package fstest

import (
	"slices"
	"testing"
)

// The expectations themselves: what a layer mount and an overlay stack
// must show.
func TestLayerViewAndMerged(t *testing.T) {
	lower := []Entry{
		Dir("./", 0o755),
		Dir("d/", 0o755),
		Reg("d/a", 0o644, []byte("a")),
		Reg("d/b", 0o644, []byte("b")),
		Hardlink("d/a2", "d/a"),
		Dir("o/", 0o755),
		Reg("o/lower", 0o644, nil),
		Reg("f", 0o644, []byte("file")),
		Dir("g/", 0o755),
		Reg("g/x", 0o644, nil),
		Whiteout("", "nothing"),
	}
	upper := []Entry{
		Whiteout("d", "b"),
		Whiteout("d", "a"),
		Reg("d/new", 0o600, nil),
		Whiteout("d", "new"), // the layer's own file wins
		Opaque("o"),
		Reg("o/upper", 0o644, nil),
		Dir("f/", 0o700),
		Reg("g", 0o644, []byte("not a dir any more")),
	}
	v := LayerView(Read(t, Tar(t, upper)))
	for p, kind := range map[string]Kind{"d/b": KindChar, "d/a": KindChar, "d/new": KindReg, "o": KindDir, "o/upper": KindReg, "f": KindDir, "g": KindReg} {
		if v[p] == nil || v[p].Kind != kind {
			t.Errorf("layer view %s: %+v, want %s", p, v[p], kind)
		}
	}
	if x := v["o"].Xattrs; x["trusted.overlay.opaque"] != "y" || x["user.overlay.opaque"] != "" {
		t.Errorf("opaque dir xattrs %v", x)
	}
	if v["d/b"].Mode != 0 || v["d/b"].Major != 0 || v["d/b"].Minor != 0 {
		t.Errorf("whiteout %+v", v["d/b"])
	}
	if _, ok := v["o/.wh..wh..opq"]; ok {
		t.Error("opaque marker visible")
	}
	if v["."].Nlink != 2+3 || v["d"].Nlink != 2 {
		t.Errorf("dir nlink: root %d, d %d", v["."].Nlink, v["d"].Nlink)
	}
	lv := LayerView(Read(t, Tar(t, lower)))
	if lv["d/a"] != lv["d/a2"] || lv["d/a"].Nlink != 2 || lv["nothing"] == nil {
		t.Errorf("lower view: %+v %+v %+v", lv["d/a"], lv["d/a2"], lv["nothing"])
	}

	m := Merged(Read(t, Tar(t, lower)), Read(t, Tar(t, upper)))
	want := []string{".", "d", "d/a2", "d/new", "f", "g", "o", "o/upper"}
	if got := m.Paths(); !slices.Equal(got, want) {
		t.Errorf("merged paths %q, want %q", got, want)
	}
	if m["d/a2"].Nlink != 2 {
		t.Errorf("merged d/a2 nlink %d: the lower inode keeps its links", m["d/a2"].Nlink)
	}
	if x := m["o"].Xattrs; x["trusted.overlay.opaque"] != "" || x["user.overlay.opaque"] != "" {
		t.Errorf("merged opaque dir xattrs %v", x)
	}
	if m["f"].Mode != 0o700 {
		t.Errorf("merged f: %+v", m["f"])
	}
}
