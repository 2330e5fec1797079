package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
)

// Sizes of the hostile image: each layer's TOC declares tocPadEntries empty
// files with long names beyond what its tar holds (a TOC of about 93 MiB of
// JSON, whose index would take about 200 MiB).
const (
	hostileLayers  = 50
	tocPadEntries  = 400000
	budgetBytes    = 768 << 20
	smallBudget    = 64 << 20
	rssOverhead    = 256 << 20
	padNameLength  = 200
	hostileTOCName = "pad"
)

// padEntries is the JSON of the padding entries, each preceded by a comma.
func padEntries() []byte {
	var b bytes.Buffer
	long := strings.Repeat("n", padNameLength)
	for i := range tocPadEntries {
		fmt.Fprintf(&b, `,{"name":"%s/%s%08d","type":"reg","mode":420}`, hostileTOCName, long, i)
	}
	return b.Bytes()
}

// bigTOCLayer is layer i of the hostile image: /id/<i> holds "<i>\n", and
// its TOC also declares the padding entries (which the tar does not hold:
// a hostile TOC, served as is since verification is off here). The DiffID
// is that of the whole uncompressed stream, as containerd checks it when
// it unpacks the layer instead.
func bigTOCLayer(t *testing.T, i int, pad []byte) fixture.LayerBlob {
	t.Helper()
	tarb, err := fixture.NewLayer().Dir("id").File(fmt.Sprintf("id/%d", i), fmt.Sprintf("%d\n", i)).Tar()
	if err != nil {
		t.Fatal(err)
	}
	var esgz bytes.Buffer
	if _, err := estargz.Build(context.Background(), &esgz, bytes.NewReader(tarb), estargz.BuildOptions{}); err != nil {
		t.Fatal(err)
	}
	blob := esgz.Bytes()
	footer, tocJSON, err := estargz.ReadTOC(bytes.NewReader(blob), int64(len(blob)), estargz.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	k := bytes.LastIndexByte(tocJSON, ']')
	big := make([]byte, 0, len(tocJSON)+len(pad))
	big = append(append(append(big, tocJSON[:k]...), pad...), tocJSON[k:]...)

	var out bytes.Buffer
	out.Write(blob[:footer.TOCOffset])
	zw, err := gzip.NewWriterLevel(&out, gzip.BestSpeed)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Mode: 0o644, Size: int64(len(big))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(big); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	// The eStargz footer: an empty gzip member whose extra field holds
	// the TOC offset.
	out.Write([]byte{0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, 'S', 'G', 22, 0})
	fmt.Fprintf(&out, "%016xSTARGZ", footer.TOCOffset)
	out.Write([]byte{0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0})

	zr, err := gzip.NewReader(bytes.NewReader(out.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	dg := digest.Canonical.Digester()
	if _, err := io.Copy(dg.Hash(), zr); err != nil {
		t.Fatal(err)
	}
	return fixture.LayerBlob{
		MediaType:   ocispec.MediaTypeImageLayerGzip,
		Data:        out.Bytes(),
		DiffID:      dg.Digest(),
		Annotations: map[string]string{estargz.TOCDigestAnnotation: digest.FromBytes(big).String()},
	}
}

// vmHWM is the peak resident set of process pid, from /proc/<pid>/status.
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^VmHWM:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no VmHWM in /proc/%d/status", pid)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// TestLazypullHostileTOCsUnderBudget: an image of 50 layers whose TOCs are
// about 93 MiB each (400k entries with long names) is pulled through
// containerd 2.4 with a 768 MiB memory budget (one such TOC is charged
// about 665 MiB while it is parsed and 208 MiB while mounted). The layers whose indexes
// fit are mounted lazily; the others are refused with an error naming the
// layer and the budget, and containerd unpacks them instead; the image
// runs; the daemon's peak RSS stays under the budget plus 256 MiB. Then
// the daemon is killed (SIGKILL) and started again with a 64 MiB budget,
// too small for the saved hostile layers: it comes up, refuses them with
// the same error, and an honest image pulls lazily and runs.
func TestLazypullHostileTOCsUnderBudget(t *testing.T) {
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	baseBlob, err := fixture.GzipLayer(base)
	if err != nil {
		t.Fatal(err)
	}
	pad := padEntries()
	t.Logf("each hostile TOC declares %d entries beyond its tar: %d MiB of JSON", tocPadEntries, len(pad)>>20)
	layers := []fixture.LayerBlob{baseBlob}
	for i := range hostileLayers {
		layers = append(layers, bigTOCLayer(t, i, pad))
	}
	pad = nil
	t.Logf("hostile layer blob: %d bytes", len(layers[1].Data))
	hostile, err := fixture.NewImage(fixture.DefaultConfig(), layers...)
	if err != nil {
		t.Fatal(err)
	}
	layers = nil
	honest := convertImage(t, appImage(t, "honest"), estargz.Gzip)

	v := lab.Containerd2()
	reg := lab.NewRegistry(t)
	ref := push(t, reg, "hostile/big-toc:v1", hostile)
	refH := push(t, reg, "honest/app:v1", honest.image)
	budget := func(n int) string { return fmt.Sprintf("\n[limits]\nmemory_budget = %d\n", n) }
	// In the daemon: its restart must restore the saved hostile layers
	// itself (with the fuse manager they would outlive the kill, and the
	// budget is the same service code in the manager's process).
	env := newLazyEnv(t, v, reg, lazyOptions{Timeout: time.Minute, ReadTimeout: 2 * time.Minute, ExtraConfig: budget(budgetBytes), InDaemon: true})
	ctx := env.c.Namespace(t)
	pid := env.sn.Pid()

	stopSampling := sampleHeap(t, env)
	start := time.Now()
	img := env.pull(t, ctx, ref)
	t.Logf("pulled in %v", time.Since(start).Round(time.Millisecond))
	peaks := stopSampling()
	if out := env.run(t, ctx, img, "cat", fmt.Sprintf("/id/%d", hostileLayers-1)); out != fmt.Sprintf("%d\n", hostileLayers-1) {
		t.Fatalf("the hostile image reads %q", out)
	}
	if env.sn.Pid() != pid || !env.sn.Running() {
		t.Fatal("the daemon restarted or died during the pull")
	}
	hwm := vmHWM(t, pid)
	t.Logf("daemon peak RSS (VmHWM): %d MiB; budget %d MiB", hwm>>20, budgetBytes>>20)
	if lab.RaceBuild() {
		// The race detector's shadow memory is several times the heap
		// (2.7 GiB of RSS measured for under 900 MiB of heap): bound the
		// Go heap the daemon reports instead.
		if heap := int64(peaks["go_memstats_heap_inuse_bytes"]); heap == 0 || heap > budgetBytes+rssOverhead {
			t.Errorf("daemon peak Go heap in use %d MiB (race build), want at most the budget + %d MiB = %d MiB", heap>>20, rssOverhead>>20, (budgetBytes+rssOverhead)>>20)
		}
	} else if hwm > budgetBytes+rssOverhead {
		t.Errorf("daemon peak RSS %d MiB, want at most the budget + %d MiB = %d MiB", hwm>>20, rssOverhead>>20, (budgetBytes+rssOverhead)>>20)
	}

	// Every hostile layer is either mounted lazily or refused for the
	// budget, with an error naming it and the budget.
	logb, err := os.ReadFile(env.sn.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	lazy := len(env.fuseMounts(t))
	refused := 0
	for _, l := range hostile.Manifest.Layers[1:] {
		for _, line := range strings.Split(string(logb), "\n") {
			if strings.Contains(line, "falling back to a normal snapshot") && strings.Contains(line, l.Digest.String()) &&
				strings.Contains(line, "resource exhausted") && strings.Contains(line, strconv.Itoa(budgetBytes)) {
				refused++
				break
			}
		}
	}
	t.Logf("%d hostile layers mounted lazily, %d refused for the memory budget", lazy, refused)
	if lazy < 1 || refused < 1 || lazy+refused != hostileLayers {
		t.Errorf("%d layers mounted lazily and %d refused for the budget, want at least one of each and %d in all", lazy, refused, hostileLayers)
	}

	// SIGKILL, and start again with a budget too small for the saved
	// hostile layers.
	if err := env.sn.Kill(); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(env.sn.Dir(), "config.toml")
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg = bytes.Replace(cfg, []byte(budget(budgetBytes)), []byte(budget(smallBudget)), 1)
	if !bytes.Contains(cfg, []byte(budget(smallBudget))) {
		t.Fatalf("config %s has no memory_budget to lower:\n%s", cfgPath, cfg)
	}
	if err := os.WriteFile(cfgPath, cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	off := fileSize(t, env.sn.LogPath())
	if err := env.sn.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := env.c.WaitSnapshotter(ctx, lazypullName); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(logSince(t, env.sn.LogPath(), off), "remote snapshots restored") {
		if time.Now().After(deadline) {
			t.Fatalf("the restarted daemon did not finish restoring its snapshots:\n%s", logSince(t, env.sn.LogPath(), off))
		}
		time.Sleep(100 * time.Millisecond)
	}
	after := logSince(t, env.sn.LogPath(), off)
	if lazy > 0 && !strings.Contains(after, "saved TOC") {
		t.Errorf("the restarted daemon does not say why the saved hostile layers are refused:\n%s", after)
	}
	h := env.pull(t, ctx, refH)
	if out := env.run(t, ctx, h, "cat", "/etc/motd"); out != "image honest\n" {
		t.Fatalf("honest image after the restart reads %q", out)
	}
	env.checkRemote(t, ctx, h, true)
	if !env.sn.Running() {
		t.Fatal("the restarted daemon died")
	}
	t.Logf("after the restart with a %d MiB budget: daemon peak RSS %d MiB", smallBudget>>20, vmHWM(t, env.sn.Pid())>>20)
}

// sampleHeap polls the daemon's Go heap metrics until the returned func is
// called, which logs their peaks (to tell the budget's charges from the
// runtime's overhead).
func sampleHeap(t *testing.T, env *lazyEnv) func() map[string]float64 {
	t.Helper()
	url := env.metricsURL(t)
	names := []string{"go_memstats_heap_inuse_bytes", "go_memstats_heap_sys_bytes", "go_memstats_next_gc_bytes", "process_resident_memory_bytes"}
	peaks := map[string]float64{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		hc := &http.Client{Timeout: 5 * time.Second}
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			resp, err := hc.Get(url)
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			m := lab.ParseMetrics(b)
			for _, n := range names {
				peaks[n] = max(peaks[n], m[n])
			}
		}
	}()
	return func() map[string]float64 {
		close(stop)
		<-done
		for _, n := range names {
			t.Logf("peak %s: %d MiB", n, int64(peaks[n])>>20)
		}
		return peaks
	}
}
