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
	for rep, totals := range [][3]float64{{10, 5, 2}, {12, 4, 3}, {11, 6, 2.5}} {
		for i, m := range Modes {
			res.Samples = append(res.Samples, Sample{Image: "python", Profile: p.Name, Mode: m, Repeat: rep + 1,
				PullSeconds: totals[i] / 2, ReadySeconds: totals[i] / 2, TotalSeconds: totals[i], BytesReceived: int64(totals[i] * 1e6), PeakRSSBytes: int64(rep) << 20})
		}
	}
	res.Limits = []Limit{{Image: "python", Profile: p.Name, LocalSeconds: 0.2, ReadBytes: 12_500_000, Seconds: 2}}
	res.Summary = summarize(res)
	return res
}

func TestSummarizeRatios(t *testing.T) {
	res := sampleResult()
	if len(res.Summary) != 3 {
		t.Fatalf("%d summary rows, want 3", len(res.Summary))
	}
	want := map[Mode]struct{ total, vsFull, vsLimit float64 }{
		ModeFull:      {11, 1, 5.5},
		ModeLazy:      {5, 5.0 / 11, 2.5},
		ModeOptimized: {2.5, 2.5 / 11, 1.25},
	}
	for _, s := range res.Summary {
		w := want[s.Mode]
		if s.TotalSeconds != w.total || math.Abs(s.VsFullPull-w.vsFull) > 1e-9 || math.Abs(s.VsLimit-w.vsLimit) > 1e-9 {
			t.Errorf("%s: total %v vs full %v vs limit %v, want %v %v %v", s.Mode, s.TotalSeconds, s.VsFullPull, s.VsLimit, w.total, w.vsFull, w.vsLimit)
		}
		if s.PeakRSSBytes != 2<<20 {
			t.Errorf("%s: peak RSS %d, want the largest of the runs", s.Mode, s.PeakRSSBytes)
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
	if err := json.Unmarshal(b, &back); err != nil || len(back.Samples) != 9 {
		t.Fatalf("results.json: %v, %d samples", err, len(back.Samples))
	}
	md, _ := os.ReadFile(filepath.Join(dir, "results.md"))
	for _, want := range []string{"| python | lazypull | 2.50 | 2.50 | **5.00** | 0.45x | 2.50x |", "| python | 2.00 | 0.20 | 1.00 (11.9 MiB) | 0.12 |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q:\n%s", want, md)
		}
	}
	svg, err := os.ReadFile(filepath.Join(dir, "cold-start-40ms-100Mbit.svg"))
	if err != nil || !strings.Contains(string(svg), "<svg") || !strings.Contains(string(svg), "python") {
		t.Fatalf("chart: %v", err)
	}
	if tb := res.Table(); !strings.Contains(tb, "lazypull-optimized") || !strings.Contains(tb, "limit") {
		t.Errorf("table:\n%s", tb)
	}
}
