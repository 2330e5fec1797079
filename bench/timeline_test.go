package bench

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lazypull/lazypull/bench/wan"
	"github.com/lazypull/lazypull/internal/lab"
)

func timelineSample() Sample {
	s := Sample{Image: "app", Profile: "40ms-100Mbit", Mode: ModeLazy, Repeat: 1, TotalSeconds: 2, PullSeconds: 1.2, ReadySeconds: 0.8}
	for i, name := range PhaseNames {
		s.Phases = append(s.Phases, Phase{Name: name, Seconds: float64(i+1) * 2 / float64(len(PhaseNames))})
	}
	s.Requests = []Request{
		{Start: 0, End: 0.1, Kind: KindResolve, By: "containerd"},
		{Start: 0.1, End: 0.2, Kind: KindManifest, By: "containerd", Bytes: 500},
		{Start: 0.3, End: 0.5, Kind: KindTOC, By: "snapshotter", Layer: "sha256:abc", Offset: 100, Length: 50, Bytes: 50},
		{Start: 0.9, End: 1.3, Kind: KindForeground, By: "snapshotter", Bytes: 1 << 20},
		{Start: 1.0, End: 1.9, Kind: KindBackground, By: "snapshotter", Bytes: 4 << 20, Err: "boom <&>"},
	}
	return s
}

// TestTimelineSVG checks the waterfall is well-formed XML with a bar per
// request, a line per phase and a legend of the kinds present.
func TestTimelineSVG(t *testing.T) {
	s := timelineSample()
	svg := TimelineSVG(&s, "app <lazypull>", 12.5e6)
	if err := xml.Unmarshal(svg, new(struct{})); err != nil {
		t.Fatalf("not XML: %v\n%s", err, svg)
	}
	if n := strings.Count(string(svg), "<title>"); n != len(s.Requests) {
		t.Errorf("%d request bars, want %d", n, len(s.Requests))
	}
	if n := strings.Count(string(svg), `stroke-dasharray`); n != len(PhaseNames) {
		t.Errorf("%d phase lines, want %d", n, len(PhaseNames))
	}
	for _, want := range []string{"app &lt;lazypull&gt;", "ready 2.00s", ">resolve<", ">toc<", ">foreground<", ">background<", "100% = 100 Mbit/s", "boom &lt;&amp;&gt;"} {
		if !strings.Contains(string(svg), want) {
			t.Errorf("timeline lacks %q", want)
		}
	}
	if strings.Contains(string(svg), ">read-ahead<") {
		t.Errorf("legend shows a kind no request has")
	}
}

// TestTimelineLanes checks that many requests are packed into lanes (no
// two overlapping in time share one) instead of a row each.
func TestTimelineLanes(t *testing.T) {
	s := Sample{TotalSeconds: 10}
	for i := 0; i < 1000; i++ {
		st := float64(i%100) / 10
		s.Requests = append(s.Requests, Request{Start: st, End: st + 0.35, Kind: KindBackground, Bytes: 1000})
	}
	svg := string(TimelineSVG(&s, "many", 0))
	re := regexp.MustCompile(`<rect x="([0-9.]+)" y="([0-9.]+)" width="([0-9.]+)" height="[0-9.]+" fill="#1f77b4">`)
	type bar struct{ x0, x1 float64 }
	lanes := map[string][]bar{}
	for _, m := range re.FindAllStringSubmatch(svg, -1) {
		var b bar
		var w float64
		mustParse(t, m[1], &b.x0)
		mustParse(t, m[3], &w)
		b.x1 = b.x0 + w
		for _, o := range lanes[m[2]] {
			if b.x0 < o.x1-0.5 && o.x0 < b.x1-0.5 {
				t.Fatalf("bars %v and %v overlap in lane y=%s", b, o, m[2])
			}
		}
		lanes[m[2]] = append(lanes[m[2]], b)
	}
	if total := len(re.FindAllString(svg, -1)); total != 1000 {
		t.Fatalf("%d bars, want 1000", total)
	}
	// Ten requests start at each tenth of a second and last 0.35 s: 40
	// overlap at most, so about 40 lanes, not a thousand rows.
	if len(lanes) > 45 {
		t.Errorf("%d lanes for requests at most 40 deep", len(lanes))
	}
}

func mustParse(t *testing.T, s string, v *float64) {
	t.Helper()
	if _, err := fmtSscan(s, v); err != nil {
		t.Fatalf("%q: %v", s, err)
	}
}

func TestPhasesOrderedAndClamped(t *testing.T) {
	start := time.Unix(1000, 0)
	at := func(s float64) time.Time { return start.Add(time.Duration(s * float64(time.Second))) }
	reqs := []Request{
		{Start: 0, End: 0.1, Kind: KindResolve, By: "containerd"},
		{Start: 0.1, End: 0.3, Kind: KindManifest, By: "containerd"},
		{Start: 0.3, End: 0.6, Kind: KindTOC, By: "snapshotter", Layer: "a", Length: 10},
		{Start: 0.3, End: 0.7, Kind: KindTOC, By: "snapshotter", Layer: "b", Length: 10},
		{Start: 0.9, End: 1.5, Kind: KindTOC, By: "snapshotter", Layer: "b", Length: -1}, // a HEAD after the pull
		{Start: 0.9, End: 3, Kind: KindBackground, By: "snapshotter", Layer: "b", Length: 10},
	}
	// Output arrives before the start call returned.
	ph, layers := phases(start, at(0.8), runTimes{started: at(1.0), firstOutput: at(0.95), ready: at(2)}, reqs, true)
	want := []float64{0.1, 0.3, 0.7, 0.8, 1.0, 1.0, 2}
	for i, p := range ph {
		if p.Name != PhaseNames[i] || math.Abs(p.Seconds-want[i]) > 1e-9 {
			t.Errorf("phase %d = %+v, want %s at %v", i, p, PhaseNames[i], want[i])
		}
	}
	if len(layers) != 2 || layers[0].Seconds != 0.6 || layers[1].Seconds != 0.7 {
		t.Errorf("layers %+v", layers)
	}
}

func TestClassify(t *testing.T) {
	lc := &layerChunks{starts: []int64{0, 100, 200, 300, 400, 500}, prefetchEnd: 300}
	reqs := []Request{
		{By: "snapshotter", Kind: KindForeground, Layer: "l", Offset: 400, Length: 100}, // one chunk
		{By: "snapshotter", Kind: KindForeground, Layer: "l", Offset: 300, Length: 250}, // three, after the landmark
		{By: "snapshotter", Kind: KindForeground, Layer: "l", Offset: 0, Length: 300},   // three, prioritized
		{By: "snapshotter", Kind: KindBackground, Layer: "l", Offset: 0, Length: 600},
		{By: "snapshotter", Kind: KindForeground, Layer: "other", Offset: 0, Length: 600},
	}
	classify(reqs, map[string]*layerChunks{"l": lc})
	want := []string{KindForeground, KindReadAhead, KindPrefetch, KindBackground, KindForeground}
	for i, q := range reqs {
		if q.Kind != want[i] {
			t.Errorf("request %d: %s, want %s", i, q.Kind, want[i])
		}
	}
}

func TestLineWatcher(t *testing.T) {
	w := newLineWatcher(regexp.MustCompile(`^ready [0-9]+$`))
	for _, chunk := range []string{"start", "ing\nready", " x\nre", "ady 4", "2\nmore\n"} {
		w.Write([]byte(chunk))
	}
	select {
	case <-w.ready:
	default:
		t.Fatal("ready line split over writes not seen")
	}
	if w.line() != "ready 42" || w.firstOutput().IsZero() {
		t.Errorf("line %q, first output %v", w.line(), w.firstOutput())
	}
	// A last line without its newline counts once the output ends.
	w = newLineWatcher(regexp.MustCompile(`^ready$`))
	w.Write([]byte("x\nready"))
	select {
	case <-w.ready:
		t.Fatal("a partial line matched before the output ended")
	default:
	}
	w.flush()
	if w.line() != "ready" {
		t.Errorf("after flush: line %q", w.line())
	}
	// stdout and stderr are lines of their own; lines after megabytes of
	// output still count.
	w = newLineWatcher(regexp.MustCompile(`^ready$`))
	w.Write([]byte("rea"))
	w.stderr().Write([]byte("noise\n"))
	big := bytes.Repeat([]byte("x"), 1<<20)
	for i := 0; i < 8; i++ {
		w.stderr().Write(big)
		w.stderr().Write([]byte("\n"))
	}
	w.Write([]byte("dy\n"))
	if w.line() != "ready" {
		t.Errorf("interleaved streams: line %q", w.line())
	}
	if len(w.output()) > 64<<10 {
		t.Errorf("kept %d bytes of output", len(w.output()))
	}
	// Without a pattern only the first output counts.
	w = newLineWatcher(nil)
	w.Write([]byte("x"))
	if w.firstOutput().IsZero() {
		t.Error("no first output")
	}
}

func TestParseMetrics(t *testing.T) {
	m := lab.ParseMetrics([]byte(`# HELP lazypull_fetch_requests_total x
# TYPE lazypull_fetch_requests_total counter
lazypull_fetch_requests_total{kind="background",result="ok"} 3
lazypull_fetch_requests_total{kind="foreground",result="ok"} 4
lazypull_fetch_bytes_total{kind="foreground"} 1.5e+06
garbage
`))
	if m["lazypull_fetch_requests_total"] != 7 || m[`lazypull_fetch_bytes_total{kind="foreground"}`] != 1.5e6 {
		t.Errorf("parsed %v", m)
	}
}

// TestWriteReportFiles checks every report file is written, the HTML
// with the chart and a timeline per mode inline.
func TestWriteReportFiles(t *testing.T) {
	p := wan.Profile{Name: "40ms-100Mbit", RTT: 40 * time.Millisecond, BitsPerSecond: 100_000_000}
	full, lazy := timelineSample(), timelineSample()
	full.Mode = ModeFull
	full.TotalSeconds = 4
	res := &Result{Profiles: []wan.Profile{p}, Modes: []Mode{ModeFull, ModeLazy}, Images: []ImageInfo{{Name: "app", Cmd: []string{"sh", "-c", "a|b"}}},
		Samples: []Sample{full, lazy}}
	res.Summary = summarize(res)
	dir := t.TempDir()
	if err := res.Write(dir); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"results.json", "results.md", "report.html", "cold-start-40ms-100Mbit.svg",
		"timeline-app-40ms-100Mbit-full-pull.svg", "timeline-app-40ms-100Mbit-lazypull.svg"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Error(err)
		}
	}
	page, _ := os.ReadFile(filepath.Join(dir, "report.html"))
	if n := strings.Count(string(page), "<svg"); n != 3 {
		t.Errorf("report.html has %d SVGs, want 3", n)
	}
	if strings.Contains(string(page), "<?xml") {
		t.Error("report.html inlines an XML declaration")
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	for _, want := range []string{"| app | lazypull | 1.20 | 0.80 | **2.00** | 0.50x | - |", "`sh -c a\\|b`", "| app | full-pull | 1.20 | 0.80 | **4.00** | 1.00x |", "| app | lazypull | 0.29 | 0.57 | 0.86 | 1.14 | 1.43 | 1.71 | 2.00 |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q:\n%s", want, md)
		}
	}
}

func fmtSscan(s string, v *float64) (int, error) { return fmt.Sscan(s, v) }
