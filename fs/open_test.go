package fs_test

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// Mounting a layer from a registry takes one request (a suffix-range GET
// giving the blob's size, footer and TOC), and the layer's reads use the
// blob opened for it: no HEAD at all.
func TestMountOneRequestNoHead(t *testing.T) {
	e := newEnv(t, envOptions{})
	fx := newFixture(t, fixture.RichLayer(4096))
	b := oursGzip.build(t, fx.tar, 4096, nil)
	src := e.push(t, "one", b)
	e.reg.ResetRequests()
	dir, _ := e.mount(t, src)
	reqs := e.reg.Requests()
	if len(reqs) != 1 || reqs[0].Method != http.MethodGet || !strings.HasPrefix(reqs[0].Range, "bytes=-") {
		t.Fatalf("mount made requests %+v, want one suffix-range GET", reqs)
	}
	for _, p := range fx.want.Files() {
		if len(fx.want[p].Data) > 0 {
			mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
			break
		}
	}
	if n := e.reg.Count(func(q remotetest.Request) bool { return q.Method == http.MethodHead }); n != 0 {
		t.Fatalf("%d HEAD requests", n)
	}
	if n := rangeGETs(e.reg, src.Digest); n < 2 {
		t.Fatalf("%d range GETs: the read fetched nothing", n)
	}
}
