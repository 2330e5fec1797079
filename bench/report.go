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

// Write stores the result in dir as results.json, results.md and one
// chart per profile (cold-start-<profile>.svg).
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
		if err := res.chart(p.Name, filepath.Join(dir, "cold-start-"+p.Name+".svg")); err != nil {
			return fmt.Errorf("chart for %s: %w", p.Name, err)
		}
	}
	return nil
}

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
	fmt.Fprintln(w, "| image | layers | compressed | uncompressed | eStargz | start-up files |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|")
	for _, im := range res.Images {
		fmt.Fprintf(w, "| %s: %s | %d | %s | %s | %s | %d |\n", im.Name, im.Description, im.Layers,
			human(im.CompressedBytes), human(im.UncompressedBytes), human(im.EStargzBytes), im.PrioritizedFiles)
	}
	for _, p := range res.Profiles {
		fmt.Fprintf(w, "\n### %s (RTT %s, %d Mbit/s)\n\n", p.Name, p.RTT, p.BitsPerSecond/1_000_000)
		fmt.Fprintln(w, "| image | mode | pull s | run s | total s | vs full pull | vs limit | MB received | snapshotter peak RSS |")
		fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|")
		for _, s := range res.Summary {
			if s.Profile != p.Name {
				continue
			}
			fmt.Fprintf(w, "| %s | %s | %.2f | %.2f | **%.2f** | %.2fx | %.2fx | %.1f | %s |\n", s.Image, s.Mode,
				s.PullSeconds, s.ReadySeconds, s.TotalSeconds, s.VsFullPull, s.VsLimit, float64(s.BytesReceived)/1e6, mb(s.PeakRSSBytes))
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
	var names []string
	for _, im := range res.Images {
		names = append(names, im.Name)
	}
	p := plot.New()
	p.Title.Text = "Pull + start to first useful output (" + profile + ")"
	p.Y.Label.Text = "seconds, median"
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(40)
	series := append(append([]string{}, modeNames()...), "limit")
	w := vg.Points(14)
	for i, name := range series {
		vals := make(plotter.Values, len(names))
		for j, img := range names {
			if name == "limit" {
				if l := res.limitOf(img, profile); l != nil {
					vals[j] = l.Seconds
				}
				continue
			}
			for _, s := range res.Summary {
				if s.Image == img && s.Profile == profile && string(s.Mode) == name {
					vals[j] = s.TotalSeconds
				}
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(i)
		if name == "limit" {
			bars.Color = color.Gray{Y: 150}
		}
		bars.Offset = w * vg.Length(float64(i)-float64(len(series)-1)/2)
		p.Add(bars)
		p.Legend.Add(name, bars)
	}
	p.NominalX(names...)
	p.Y.Max *= 1.35 // room for the legend above the bars
	return p.Save(vg.Points(float64(max(520, 120*len(names)+200))), 4*vg.Inch, path)
}

func modeNames() []string {
	var out []string
	for _, m := range Modes {
		out = append(out, string(m))
	}
	return out
}

// Table returns a short plain-text comparison for the terminal.
func (res *Result) Table() string {
	var b strings.Builder
	for _, p := range res.Profiles {
		fmt.Fprintf(&b, "%s\n", p.Name)
		fmt.Fprintf(&b, "  %-8s %-19s %8s %8s %8s %10s %9s %9s\n", "image", "mode", "pull", "run", "total", "vs full", "vs limit", "MB")
		for _, s := range res.Summary {
			if s.Profile != p.Name {
				continue
			}
			fmt.Fprintf(&b, "  %-8s %-19s %7.2fs %7.2fs %7.2fs %9.2fx %8.2fx %9.1f\n", s.Image, s.Mode, s.PullSeconds, s.ReadySeconds, s.TotalSeconds, s.VsFullPull, s.VsLimit, float64(s.BytesReceived)/1e6)
		}
		for _, l := range res.Limits {
			if l.Profile == p.Name {
				fmt.Fprintf(&b, "  %-8s %-19s %35.2fs\n", l.Image, "limit", l.Seconds)
			}
		}
	}
	return b.String()
}
