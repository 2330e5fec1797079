package remote_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// fixture is a registry with one image of one layer, and a client.
type fixture struct {
	reg  *remotetest.Registry
	img  remotetest.Image
	data []byte
	r    *remote.Registry
	ev   *events
}

func newFixture(t *testing.T, size int, opts remote.Options, regOpts ...remotetest.Option) *fixture {
	t.Helper()
	f := &fixture{reg: remotetest.NewRegistry(t, regOpts...), data: randomBytes(size, uint64(size)), ev: &events{}}
	f.img = f.reg.PushImage(t, "app", "v1", remotetest.Layer{Data: f.data})
	if opts.OnFetch == nil {
		opts.OnFetch = f.ev.add
	}
	f.r = newClient(t, opts)
	return f
}

func (f *fixture) layer() ocispec.Descriptor { return f.img.Layers[0] }

func (f *fixture) open(t *testing.T) *remote.Blob {
	t.Helper()
	b, err := f.r.OpenBlob(context.Background(), f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readAt reads n bytes at off and checks them.
func (f *fixture) readAt(t *testing.T, ctx context.Context, b *remote.Blob, off, n int64) error {
	t.Helper()
	p := make([]byte, n)
	_, err := b.ReadAt(ctx, p, off)
	if err == nil && !bytes.Equal(p, f.data[off:off+n]) {
		t.Fatalf("wrong bytes at %d+%d", off, n)
	}
	return err
}

func TestRetry5xxBurst(t *testing.T) {
	f := newFixture(t, 100_000, remote.Options{})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 3, Status: 503})
	if err := f.readAt(t, context.Background(), b, 10, 1000); err != nil {
		t.Fatal(err)
	}
	if n := f.reg.Count(remotetest.RangeGETs); n != 4 {
		t.Fatalf("%d range requests, want 4", n)
	}
	var attempts []int
	for _, e := range f.ev.list() {
		if e.Op == "range" {
			attempts = append(attempts, e.Attempt)
		}
	}
	if len(attempts) != 4 || attempts[3] != 4 {
		t.Fatalf("attempts reported %v", attempts)
	}
}

func TestGiveUpIsPromptAndClear(t *testing.T) {
	f := newFixture(t, 100_000, remote.Options{Retries: 3})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: 502})
	start := time.Now()
	err := f.readAt(t, context.Background(), b, 1000, 24)
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("want unavailable: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("gave up after %v", d)
	}
	t.Log(err)
	mustContain(t, err, "read bytes=1000-1023 of", f.reg.Host()+"/app@"+f.layer().Digest.String(),
		"HTTP 502", "UNAVAILABLE", "injected fault", "gave up after 4 attempts")
	if n := f.reg.Count(remotetest.RangeGETs); n != 4 {
		t.Fatalf("%d attempts, want 4", n)
	}

	// Not retried: 403.
	f.reg.ClearFaults()
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: 403})
	f.reg.ResetRequests()
	err = f.readAt(t, context.Background(), b, 0, 1)
	if !errdefs.IsPermissionDenied(err) || f.reg.Count(remotetest.RangeGETs) != 1 {
		t.Fatalf("403: %v after %d requests", err, f.reg.Count(remotetest.RangeGETs))
	}
}

func TestRetryAfter(t *testing.T) {
	f := newFixture(t, 10_000, remote.Options{RetryBackoff: time.Millisecond})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 1, Status: 429, RetryAfter: "1"})
	start := time.Now()
	if err := f.readAt(t, context.Background(), b, 0, 100); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("Retry-After ignored: retried after %v", d)
	}

	// A Retry-After beyond any reasonable wait: give up at once.
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: 429, RetryAfter: "86400"})
	start = time.Now()
	err := f.readAt(t, context.Background(), b, 0, 100)
	if !errdefs.IsResourceExhausted(err) || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt resource exhausted: %v", err)
	}
	mustContain(t, err, "HTTP 429", "TOOMANYREQUESTS", "retry after 24h0m0s")

	// A Retry-After beyond the caller's deadline: give up at once too.
	f.reg.ClearFaults()
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: 503, RetryAfter: "30"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start = time.Now()
	err = f.readAt(t, ctx, b, 0, 100)
	if err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt failure: %v after %v", err, time.Since(start))
	}
	mustContain(t, err, "HTTP 503", "deadline too close")
}

func TestSlowHeadersTimeOutAndRetry(t *testing.T) {
	f := newFixture(t, 10_000, remote.Options{RequestTimeout: 500 * time.Millisecond})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 2, Delay: 5 * time.Second})
	start := time.Now()
	if err := f.readAt(t, context.Background(), b, 0, 100); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("took %v", d)
	}
	if n := f.reg.Count(remotetest.RangeGETs); n < 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
}

func TestStalledBodyTimesOutButSlowBodyDoesNot(t *testing.T) {
	f := newFixture(t, 20_000, remote.Options{RequestTimeout: time.Second})
	b := f.open(t)

	// 14 KB at 10 KB/s: 1.4s in total, more than the timeout, but
	// always progressing (a chunk every 50ms): no retry.
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 1, BytesPerSecond: 10_000})
	if err := f.readAt(t, context.Background(), b, 0, 14_000); err != nil {
		t.Fatal(err)
	}
	if n := f.reg.Count(remotetest.RangeGETs); n != 1 {
		t.Fatalf("slow body retried: %d requests: %+v", n, f.ev.list())
	}

	// 1 byte per second: a stall. Retried, then served normally.
	f.reg.ResetRequests()
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 1, BytesPerSecond: 1})
	start := time.Now()
	if err := f.readAt(t, context.Background(), b, 0, 10_000); err != nil {
		t.Fatal(err)
	}
	if n := f.reg.Count(remotetest.RangeGETs); n != 2 || time.Since(start) > 5*time.Second {
		t.Fatalf("stall: %d requests in %v", n, time.Since(start))
	}
	var timedOut bool
	for _, e := range f.ev.list() {
		timedOut = timedOut || (e.Err != nil && strings.Contains(e.Err.Error(), "no progress for 1s"))
	}
	if !timedOut {
		t.Fatal("no event reports the stall")
	}
}

func TestTruncatedAndDroppedRangeReads(t *testing.T) {
	f := newFixture(t, 100_000, remote.Options{})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 2, CutAfter: 500})
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 2, Drop: true})
	if err := f.readAt(t, context.Background(), b, 100, 5000); err != nil {
		t.Fatal(err)
	}
	if n := f.reg.Count(remotetest.RangeGETs); n != 5 {
		t.Fatalf("%d requests, want 5", n)
	}
	var truncated bool
	for _, e := range f.ev.list() {
		truncated = truncated || (e.Err != nil && strings.Contains(e.Err.Error(), "unexpected EOF"))
	}
	if !truncated {
		t.Fatalf("truncation not reported: %+v", f.ev.list())
	}
}

func TestFetchResumesAfterCut(t *testing.T) {
	f := newFixture(t, 1<<20, remote.Options{})
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, Times: 2, CutAfter: 300_000})
	rc, err := f.r.Fetch(context.Background(), f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, f.data) {
		t.Fatalf("Fetch after cuts: %v (%d bytes)", err, len(got))
	}
	var ranges []string
	for _, q := range f.reg.Requests() {
		if remotetest.BlobGETs(q) {
			ranges = append(ranges, q.Range)
		}
	}
	if strings.Join(ranges, ",") != ",bytes=300000-,bytes=600000-" {
		t.Fatalf("resume ranges %q", ranges)
	}

	// Resuming against a server that ignores Range: skip forward.
	f.reg.ResetRequests()
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, Times: 1, CutAfter: 400_000})
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, IgnoreRange: true})
	rc, err = f.r.Fetch(context.Background(), f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	got, err = io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, f.data) {
		t.Fatalf("Fetch with Range ignored: %v (%d bytes)", err, len(got))
	}
}

func TestFetchCorruptManifestRetried(t *testing.T) {
	f := newFixture(t, 1000, remote.Options{})
	f.reg.Inject(remotetest.Fault{Match: remotetest.ManifestGETs, Times: 1, Corrupt: true})
	img, err := f.r.Resolve(context.Background(), f.reg.Ref("app", f.img.ManifestDesc.Digest.String()), nil)
	if err != nil || img.ManifestDesc.Digest != f.img.ManifestDesc.Digest {
		t.Fatalf("resolve with a corrupted answer: %v", err)
	}
	if n := f.reg.Count(remotetest.ManifestGETs); n != 2 {
		t.Fatalf("%d manifest requests, want 2", n)
	}
	f.reg.Inject(remotetest.Fault{Match: remotetest.ManifestGETs, Corrupt: true})
	_, err = f.r.Resolve(context.Background(), f.reg.Ref("app", f.img.ManifestDesc.Digest.String()), nil)
	if !errdefs.IsDataLoss(err) {
		t.Fatalf("want data loss: %v", err)
	}
}

func TestRegistryDisappears(t *testing.T) {
	f := newFixture(t, 1<<20, remote.Options{RequestTimeout: time.Second, Retries: 3})
	b := f.open(t)

	// Mid-stream: the listener and connections go away.
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, BytesPerSecond: 200_000})
	rc, err := f.r.Fetch(context.Background(), f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(rc, make([]byte, 10_000)); err != nil {
		t.Fatal(err)
	}
	f.reg.Stop()
	start := time.Now()
	_, err = io.ReadAll(rc)
	if !errdefs.IsUnavailable(err) || time.Since(start) > 3*time.Second {
		t.Fatalf("want prompt unavailable, got %v after %v", err, time.Since(start))
	}
	t.Log(err)
	mustContain(t, err, f.reg.Host(), f.layer().Digest.String(), "refused")

	// Range reads while it is away fail promptly, and work again when it
	// comes back.
	start = time.Now()
	err = f.readAt(t, context.Background(), b, 0, 10)
	if !errdefs.IsUnavailable(err) || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt unavailable, got %v after %v", err, time.Since(start))
	}
	f.reg.ClearFaults()
	f.reg.Start(t)
	if err := f.readAt(t, context.Background(), b, 0, 10); err != nil {
		t.Fatal(err)
	}

	// Comes back while we retry.
	f.reg.Stop()
	go func() {
		time.Sleep(50 * time.Millisecond)
		f.reg.Start(t)
	}()
	r2 := newClient(t, remote.Options{RetryBackoff: 50 * time.Millisecond})
	b2, err := r2.OpenBlob(context.Background(), f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	if err := f.readAt(t, context.Background(), b2, 5, 10); err != nil {
		t.Fatal(err)
	}
}

func TestContextCancellation(t *testing.T) {
	f := newFixture(t, 10_000, remote.Options{RetryBackoff: 10 * time.Second})
	b := f.open(t)

	// Waiting for headers.
	remove := f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Delay: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	start := time.Now()
	err := f.readAt(t, ctx, b, 0, 10)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt deadline exceeded, got %v after %v", err, time.Since(start))
	}
	remove()

	// Waiting between retries.
	remove = f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Status: 500})
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start = time.Now()
	err = f.readAt(t, ctx, b, 0, 10)
	if !errors.Is(err, context.Canceled) || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt cancellation, got %v after %v", err, time.Since(start))
	}
	mustContain(t, err, "HTTP 500")
	remove()

	// Reading a stream.
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, BytesPerSecond: 1000})
	ctx, cancel = context.WithCancel(context.Background())
	rc, err := f.r.Fetch(ctx, f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(100*time.Millisecond, cancel)
	start = time.Now()
	_, err = io.ReadAll(rc)
	if !errors.Is(err, context.Canceled) || time.Since(start) > 2*time.Second {
		t.Fatalf("want prompt cancellation, got %v after %v", err, time.Since(start))
	}
}

func TestRedirectToObjectStorage(t *testing.T) {
	f := newFixture(t, 200_000, remote.Options{Credentials: func(string) (string, string, error) { return "alice", "secret", nil }},
		remotetest.WithBasicAuth("alice", "secret"))
	store := f.reg.RedirectBlobs(t, time.Minute)
	b := f.open(t) // HEAD: redirected, not remembered (signed for HEAD only)
	ctx := context.Background()

	for i := range 3 {
		if err := f.readAt(t, ctx, b, int64(i*1000), 500); err != nil {
			t.Fatal(err)
		}
	}
	isStore := func(method string) func(remotetest.Request) bool {
		return func(q remotetest.Request) bool { return q.Server == "objectstore" && q.Method == method }
	}
	if n := f.reg.Count(remotetest.BlobGETs); n != 1 {
		t.Fatalf("registry asked %d times, want once (redirect remembered)", n)
	}
	if n := f.reg.Count(isStore("GET")); n != 3 {
		t.Fatalf("object store GETs %d, want 3", n)
	}
	if n := f.reg.Count(isStore("HEAD")); n != 1 {
		t.Fatalf("object store HEADs %d, want 1", n)
	}
	for _, q := range f.reg.Requests() {
		if q.Server == "objectstore" && (q.Authorization != "" || q.Status >= 400) {
			t.Fatalf("object store request %+v", q)
		}
		if q.Server == "registry" && q.Status != 401 && q.Authorization == "" {
			t.Fatalf("registry request without credentials %+v", q)
		}
	}

	// The signed URLs expire: 403, then back to the registry.
	store.ExpireAll()
	f.reg.ResetRequests()
	if err := f.readAt(t, ctx, b, 5000, 500); err != nil {
		t.Fatal(err)
	}
	var seq []string
	for _, q := range f.reg.Requests() {
		seq = append(seq, q.Server+":"+q.Method+":"+strconv.Itoa(q.Status))
	}
	if strings.Join(seq, " ") != "objectstore:GET:403 registry:GET:307 objectstore:GET:206" {
		t.Fatalf("after expiry: %v", seq)
	}

	// TTL-based expiry, and Fetch through redirects.
	store.SetTTL(50 * time.Millisecond)
	store.ExpireAll()
	if err := f.readAt(t, ctx, b, 0, 10); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if err := f.readAt(t, ctx, b, 10, 10); err != nil {
		t.Fatal(err)
	}
	rc, err := f.r.Fetch(ctx, f.img.Ref, f.layer())
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, f.data) {
		t.Fatalf("Fetch via redirect: %v", err)
	}

	// The object store is down: back to the registry, whose new
	// redirect works again once it is back up.
	f.reg.Inject(remotetest.Fault{Match: remotetest.ObjectStoreGETs, Times: 1, Drop: true})
	if err := f.readAt(t, ctx, b, 20, 10); err != nil {
		t.Fatal(err)
	}
}

func TestServerIgnoringRange(t *testing.T) {
	// Small blob: downloaded once, verified, kept.
	f := newFixture(t, 50_000, remote.Options{})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, IgnoreRange: true})
	for i := range 5 {
		if err := f.readAt(t, context.Background(), b, int64(i*7000), 3000); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.reg.Count(remotetest.BlobGETs); n != 1 {
		t.Fatalf("%d downloads, want 1", n)
	}

	// Large blob: a clear error, remembered.
	f = newFixture(t, 50_000, remote.Options{MaxWholeBlob: 10_000})
	b = f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.BlobGETs, IgnoreRange: true})
	err := f.readAt(t, context.Background(), b, 100, 10)
	if !errors.Is(err, remote.ErrRangeUnsupported) || !errdefs.IsNotImplemented(err) {
		t.Fatalf("want ErrRangeUnsupported: %v", err)
	}
	t.Log(err)
	mustContain(t, err, f.reg.Host(), f.layer().Digest.String(), "ignores HTTP Range", "HTTP 200")
	err = f.readAt(t, context.Background(), b, 200, 10)
	if !errors.Is(err, remote.ErrRangeUnsupported) {
		t.Fatalf("want ErrRangeUnsupported again: %v", err)
	}
	mustContain(t, err, "bytes=200-209")
	if n := f.reg.Count(remotetest.BlobGETs); n != 1 {
		t.Fatalf("%d downloads, want 1", n)
	}
	// Asking for the whole blob is still fine.
	if err := f.readAt(t, context.Background(), b, 0, 50_000); !errors.Is(err, remote.ErrRangeUnsupported) {
		t.Fatalf("remembered: %v", err)
	}
}

func TestMultipartByteranges(t *testing.T) {
	f := newFixture(t, 100_000, remote.Options{})
	b := f.open(t)
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Multipart: true})
	for _, rg := range [][2]int64{{0, 1}, {10, 2}, {999, 5000}, {99_000, 1000}} {
		if err := f.readAt(t, context.Background(), b, rg[0], rg[1]); err != nil {
			t.Fatalf("%v: %v", rg, err)
		}
	}
	out, err := b.ReadRanges(context.Background(), []remote.Range{{Offset: 5, Length: 10}, {Offset: 50_000, Length: 100}})
	if err != nil || !bytes.Equal(out[1], f.data[50_000:50_100]) {
		t.Fatalf("ReadRanges multipart: %v", err)
	}
	// A truncated multipart body is retried.
	f.reg.ClearFaults()
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Times: 1, Multipart: true, CutAfter: 300})
	f.reg.Inject(remotetest.Fault{Match: remotetest.RangeGETs, Multipart: true})
	if err := f.readAt(t, context.Background(), b, 20_000, 2000); err != nil {
		t.Fatal(err)
	}
}
