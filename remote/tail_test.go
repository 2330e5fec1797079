package remote_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

func TestOpenBlobTailOneRequest(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int
		n        int64
		descSize bool
	}{
		{"tail of a larger blob", 100_000, 4096, true},
		{"size from Content-Range", 100_000, 4096, false},
		{"tail longer than the blob", 3000, 1 << 20, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, tc.size, remote.Options{})
			desc := f.layer()
			if !tc.descSize {
				desc.Size = 0
			}
			b, tail, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, desc, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if b.Size() != int64(tc.size) {
				t.Fatalf("size %d, want %d", b.Size(), tc.size)
			}
			want := f.data[max(0, int64(tc.size)-tc.n):]
			if !bytes.Equal(tail, want) {
				t.Fatalf("tail of %d bytes, want the last %d", len(tail), len(want))
			}
			reqs := f.reg.Requests()
			if len(reqs) != 1 || reqs[0].Method != http.MethodGet {
				t.Fatalf("requests %+v, want one GET", reqs)
			}
			if err := f.readAt(t, context.Background(), b, 10, 1000); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestOpenBlobTailSizeMismatch(t *testing.T) {
	f := newFixture(t, 10_000, remote.Options{})
	desc := f.layer()
	desc.Size++
	_, _, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, desc, 512)
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("err %v, want failed precondition", err)
	}
}

func TestOpenBlobTailServerIgnoresRange(t *testing.T) {
	f := newFixture(t, 20_000, remote.Options{})
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, IgnoreRange: true})
	b, tail, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, f.layer(), 1000)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tail, f.data[19_000:]) {
		t.Fatal("wrong tail")
	}
	// The (small) blob is kept: later reads need no request.
	f.reg.ResetRequests()
	if err := f.readAt(t, context.Background(), b, 100, 5000); err != nil {
		t.Fatal(err)
	}
	if n := len(f.reg.Requests()); n != 0 {
		t.Fatalf("%d requests after the blob was kept", n)
	}
}

func TestOpenBlobTailLargeBlobServerIgnoresRange(t *testing.T) {
	f := newFixture(t, 50_000, remote.Options{MaxWholeBlob: 10_000})
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, IgnoreRange: true})
	_, _, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, f.layer(), 1000)
	if !errors.Is(err, remote.ErrRangeUnsupported) {
		t.Fatalf("err %v, want ErrRangeUnsupported", err)
	}
}

func TestOpenBlobTailFallsBackToHead(t *testing.T) {
	f := newFixture(t, 30_000, remote.Options{})
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 1, Status: http.StatusRequestedRangeNotSatisfiable})
	b, tail, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, f.layer(), 2000)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size() != 30_000 || !bytes.Equal(tail, f.data[28_000:]) {
		t.Fatalf("size %d, tail of %d bytes", b.Size(), len(tail))
	}
	var heads int
	for _, q := range f.reg.Requests() {
		if q.Method == http.MethodHead {
			heads++
		}
	}
	if heads != 1 {
		t.Fatalf("%d HEADs, want 1 after the unusable suffix answer", heads)
	}
}

func TestOpenBlobTailRetries(t *testing.T) {
	f := newFixture(t, 30_000, remote.Options{})
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 2, Status: 503})
	_, tail, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, f.layer(), 2000)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tail, f.data[28_000:]) {
		t.Fatal("wrong tail")
	}
	if n := f.reg.Count(remotetest.RangeGETs); n != 3 {
		t.Fatalf("%d range GETs, want 3", n)
	}
}

func TestOpenBlobTailNotFound(t *testing.T) {
	f := newFixture(t, 1000, remote.Options{})
	desc := f.layer()
	desc.Digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
	_, _, err := f.r.OpenBlobTail(context.Background(), f.img.Ref, desc, 100)
	if !errdefs.IsNotFound(err) {
		t.Fatalf("err %v, want not found", err)
	}
}

func TestReadRange(t *testing.T) {
	f := newFixture(t, 50_000, remote.Options{})
	b := f.open(t)
	got, err := b.ReadRange(context.Background(), 1000, 4000)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, f.data[1000:5000]) {
		t.Fatal("wrong bytes")
	}
	if _, err := b.ReadRange(context.Background(), 49_000, 2000); !errdefs.IsOutOfRange(err) {
		t.Fatalf("range past the end: %v, want out of range", err)
	}
	if got, err := b.ReadRange(context.Background(), 50_000, 0); err != nil || len(got) != 0 {
		t.Fatalf("empty range at the end: %d bytes, %v", len(got), err)
	}
}
