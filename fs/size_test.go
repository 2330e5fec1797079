package fs_test

import (
	"testing"

	"github.com/lazypull/lazypull/internal/fixture"
)

// LayerSize is the layer's tar size as the TOC describes it, whatever
// the converter; it is what kubelet sees as the remote snapshot's usage.
func TestLayerSize(t *testing.T) {
	e := newEnv(t, envOptions{})
	fx := newFixture(t, []fixture.Entry{
		fixture.Dir("etc", 0o755),
		fixture.Reg("etc/big", 0o644, fixture.Random(1, 100_000)),
		fixture.Reg("etc/small", 0o644, []byte("x")),
		fixture.Reg("etc/empty", 0o644, nil),
		fixture.Hardlink("etc/link", "etc/big"),
		fixture.Symlink("s", "etc/small"),
	})
	// Headers: etc, etc/big, etc/empty, etc/link, etc/small, s; contents
	// padded to 512; two closing blocks.
	want := int64(6*512 + (100_000+511)/512*512 + 512 + 1024)
	for _, c := range []converter{oursGzip, upstreamZstd} {
		dir, _ := e.mount(t, e.push(t, "size-"+c.name, c.build(t, fx.tar, 16<<10, nil)))
		got, ok := e.mgr.LayerSize(dir)
		if !ok || got != want {
			t.Errorf("%s: LayerSize = %d %v, want %d", c.name, got, ok, want)
		}
	}
	if _, ok := e.mgr.LayerSize(t.TempDir()); ok {
		t.Error("LayerSize of a directory with nothing mounted")
	}
}
