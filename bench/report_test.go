package bench

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazypull/lazypull/bench/wan"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func sampleResult() *Result {
	p := wan.Profile{Name: "40ms-100Mbit", RTT: 40 * time.Millisecond, BitsPerSecond: 100_000_000}
	res := &Result{Profiles: []wan.Profile{p}, Images: []ImageInfo{{Name: "python", Layers: 2}}}
	for rep, totals := range [][4]float64{{10, 5, 2, 8}, {12, 4, 3, 10}, {11, 6, 2.5, 9}} {
		for i, m := range []Mode{ModeFull, ModeLazy, ModeOptimized, ModePeer} {
			s := Sample{Image: "python", Profile: p.Name, Mode: m, Repeat: rep + 1,
				PullSeconds: totals[i] / 2, ReadySeconds: totals[i] / 2, TotalSeconds: totals[i], BytesReceived: int64(totals[i] * 1e6)}
			if m != ModeFull {
				s.PeakRSSBytes = int64(rep) << 20
				s.DaemonCPUSeconds = float64(rep+1) / 2
				s.LinkUtilization = float64(rep+1) / 10
			}
			if m.lazypull() {
				s.ForegroundLatencyMedian, s.ForegroundLatencyP90 = 0.040+float64(rep)/100, 0.080+float64(rep)/100
			}
			res.Samples = append(res.Samples, s)
		}
	}
	res.Limits = []Limit{{Image: "python", Profile: p.Name, LocalSeconds: 0.2, ReadBytes: 12_500_000, Seconds: 2}}
	res.Summary = summarize(res)
	return res
}

func TestSummarizeRatios(t *testing.T) {
	res := sampleResult()
	if len(res.Summary) != 4 {
		t.Fatalf("%d summary rows, want 4", len(res.Summary))
	}
	want := map[Mode]struct{ total, vsFull, vsPeer, vsLimit float64 }{
		ModeFull:      {11, 1, 11.0 / 9, 5.5},
		ModeLazy:      {5, 5.0 / 11, 5.0 / 9, 2.5},
		ModeOptimized: {2.5, 2.5 / 11, 2.5 / 9, 1.25},
		ModePeer:      {9, 9.0 / 11, 1, 4.5},
	}
	for _, s := range res.Summary {
		w := want[s.Mode]
		if s.TotalSeconds != w.total || math.Abs(s.VsFullPull-w.vsFull) > 1e-9 || math.Abs(s.VsPeer-w.vsPeer) > 1e-9 || math.Abs(s.VsLimit-w.vsLimit) > 1e-9 {
			t.Errorf("%s: total %v vs full %v vs peer %v vs limit %v, want %+v", s.Mode, s.TotalSeconds, s.VsFullPull, s.VsPeer, s.VsLimit, w)
		}
		if s.Mode == ModeFull {
			if s.PeakRSSBytes != 0 || s.DaemonCPUSeconds != 0 {
				t.Errorf("full pull: peak RSS %d, CPU %v: it runs no snapshotter of its own", s.PeakRSSBytes, s.DaemonCPUSeconds)
			}
			continue
		}
		if s.PeakRSSBytes != 2<<20 {
			t.Errorf("%s: peak RSS %d, want the largest of the runs", s.Mode, s.PeakRSSBytes)
		}
		if s.DaemonCPUSeconds != 1 || math.Abs(s.LinkUtilization-0.2) > 1e-9 {
			t.Errorf("%s: CPU %v, link %v: want the medians 1 and 0.2", s.Mode, s.DaemonCPUSeconds, s.LinkUtilization)
		}
		if lat := s.ForegroundLatencyMedian; s.Mode.lazypull() != (lat != 0) || (lat != 0 && math.Abs(lat-0.05) > 1e-9) || (lat != 0 && math.Abs(s.ForegroundLatencyP90-0.09) > 1e-9) {
			t.Errorf("%s: foreground latency %v / %v", s.Mode, lat, s.ForegroundLatencyP90)
		}
	}
}

func TestWriteReport(t *testing.T) {
	dir := t.TempDir()
	res := sampleResult()
	if err := res.Write(dir); err != nil {
		t.Fatal(err)
	}
	var back Result
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &back); err != nil || len(back.Samples) != 12 {
		t.Fatalf("results.json: %v, %d samples", err, len(back.Samples))
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	for _, want := range []string{
		"| python | lazypull | 2.50 | 2.50 | **5.00** | 0.45x | 0.56x | 2.50x | 5.0 | 20% | - | 50 / 90 | 0 | 2 MB | 1.00 |",
		"| python | stargz-snapshotter | 4.50 | 4.50 | **9.00** | 0.82x | 1.00x | 4.50x | 9.0 | 20% | - | - | 0 | 2 MB | 1.00 |",
		"| python | 2.00 | 0.20 | 1.00 (11.9 MiB) | 0.12 |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q:\n%s", want, md)
		}
	}
	svg, err := os.ReadFile(filepath.Join(dir, "cold-start-40ms-100Mbit.svg"))
	if err != nil || !strings.Contains(string(svg), "<svg") || !strings.Contains(string(svg), "python") {
		t.Fatalf("chart: %v", err)
	}
	if tb := res.Table(); !strings.Contains(tb, "lazypull-optimized") || !strings.Contains(tb, "limit") || !strings.Contains(tb, "stargz-snapshotter") {
		t.Errorf("table:\n%s", tb)
	}
	// The costs have charts of their own, in the page too.
	page, _ := os.ReadFile(filepath.Join(dir, "report.html"))
	for _, name := range []string{"daemon-cpu", "link-utilization", "foreground-latency"} {
		svg, err := os.ReadFile(filepath.Join(dir, name+"-40ms-100Mbit.svg"))
		if err != nil || !strings.Contains(string(svg), "<svg") || !strings.Contains(string(svg), "lazypull") {
			t.Errorf("%s chart: %v", name, err)
		}
		// A full pull runs no snapshotter of its own: no CPU or latency bar.
		if name != "link-utilization" && strings.Contains(string(svg), "full-pull") {
			t.Errorf("%s chart has a full-pull bar", name)
		}
	}
	if n := strings.Count(string(page), "<svg"); n < 4 {
		t.Errorf("report.html holds %d SVGs, want the totals and the three cost charts at least", n)
	}
	if !strings.Contains(string(page), "<th>vs peer</th>") || !strings.Contains(string(page), "<td>50 / 90</td>") {
		t.Error("report.html lacks the vs-peer column or the foreground latency")
	}
}

func TestPercentileAndLatency(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		p    float64
		want float64
	}{{nil, 50, 0}, {[]float64{7}, 90, 7}, {[]float64{5, 1, 3, 2, 4}, 50, 3}, {[]float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 90, 9}, {[]float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, 90, 10}} {
		if got := percentile(c.in, c.p); got != c.want {
			t.Errorf("percentile(%v, %v) = %v, want %v", c.in, c.p, got, c.want)
		}
	}
	reqs := []Request{
		{Start: 0, End: 0.010, Kind: KindForeground, By: "snapshotter"},
		{Start: 1, End: 1.030, Kind: KindReadAhead, By: "snapshotter"},
		{Start: 2, End: 2.020, Kind: KindForeground, By: "snapshotter"},
		{Start: 0, End: 5, Kind: KindPrefetch, By: "snapshotter"},       // not waited on
		{Start: 0, End: 5, Kind: KindBackground, By: "snapshotter"},     // not waited on
		{Start: 0, End: 5, Kind: KindForeground, By: "containerd"},      // not the daemon's
		{Start: 0, End: 5, Kind: KindTOC, By: "snapshotter", Length: 9}, // the pull's
	}
	med, p90 := foregroundLatency(reqs)
	if math.Abs(med-0.020) > 1e-9 || math.Abs(p90-0.030) > 1e-9 {
		t.Errorf("foreground latency %v / %v, want 0.020 / 0.030", med, p90)
	}
	if med, p90 := foregroundLatency(nil); med != 0 || p90 != 0 {
		t.Errorf("no fetches: %v / %v", med, p90)
	}
}

func TestLinkUtilization(t *testing.T) {
	p := wan.Profile{Name: "x", RTT: 40 * time.Millisecond, BitsPerSecond: 100_000_000} // 12.5 MB/s
	if u := linkUtilization(25_000_000, p, 4); math.Abs(u-0.5) > 1e-9 {
		t.Errorf("25 MB in 4 s at 100 Mbit/s: %v, want 0.5", u)
	}
	if u := linkUtilization(25_000_000, wan.Profile{Name: NoWAN}, 4); u != 0 {
		t.Errorf("no emulated link: %v, want 0", u)
	}
	if u := linkUtilization(1, p, 0); u != 0 {
		t.Errorf("no duration: %v", u)
	}
}
