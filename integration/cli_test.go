package integration

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/lab"
)

var lazypullCLI struct {
	once sync.Once
	bin  string
	err  error
}

// lazypullBinary builds cmd/lazypull once per test binary.
func lazypullBinary(t *testing.T) string {
	t.Helper()
	b := &lazypullCLI
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "lazypull-cli-")
		if err != nil {
			b.err = err
			return
		}
		b.bin, b.err = lab.Build(dir, "./cmd/lazypull", "lazypull")
	})
	if b.err != nil {
		t.Fatalf("building cmd/lazypull: %v", b.err)
	}
	return b.bin
}

// `lazypull pull` — the user's command, not the test client — pulls a
// converted image into containerd 1.6 and 2.x with every layer lazy, and
// the image then runs.
func TestLazypullPullCommand(t *testing.T) {
	bin := lazypullBinary(t)
	cv := convertImage(t, threeLayerImage(t), estargz.Gzip)
	forEachVersion(t, func(t *testing.T, v lab.Version) {
		reg := lab.NewRegistry(t)
		ref := push(t, reg, "cli/converted:v1", cv.image)
		env := newLazyEnv(t, v, reg, lazyOptions{})
		ctx := env.c.Namespace(t)
		ns, _ := namespaces.Namespace(ctx)

		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, "pull", "--address", env.c.Address(), "--namespace", ns, ref)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("lazypull pull: %v\nstdout: %s\nstderr: %s\ncontainerd log: %s", err, stdout.String(), stderr.String(), env.c.LogPath())
		}
		want := "3 of 3 layers lazy"
		if !strings.Contains(stdout.String(), ref) || !strings.Contains(stdout.String(), want) {
			t.Fatalf("lazypull pull printed %q, want the reference and %q", stdout.String(), want)
		}
		if stderr.Len() != 0 {
			t.Errorf("no terminal, yet stderr has: %q", stderr.String())
		}
		img, err := env.c.Client().GetImage(ctx, ref)
		if err != nil {
			t.Fatal(err)
		}
		env.checkRemote(t, ctx, img, true)
		if out := env.run(t, ctx, img, "cat", "/etc/motd"); out != "layer 3\n" {
			t.Fatalf("cat /etc/motd: %q", out)
		}

		// A reference that does not exist is a clear error, exit 1.
		cmd = exec.Command(bin, "pull", "--address", env.c.Address(), "--namespace", ns, reg.Ref("cli/missing:v1"))
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "cli/missing:v1") {
			t.Errorf("pull of a missing image: %v, output %q; want exit 1 naming the reference", err, out)
		}
	})
}
