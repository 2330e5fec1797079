package bench

import (
	"encoding/json"
	"fmt"
	"image/color"
	"io"
	"os"
	"path/filepath"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// Write stores the result in dir: results.json (every run), results.md
// (medians and ratios), one chart of totals per profile
// (cold-start-<profile>.svg), one request timeline per image, profile and
// mode (timeline-<image>-<profile>-<mode>.svg, of the run closest to the
// median) and report.html bundling them.
func (res *Result) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), b, 0o644); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "results.md"))
	if err != nil {
		return err
	}
	res.Markdown(f)
	if err := f.Close(); err != nil {
		return err
	}
	for _, p := range res.Profiles {
		if err := res.chart(p.Name, filepath.Join(dir, chartFile(p.Name))); err != nil {
			return fmt.Errorf("chart for %s: %w", p.Name, err)
		}
		for _, c := range costCharts {
			if !res.hasCost(p.Name, c.value) {
				continue
			}
			if err := res.barChart(p.Name, filepath.Join(dir, costChartFile(c.file, p.Name)), c.title+" ("+p.Name+")", c.label, false, c.value); err != nil {
				return fmt.Errorf("%s chart for %s: %w", c.file, p.Name, err)
			}
		}
	}
	for _, tl := range res.timelines() {
		if err := os.WriteFile(filepath.Join(dir, tl.file), tl.svg, 0o644); err != nil {
			return err
		}
	}
	return res.writeHTML(filepath.Join(dir, "report.html"), dir)
}

func chartFile(profile string) string { return "cold-start-" + fileSafe(profile) + ".svg" }

func (res *Result) limitOf(img, prof string) *Limit {
	for i := range res.Limits {
		if res.Limits[i].Image == img && res.Limits[i].Profile == prof {
			return &res.Limits[i]
		}
	}
	return nil
}

// Markdown writes the result tables.
func (res *Result) Markdown(w io.Writer) {
	fmt.Fprintf(w, "Cold start, median of the runs; containerd %s; measured %s.\n\n", res.Containerd, res.Started.Format("2006-01-02 15:04 UTC"))
	fmt.Fprintln(w, "| image | command | ready when | layers | compressed | uncompressed | eStargz | start-up files |")
	fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---:|---:|")
	for _, im := range res.Images {
		name := im.Name
		if im.Description != "" {
			name += ": " + im.Description
		}
		cmd := strings.Join(im.Cmd, " ")
		if cmd == "" {
			cmd = "(the image's)"
		}
		ready := "exit"
		if im.Ready != "" {
			ready = "`" + im.Ready + "`"
		}
		fmt.Fprintf(w, "| %s | `%s` | %s | %d | %s | %s | %s | %d |\n", mdEscape(name), mdEscape(cmd), mdEscape(ready), im.Layers,
			human(im.CompressedBytes), human(im.UncompressedBytes), human(im.EStargzBytes), im.PrioritizedFiles)
	}
	for _, p := range res.Profiles {
		if p.Name == NoWAN {
			fmt.Fprintf(w, "\n### %s (the registry and link as they are)\n\n", p.Name)
		} else {
			fmt.Fprintf(w, "\n### %s (RTT %s, %d Mbit/s)\n\n", p.Name, p.RTT, p.BitsPerSecond/1_000_000)
		}
		fmt.Fprintln(w, "| image | mode | pull s | run s | total s | vs full pull | vs peer | vs limit | MB received | link used | snapshotter MB foreground / background | foreground ms median / p90 | requests | snapshotter peak RSS | snapshotter CPU s |")
		fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, s := range res.Summary {
			if s.Profile != p.Name {
				continue
			}
			fgbg := "-"
			if s.ForegroundBytes+s.BackgroundBytes > 0 {
				fgbg = fmt.Sprintf("%.1f / %.1f", float64(s.ForegroundBytes)/1e6, float64(s.BackgroundBytes)/1e6)
			}
			fmt.Fprintf(w, "| %s | %s | %.2f | %.2f | **%.2f** | %s | %s | %s | %.1f | %s | %s | %s | %d | %s | %s |\n", s.Image, s.Mode,
				s.PullSeconds, s.ReadySeconds, s.TotalSeconds, ratio(s.VsFullPull), ratio(s.VsPeer), ratio(s.VsLimit), float64(s.BytesReceived)/1e6,
				percent(s.LinkUtilization), fgbg, latency(s.ForegroundLatencyMedian, s.ForegroundLatencyP90), s.Requests, mb(s.PeakRSSBytes), cpuSecs(s.DaemonCPUSeconds))
		}
		fmt.Fprint(w, "\nPhases (median seconds since the pull began):\n\n")
		fmt.Fprintf(w, "| image | mode | %s |\n", strings.Join(PhaseNames, " | "))
		fmt.Fprintf(w, "|---|---|%s\n", strings.Repeat("---:|", len(PhaseNames)))
		for _, s := range res.Summary {
			if s.Profile != p.Name || len(s.Phases) == 0 {
				continue
			}
			var cells []string
			for _, ph := range s.Phases {
				cells = append(cells, fmt.Sprintf("%.2f", ph.Seconds))
			}
			fmt.Fprintf(w, "| %s | %s | %s |\n", s.Image, s.Mode, strings.Join(cells, " | "))
		}
		if !res.hasLimits(p.Name) {
			continue
		}
		fmt.Fprintln(w, "\n| image | limit s | = local run s | + start-up bytes / bandwidth | + 3 RTT |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|")
		for _, l := range res.Limits {
			if l.Profile != p.Name {
				continue
			}
			bw := 0.0
			if bps := p.BytesPerSecond(); bps > 0 {
				bw = float64(l.ReadBytes) / bps
			}
			fmt.Fprintf(w, "| %s | %.2f | %.2f | %.2f (%s) | %.2f |\n", l.Image, l.Seconds, l.LocalSeconds, bw, human(l.ReadBytes), 3*p.RTT.Seconds())
		}
	}
}

func (res *Result) hasLimits(profile string) bool {
	for _, l := range res.Limits {
		if l.Profile == profile {
			return true
		}
	}
	return false
}

func ratio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", x)
}

// percent formats a share (0.35 → "35%"), "-" for none.
func percent(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", 100*x)
}

// latency formats a median / p90 pair of seconds in milliseconds.
func latency(med, p90 float64) string {
	if med == 0 && p90 == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f / %.0f", 1000*med, 1000*p90)
}

func cpuSecs(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", x)
}

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", "\\|") }

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.0f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// chart draws grouped bars: per image, each mode's total and the limit.
func (res *Result) chart(profile, path string) error {
	return res.barChart(profile, path, "Pull + start to first useful output ("+profile+")", "seconds, median", res.hasLimits(profile),
		func(s Summary) float64 { return s.TotalSeconds })
}

// costCharts are the per-run costs drawn beside the totals, one chart
// each: file name prefix, title, axis label and the value.
var costCharts = []struct {
	file, title, label string
	value              func(Summary) float64
}{
	{"daemon-cpu", "Snapshotter CPU-seconds per cold start", "CPU seconds, median", func(s Summary) float64 { return s.DaemonCPUSeconds }},
	{"link-utilization", "Link utilization during the run", "% of link rate x total time, median", func(s Summary) float64 { return 100 * s.LinkUtilization }},
	{"foreground-latency", "Foreground fetch latency (p90)", "milliseconds, median of runs", func(s Summary) float64 { return 1000 * s.ForegroundLatencyP90 }},
}

func costChartFile(prefix, profile string) string { return prefix + "-" + fileSafe(profile) + ".svg" }

// hasCost reports whether any summary of the profile has a cost value.
func (res *Result) hasCost(profile string, value func(Summary) float64) bool {
	for _, s := range res.Summary {
		if s.Profile == profile && value(s) > 0 {
			return true
		}
	}
	return false
}

// barChart draws grouped bars of value: per image, one bar per mode (and
// the limit when withLimit).
func (res *Result) barChart(profile, path, title, label string, withLimit bool, value func(Summary) float64) error {
	var names []string
	for _, im := range res.Images {
		names = append(names, im.Name)
	}
	modes := res.modeNames()
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = label
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(40)
	series := modes
	if withLimit {
		series = append(series, "limit")
	}
	w := vg.Points(14)
	type bar struct {
		name  string
		color int // the mode's colour, the same in every chart
		vals  plotter.Values
	}
	var drawn []bar
	for i, name := range series {
		vals := make(plotter.Values, len(names))
		any := false
		for j, img := range names {
			if name == "limit" {
				if l := res.limitOf(img, profile); l != nil {
					vals[j] = l.Seconds
				}
			} else {
				for _, s := range res.Summary {
					if s.Image == img && s.Profile == profile && string(s.Mode) == name {
						vals[j] = value(s)
					}
				}
			}
			any = any || vals[j] != 0
		}
		// A cost chart leaves out the modes it has nothing for (a full
		// pull has no snapshotter CPU).
		if any || withLimit {
			drawn = append(drawn, bar{name, i, vals})
		}
	}
	for i, b := range drawn {
		bars, err := plotter.NewBarChart(b.vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(b.color)
		if b.name == "limit" {
			bars.Color = color.Gray{Y: 150}
		}
		bars.Offset = w * vg.Length(float64(i)-float64(len(drawn)-1)/2)
		p.Add(bars)
		p.Legend.Add(b.name, bars)
	}
	p.NominalX(names...)
	p.Y.Max *= 1.35 // room for the legend above the bars
	return p.Save(vg.Points(float64(max(520, 30*len(drawn)*len(names)+200))), 4*vg.Inch, path)
}

// modeNames lists the result's modes, in the order measured.
func (res *Result) modeNames() []string {
	var out []string
	seen := map[Mode]bool{}
	add := func(m Mode) {
		if !seen[m] {
			seen[m] = true
			out = append(out, string(m))
		}
	}
	for _, m := range res.Modes {
		add(m)
	}
	for _, s := range res.Summary {
		add(s.Mode)
	}
	return out
}

// Table returns a short plain-text comparison for the terminal.
func (res *Result) Table() string {
	var b strings.Builder
	for _, p := range res.Profiles {
		fmt.Fprintf(&b, "%s\n", p.Name)
		fmt.Fprintf(&b, "  %-8s %-21s %8s %8s %8s %8s %8s %9s %8s %6s %7s\n", "image", "mode", "pull", "run", "total", "vs full", "vs peer", "vs limit", "MB", "link", "CPU s")
		for _, s := range res.Summary {
			if s.Profile != p.Name {
				continue
			}
			fmt.Fprintf(&b, "  %-8s %-21s %7.2fs %7.2fs %7.2fs %8s %8s %9s %8.1f %6s %7s\n", s.Image, s.Mode, s.PullSeconds, s.ReadySeconds, s.TotalSeconds,
				ratio(s.VsFullPull), ratio(s.VsPeer), ratio(s.VsLimit), float64(s.BytesReceived)/1e6, percent(s.LinkUtilization), cpuSecs(s.DaemonCPUSeconds))
		}
		for _, l := range res.Limits {
			if l.Profile == p.Name {
				fmt.Fprintf(&b, "  %-8s %-21s %26.2fs\n", l.Image, "limit", l.Seconds)
			}
		}
	}
	return b.String()
}
