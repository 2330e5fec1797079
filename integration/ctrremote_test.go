package integration

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
)

// ctrRemote is Debian's ctr-remote (package stargz-snapshotter, 0.12),
// installed by hack/install-deps.sh.
const ctrRemote = "ctr-remote"

// TestCtrRemoteImagesVerifyClean is the interop half of issue 9's "honest
// images verify clean": the three-layer fixture, pushed as a plain gzip
// image, is converted by a third party's builder — Debian's ctr-remote
// 0.12, a containerd 1.6 client, against the test's containerd 2.4 — to
// gzip eStargz and to zstd:chunked, with its default chunk size and with
// 64 KiB chunks, and pushed back. lazypull's reader opens each TOC against
// its annotation; lazypull pulls each image with whole-layer verification
// on (the default background policy): every layer is mounted lazily,
// containers run, the rootfs equals the source image's files, and every
// layer's verification ends ok, none failed.
func TestCtrRemoteImagesVerifyClean(t *testing.T) {
	if _, err := exec.LookPath(ctrRemote); err != nil {
		t.Fatalf("%s is not installed (hack/install-deps.sh installs Debian's stargz-snapshotter): %v", ctrRemote, err)
	}
	img := threeLayerImage(t)
	want, err := img.ExpectedTree()
	if err != nil {
		t.Fatal(err)
	}
	checkExpectedTree(t, want)

	blobSize := want["data/blob"].Size
	for _, c := range []struct {
		name string
		// args select the conversion after "images convert --oci".
		args []string
		// mediaType is what ctr-remote's converted layers must be.
		mediaType string
		// blobChunks is how many chunks the TOC must cut /data/blob
		// (1 MiB) into: one with ctr-remote's default chunk size (4
		// MiB), many with a small one.
		blobChunks int
	}{
		{"gzip", []string{"--estargz"}, ocispec.MediaTypeImageLayerGzip, 1},
		{"zstdchunked", []string{"--zstdchunked"}, ocispec.MediaTypeImageLayerZstd, 1},
		{"gzip-64k-chunks", []string{"--estargz", "--estargz-chunk-size", "65536"}, ocispec.MediaTypeImageLayerGzip, int(blobSize / 65536)},
		{"zstdchunked-64k-chunks", []string{"--zstdchunked", "--estargz-chunk-size", "65536"}, ocispec.MediaTypeImageLayerZstd, int(blobSize / 65536)},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			reg := lab.NewRegistry(t)
			srcRef := push(t, reg, "ctrremote/src:v1", img)
			dstRef := reg.Ref("ctrremote/" + c.name + ":v1")
			env := newLazyEnv(t, lab.Containerd2(), reg, lazyOptions{BackgroundFetch: true, Verify: true})

			// Convert with ctr-remote in a namespace of its own, so
			// the lazy pull below finds nothing of it.
			cctx := env.c.Namespace(t)
			ctr := func(args ...string) string {
				t.Helper()
				return runCtrRemote(t, cctx, env.c.Address(), args...)
			}
			ctr("images", "pull", "--plain-http", srcRef)
			ctr(append(append([]string{"images", "convert", "--oci"}, c.args...), srcRef, dstRef)...)
			ctr("images", "push", "--plain-http", dstRef)

			// What ctr-remote pushed: every layer converted.
			cimg, err := env.c.Client().GetImage(cctx, dstRef)
			if err != nil {
				t.Fatal(err)
			}
			manifest, err := images.Manifest(cctx, env.c.Client().ContentStore(), cimg.Target(), platforms.Default())
			if err != nil {
				t.Fatal(err)
			}
			if len(manifest.Layers) != len(img.Layers) {
				t.Fatalf("ctr-remote's image has %d layers, want %d", len(manifest.Layers), len(img.Layers))
			}
			for i, l := range manifest.Layers {
				if l.MediaType != c.mediaType || l.Annotations[estargz.TOCDigestAnnotation] == "" {
					t.Fatalf("ctr-remote's layer %d is not converted: %+v", i, l)
				}
				t.Logf("ctr-remote's layer %d: %s %s (%d bytes) %v", i, l.MediaType, l.Digest, l.Size, l.Annotations)
			}
			// Its TOC is lazypull's to read, and cuts files as asked.
			base := manifest.Layers[0]
			ra, err := env.c.Client().ContentStore().ReaderAt(cctx, base)
			if err != nil {
				t.Fatal(err)
			}
			defer ra.Close()
			r, err := estargz.Open(ra, base.Size, estargz.OpenOptions{TOCDigest: digest.Digest(base.Annotations[estargz.TOCDigestAnnotation])})
			if err != nil {
				t.Fatalf("lazypull's reader refuses ctr-remote's base layer: %v", err)
			}
			if n, ok := r.Lookup("data/blob"); !ok || len(n.Chunks) != c.blobChunks {
				t.Fatalf("ctr-remote's TOC: /data/blob %+v, want %d chunks", n, c.blobChunks)
			}

			ctx := env.c.Namespace(t)
			pulled := time.Now()
			image := env.pull(t, ctx, dstRef)
			env.checkRemote(t, ctx, image, true)
			if n := len(env.fuseMounts(t)); n != len(manifest.Layers) {
				t.Errorf("%d FUSE mounts after the pull, want %d: %v", n, len(manifest.Layers), env.fuseMounts(t))
			}
			if out := env.run(t, ctx, image, "cat", "/etc/motd", "/etc/greeting.link"); out != "layer 3\nhello from layer 2\n" {
				t.Errorf("cat: %q", out)
			}
			wantSum := fmt.Sprintf("%s  /data/blob\n", want["data/blob"].Digest.Encoded())
			if out := env.run(t, ctx, image, "sha256sum", "/data/blob"); out != wantSum {
				t.Errorf("sha256sum: %q, want %q", out, wantSum)
			}

			// Every layer's whole-layer verification ends ok.
			n := float64(len(manifest.Layers))
			deadline := time.Now().Add(2 * time.Minute)
			for {
				m := env.metrics(t)
				ok, failed := m[`lazypull_layer_verifications_total{result="ok"}`], m[`lazypull_layer_verifications_total{result="failed"}`]
				if failed > 0 {
					t.Fatalf("%v of ctr-remote's layers failed verification (%v ok)", failed, ok)
				}
				if ok >= n {
					if ok > n {
						t.Errorf("%v layers verified ok, want %v", ok, n)
					}
					t.Logf("%v layers verified ok within %v of the pull", ok, time.Since(pulled).Round(time.Millisecond))
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%v of %v layers verified within 2 minutes of the pull", ok, n)
				}
				time.Sleep(200 * time.Millisecond)
			}
			if m := env.metrics(t); m["lazypull_verify_failures_total"] != 0 {
				t.Errorf("%v chunks failed verification", m["lazypull_verify_failures_total"])
			}
			// Still served lazily after verification, not unpacked.
			env.checkRemote(t, ctx, image, true)

			// The rootfs is the source image's files, apart from
			// the landmark files ctr-remote adds to every layer and
			// (gzip) the TOC entry it writes, which lazypull does not
			// show.
			got, err := env.c.ImageTree(ctx, image, lazypullName)
			if err != nil {
				t.Fatal(err)
			}
			if got[estargz.NoPrefetchLandmark] == nil {
				t.Errorf("the rootfs has no %s: did ctr-remote convert?", estargz.NoPrefetchLandmark)
			}
			if got[estargz.TOCTarName] != nil {
				t.Errorf("the rootfs shows the TOC entry %s", estargz.TOCTarName)
			}
			opts := &fixture.DiffOptions{IgnorePaths: []string{estargz.NoPrefetchLandmark, estargz.PrefetchLandmark}}
			if d := fixture.Diff(want, got, opts); len(d) > 0 {
				t.Errorf("lazypull rootfs of ctr-remote's image differs from the source image (- source, + lazypull):\n%s", fixture.FormatDiff(d, 50))
			}
		})
	}
}

// runCtrRemote runs ctr-remote against the containerd at address in ctx's
// namespace and returns its output, failing the test on an error.
func runCtrRemote(t *testing.T, ctx context.Context, address string, args ...string) string {
	t.Helper()
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	full := append([]string{"--address", address, "--namespace", ns}, args...)
	out, err := exec.CommandContext(cctx, ctrRemote, full...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", ctrRemote, strings.Join(full, " "), err, out)
	}
	return string(out)
}
