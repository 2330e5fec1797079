package fs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// The streaming pre-check of a large TOC counts exactly the JSON bytes
// ReadTOC would return, refuses a TOC whose parse could not fit beside
// the held indexes, passes one that fits, and leaves nothing charged.
func TestPrescanTOC(t *testing.T) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	long := strings.Repeat("n", 300)
	for i := range 30000 {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("d/%s%06d", long, i), Mode: 0o644}); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if _, err := estargz.Build(context.Background(), &out, bytes.NewReader(tb.Bytes()), estargz.BuildOptions{TempDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	blob := bytes.NewReader(out.Bytes())
	size := int64(out.Len())
	_, tocJSON, err := estargz.ReadTOC(blob, size, estargz.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromBytes(out.Bytes())
	want := parsePeak(int64(len(tocJSON)), tocEntries(tocJSON))

	for _, tc := range []struct {
		limit int64
		fits  bool
	}{{want - 1, false}, {want + 1, true}} {
		b := &MemoryBudget{limit: tc.limit, changed: make(chan struct{})}
		m := &Manager{opts: ManagerOptions{Budget: b}}
		limits, charge, f := m.tocReadCharge(blob, size)
		if f == nil || charge < 2*int64(len(tocJSON)) {
			t.Fatalf("read charge %d (footer %v) for a %d-byte TOC", charge, f, len(tocJSON))
		}
		err := m.prescanTOC(context.Background(), blob, size, f, limits, d)
		switch {
		case tc.fits && err != nil:
			t.Fatalf("budget %d, parse needs %d: %v", tc.limit, want, err)
		case !tc.fits && (!errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "a "+strconv.Itoa(len(tocJSON))+"-byte TOC") || !strings.Contains(err.Error(), d.String())):
			t.Fatalf("budget %d, parse needs %d: %v; want ErrResourceExhausted naming the layer and the TOC's exact size", tc.limit, want, err)
		}
		if held, transient := b.Used(); held != 0 || transient != 0 {
			t.Fatalf("left held %d, transient %d", held, transient)
		}
	}
}
