package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/forge"
	"github.com/lazypull/lazypull/internal/lab"
)

// poisonedImages builds the two images of issue 9's attack. B is an honest
// plain image: busybox with /bin/x = "good". A is its forgery: one eStargz
// layer whose tar stream is B's layer, but whose TOC serves /bin/x with
// the bytes of /zz/y ("evil"), and whose config claims B's DiffID. Chunk
// and TOC digests all check out; containerd commits A's layer under B's
// chain ID, so without whole-layer verification B reuses A's snapshot.
func poisonedImages(t *testing.T) (a, b *fixture.Image) {
	t.Helper()
	l, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	l.File("bin/x", "good\n").File("zz/y", "evil\n")
	plain, err := fixture.GzipLayer(l)
	if err != nil {
		t.Fatal(err)
	}
	if b, err = fixture.NewImage(fixture.DefaultConfig(), plain); err != nil {
		t.Fatal(err)
	}
	var esgz bytes.Buffer
	if _, err := estargz.Build(context.Background(), &esgz, bytes.NewReader(plain.Uncompressed), estargz.BuildOptions{}); err != nil {
		t.Fatal(err)
	}
	forged, toc, err := forge.ServeOtherFile(esgz.Bytes(), "bin/x", "zz/y")
	if err != nil {
		t.Fatal(err)
	}
	lie := fixture.NewLayerBlob(ocispec.MediaTypeImageLayerGzip, forged, plain.Uncompressed,
		map[string]string{estargz.TOCDigestAnnotation: toc.String()})
	if lie.DiffID != plain.DiffID {
		t.Fatal("the forged layer does not claim the honest DiffID")
	}
	if a, err = fixture.NewImage(fixture.DefaultConfig(), lie); err != nil {
		t.Fatal(err)
	}
	return a, b
}

// TestLazypullPoisonedLayerFailsClosed: tenant A pulls and runs the forged
// image lazily; the daemon's verification fails its layer, counts and logs
// it, and removes its snapshot; tenant B then pulls the honest image with
// the same chain ID and reads its own bytes, never A's; A's image no
// longer runs. The control run with verification off shows the attack
// working, so the test can tell the two apart. With the fuse manager (the
// default) the verification runs in the manager, which reports the
// failure to the daemon: the daemon logs it, removes the snapshot, and its
// /metrics carries the manager's count; the in_daemon run checks the same
// with the daemon serving the layers itself.
func TestLazypullPoisonedLayerFailsClosed(t *testing.T) {
	imgA, imgB := poisonedImages(t)
	for _, mode := range []struct {
		name             string
		verify, inDaemon bool
	}{
		{"verify=background", true, false},
		{"verify=background,in_daemon", true, true},
		{"verify=off(unsafe)", false, false},
	} {
		verify := mode.verify
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			v := lab.Containerd2()
			reg := lab.NewRegistry(t)
			refA := push(t, reg, "tenant-a/app:v1", imgA)
			refB := push(t, reg, "tenant-b/base:v1", imgB)
			env := newLazyEnv(t, v, reg, lazyOptions{Verify: verify, InDaemon: mode.inDaemon})

			ctxA := env.c.Namespace(t)
			a := env.pull(t, ctxA, refA)
			env.checkRemote(t, ctxA, a, true)
			pulled := time.Now()
			// Before verification ends the forged bytes may be served:
			// that is the window the docs state.
			if out := env.run(t, ctxA, a, "cat", "/bin/x"); out != "evil\n" && out != "good\n" {
				t.Fatalf("A reads %q", out)
			}
			if verify {
				deadline := time.Now().Add(90 * time.Second)
				for env.metrics(t)[`lazypull_layer_verifications_total{result="failed"}`] < 1 {
					if time.Now().After(deadline) {
						t.Fatal("the forged layer was not failed within 90 s of its pull")
					}
					time.Sleep(100 * time.Millisecond)
				}
				t.Logf("forged layer failed %v after the pull", time.Since(pulled).Round(time.Millisecond))
				// The daemon's log names the failed layer (with the
				// manager, from the manager's report).
				if !waitFor(10*time.Second, func() bool {
					log, _ := os.ReadFile(env.sn.LogPath())
					return bytes.Contains(log, []byte("LAYER FAILED VERIFICATION")) && bytes.Contains(log, []byte(imgA.Manifest.Layers[0].Digest.String()))
				}) {
					log, err := os.ReadFile(env.sn.LogPath())
					t.Errorf("the daemon's log does not name the failed layer (%v):\n%s", err, log)
				}
				if !mode.inDaemon {
					if m := env.metrics(t); m["lazypull_fuse_manager_up"] != 1 {
						t.Errorf("lazypull_fuse_manager_up = %v, want 1", m["lazypull_fuse_manager_up"])
					}
				}
				// Its snapshot is gone from the daemon once unused.
				deadline = time.Now().Add(30 * time.Second)
				for {
					if _, ok := env.backendSnapshots(t, ctxA)[imgA.ChainID().String()]; !ok {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("the failed layer's snapshot was not removed")
					}
					time.Sleep(100 * time.Millisecond)
				}
				// A no longer runs, with an error rather than wrong bytes.
				res, err := env.c.Run(ctxA, a, lab.RunOptions{Snapshotter: lazypullName, Args: []string{"cat", "/bin/x"}})
				if err == nil && res.ExitCode == 0 {
					t.Errorf("A still runs after its layer failed verification: %s", res)
				} else if err == nil && strings.Contains(res.Stdout, "evil") {
					t.Errorf("A served the forged bytes after the failure: %s", res)
				}
			} else {
				time.Sleep(2 * time.Second) // what verification would have had
			}

			ctxB := env.c.Namespace(t)
			b := env.pull(t, ctxB, refB)
			out := env.run(t, ctxB, b, "cat", "/bin/x")
			switch {
			case verify && out != "good\n":
				t.Fatalf("tenant B reads %q from its honest image, want \"good\\n\"", out)
			case !verify && out == "good\n":
				t.Fatalf("with verification off B read its own bytes: the attack fixture no longer works, so the test proves nothing")
			case !verify:
				t.Logf("with verification off B read %q from the poisoned snapshot", out)
			}
		})
	}
}

// buildStatic builds a static binary of the command in dir for test images.
func buildStatic(t *testing.T, dir string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "bin")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./"+dir)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", dir, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLazypullImageCannotSteerMounts: an image's layer annotations name
// another repository in the labels lazypull once read
// (containerd.io/snapshot/lazypull.image-ref and .layer-digest), and its TOC
// carries overlayfs control xattrs. The layer is still mounted from its own
// repository — the registry sees no request for the other one — and inside
// the container the image's user.overlay.* xattr is not there while an
// ordinary one is.
func TestLazypullImageCannotSteerMounts(t *testing.T) {
	probe := buildStatic(t, "testdata/xattrprobe")
	l, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	l.FileBytes("bin/xattrprobe", probe, fixture.Mode(0o755)).
		Dir("d", fixture.Xattr("user.overlay.opaque", "y"), fixture.Xattr("user.overlay.redirect", "/etc"),
			fixture.Xattr("trusted.overlay.redirect", "/etc"), fixture.Xattr("user.keep", "1")).
		File("d/f", "mine\n")
	plain, err := fixture.GzipLayer(l)
	if err != nil {
		t.Fatal(err)
	}
	var esgz bytes.Buffer
	res, err := estargz.Build(context.Background(), &esgz, bytes.NewReader(plain.Uncompressed), estargz.BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}

	v := lab.Containerd2()
	reg := lab.NewRegistry(t)
	// The repository the annotations point at, with a blob of its own.
	decoy, err := fixture.GzipLayer(fixture.NewLayer().File("etc/motd", "decoy\n"))
	if err != nil {
		t.Fatal(err)
	}
	decoyImg, err := fixture.NewImage(fixture.DefaultConfig(), decoy)
	if err != nil {
		t.Fatal(err)
	}
	decoyRef := push(t, reg, "other/secret:v1", decoyImg)
	ann := map[string]string{
		estargz.TOCDigestAnnotation:                    res.TOCDigest.String(),
		"containerd.io/snapshot/lazypull.image-ref":    decoyRef,
		"containerd.io/snapshot/lazypull.layer-digest": decoy.Digest().String(),
		"containerd.io/snapshot/cri.image-ref":         decoyRef,
	}
	layer := fixture.NewLayerBlob(ocispec.MediaTypeImageLayerGzip, esgz.Bytes(), esgz.Bytes(), ann)
	layer.DiffID = res.DiffID
	img, err := fixture.NewImage(fixture.DefaultConfig(), layer)
	if err != nil {
		t.Fatal(err)
	}
	ref := push(t, reg, "tenant/app:v1", img)

	env := newLazyEnv(t, v, reg, lazyOptions{Verify: true})
	ctx := env.c.Namespace(t)
	reg.ResetRequests()
	image := env.pull(t, ctx, ref)
	env.checkRemote(t, ctx, image, true)
	out := env.run(t, ctx, image, "/bin/xattrprobe", "/d", "user.overlay.opaque", "user.overlay.redirect", "user.keep")
	if out != "ENODATA ENODATA 1\n" {
		t.Errorf("xattrs of /d inside the container: %q, want the overlay ones absent and user.keep=1", out)
	}
	if got := env.run(t, ctx, image, "cat", "/d/f"); got != "mine\n" {
		t.Errorf("/d/f reads %q", got)
	}
	for _, r := range reg.Requests() {
		if strings.Contains(r.Path, "other/secret") {
			t.Errorf("the registry served %s %s for the repository the annotations named", r.Method, r.Path)
		}
	}
}
