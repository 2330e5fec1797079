package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	ctdimages "github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"

	"github.com/lazypull/lazypull/bench/images"
	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/internal/lab"
)

// ConvertComparison compares converting one image with `lazypull convert`
// and with the upstream `ctr-remote image convert --estargz --oci`, both
// from local storage to local storage on the same machine.
type ConvertComparison struct {
	Image             string
	UncompressedBytes int64
	OriginalBytes     int64

	LazypullSeconds float64
	LazypullBytes   int64
	CtrRemote       string // ctr-remote version
	CtrRemoteSecs   float64
	CtrRemoteBytes  int64

	SpeedUp   float64 // CtrRemoteSecs / LazypullSeconds
	SizeRatio float64 // LazypullBytes / CtrRemoteBytes
}

// CompareConvert builds spec's image and times both converters on it.
// lazypull converts an OCI layout into another; ctr-remote converts the
// same image inside a containerd 1.6 content store (it needs a daemon).
func (r *Runner) CompareConvert(ctx context.Context, spec images.Spec) (*ConvertComparison, error) {
	ctrRemote, err := exec.LookPath("ctr-remote")
	if err != nil {
		return nil, fmt.Errorf("ctr-remote not found (Debian package stargz-snapshotter): %w", err)
	}
	if r.builder == nil {
		r.builder = &images.Builder{CacheDir: r.cfg.CacheDir, Log: r.log}
	}
	layout, err := r.builder.Build(ctx, spec)
	if err != nil {
		return nil, err
	}
	cmp := &ConvertComparison{Image: spec.Name}
	src, err := convert.OpenStore(convert.LayoutPrefix+layout+":v1", nil)
	if err != nil {
		return nil, err
	}
	_, raw, err := src.Root(ctx)
	if err != nil {
		return nil, err
	}
	m, err := parseManifest(raw)
	if err != nil {
		return nil, err
	}
	for _, l := range m.Layers {
		cmp.OriginalBytes += l.Size
	}

	// lazypull: layout to layout.
	out, err := os.MkdirTemp("", "lazypull-convert-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(out)
	dst, _ := convert.OpenStore(convert.LayoutPrefix+filepath.Join(out, "layout")+":v1", nil)
	dropCaches()
	r.logf("convert: lazypull convert %s", spec.Name)
	start := time.Now()
	res, err := convert.Convert(ctx, src, dst, convert.Options{})
	if err != nil {
		return nil, err
	}
	cmp.LazypullSeconds = time.Since(start).Seconds()
	for _, d := range res.Layers {
		cmp.LazypullBytes += d.Size
	}
	for _, d := range res.Layers {
		var n int64
		if _, err := fmt.Sscan(d.Annotations["io.containers.estargz.uncompressed-size"], &n); err == nil {
			cmp.UncompressedBytes += n
		}
	}

	// ctr-remote: fetch the original into a containerd 1.6 content store,
	// then convert there.
	reg, err := lab.StartRegistry(lab.RegistryConfig{RootDir: filepath.Join(r.cfg.CacheDir, "registry")})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	rs, err := convert.OpenStore(reg.Ref("bench/"+spec.Name+":orig"), r.remote)
	if err != nil {
		return nil, err
	}
	if _, err := r.copyImage(ctx, src, rs); err != nil {
		return nil, err
	}
	c, err := lab.StartContainerd(ctx, lab.ContainerdConfig{Version: lab.Containerd16(), LogLevel: "warn"})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ref := reg.Ref("bench/" + spec.Name + ":orig")
	if err := runCmd(ctx, r.log, "ctr", "-a", c.Address(), "-n", "bench", "content", "fetch", "--plain-http", ref); err != nil {
		return nil, err
	}
	cmp.CtrRemote = "ctr-remote"
	if v, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f=${Version}", "stargz-snapshotter").Output(); err == nil {
		cmp.CtrRemote = "Debian stargz-snapshotter " + string(trimNL(v))
	}
	dropCaches()
	r.logf("convert: ctr-remote image convert --estargz --oci %s", spec.Name)
	start = time.Now()
	if err := runCmd(ctx, r.log, ctrRemote, "-a", c.Address(), "-n", "bench", "image", "convert", "--estargz", "--oci", ref, "converted:1"); err != nil {
		return nil, err
	}
	cmp.CtrRemoteSecs = time.Since(start).Seconds()
	nctx := namespaces.WithNamespace(ctx, "bench")
	img, err := c.Client().ImageService().Get(nctx, "converted:1")
	if err != nil {
		return nil, fmt.Errorf("ctr-remote's output: %w", err)
	}
	cm, err := ctdimages.Manifest(nctx, c.Client().ContentStore(), img.Target, platforms.All)
	if err != nil {
		return nil, err
	}
	for _, l := range cm.Layers {
		cmp.CtrRemoteBytes += l.Size
	}
	cmp.SpeedUp = cmp.CtrRemoteSecs / cmp.LazypullSeconds
	cmp.SizeRatio = float64(cmp.LazypullBytes) / float64(cmp.CtrRemoteBytes)
	return cmp, nil
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

func runCmd(ctx context.Context, log io.Writer, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %v: %w\n%s", name, args, err, out)
	}
	return nil
}

// Write stores the comparison as convert.json and convert.md in dir.
func (c *ConvertComparison) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "convert.json"), b, 0o644); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "convert.md"))
	if err != nil {
		return err
	}
	defer f.Close()
	c.Markdown(f)
	return nil
}

// Markdown writes the comparison table.
func (c *ConvertComparison) Markdown(w io.Writer) {
	fmt.Fprintf(w, "Converting the %q image (%s uncompressed, %s as gzip layers) to eStargz, one run, same machine.\n\n",
		c.Image, human(c.UncompressedBytes), human(c.OriginalBytes))
	fmt.Fprintln(w, "| converter | seconds | output | ")
	fmt.Fprintln(w, "|---|---:|---:|")
	fmt.Fprintf(w, "| `lazypull convert` (gzip level 6, all cores) | %.1f | %s |\n", c.LazypullSeconds, human(c.LazypullBytes))
	fmt.Fprintf(w, "| `ctr-remote image convert --estargz --oci` (%s) | %.1f | %s |\n", c.CtrRemote, c.CtrRemoteSecs, human(c.CtrRemoteBytes))
	fmt.Fprintf(w, "\nlazypull is **%.1fx** faster; its output is %.1f%% %s.\n", c.SpeedUp, abs(c.SizeRatio-1)*100, map[bool]string{true: "larger", false: "smaller"}[c.SizeRatio > 1])
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}
