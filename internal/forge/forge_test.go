package forge

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/lazypull/lazypull/estargz"
)

// The forged blob opens, its TOC digest is the one returned, and the
// victim reads the source's bytes with every chunk verified.
func TestServeOtherFile(t *testing.T) {
	var src bytes.Buffer
	tw := tar.NewWriter(&src)
	for _, f := range []struct{ name, data string }{{"bin/x", "good"}, {"zz/y", "evil!"}} {
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.data))})
		tw.Write([]byte(f.data))
	}
	tw.Close()
	var blob bytes.Buffer
	if _, err := estargz.Build(context.Background(), &blob, &src, estargz.BuildOptions{}); err != nil {
		t.Fatal(err)
	}
	forged, toc, err := ServeOtherFile(blob.Bytes(), "bin/x", "zz/y")
	if err != nil {
		t.Fatal(err)
	}
	r, err := estargz.Open(bytes.NewReader(forged), int64(len(forged)), estargz.OpenOptions{TOCDigest: toc})
	if err != nil {
		t.Fatalf("forged blob does not open with its TOC digest: %v", err)
	}
	f, err := r.OpenFile("bin/x")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(f)
	if err != nil || string(got) != "evil!" {
		t.Fatalf("bin/x of the forged blob reads %q, %v", got, err)
	}
	if _, _, err := ServeOtherFile(blob.Bytes(), "bin/x", "missing"); err == nil {
		t.Fatal("forging with a missing source file succeeded")
	}
}
