package bench

import (
	"bytes"
	"fmt"
	"html"
	"os"
	"path/filepath"
	"strings"
)

// writeHTML writes a self-contained report: the tables, the charts and
// the timelines inline (the SVG files are read back from dir).
func (res *Result) writeHTML(path, dir string) error {
	var b bytes.Buffer
	e := html.EscapeString
	b.WriteString(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lazypull bench</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}
h2{margin-top:2em} .note{color:#555;font-size:90%}
svg{max-width:100%;height:auto;border:1px solid #eee}
</style></head><body>
`)
	fmt.Fprintf(&b, "<h1>lazypull bench</h1>\n<p class=note>Cold starts, median of the runs; containerd %s; host %s; measured %s.</p>\n",
		e(res.Containerd), e(res.Host), e(res.Started.Format("2006-01-02 15:04 UTC")))
	b.WriteString("<table><tr><th>image</th><th>command</th><th>ready when</th><th>layers</th><th>compressed</th><th>eStargz</th><th>start-up files</th></tr>\n")
	for _, im := range res.Images {
		cmd := strings.Join(im.Cmd, " ")
		if cmd == "" {
			cmd = "(the image's)"
		}
		ready := "exit"
		if im.Ready != "" {
			ready = im.Ready
		}
		name := im.Name
		if im.Description != "" {
			name += ": " + im.Description
		}
		fmt.Fprintf(&b, "<tr><td>%s</td><td><code>%s</code></td><td><code>%s</code></td><td>%d</td><td>%s</td><td>%s</td><td>%d</td></tr>\n",
			e(name), e(cmd), e(ready), im.Layers, human(im.CompressedBytes), human(im.EStargzBytes), im.PrioritizedFiles)
	}
	b.WriteString("</table>\n")
	tls := res.timelines()
	for _, p := range res.Profiles {
		fmt.Fprintf(&b, "<h2>%s</h2>\n", e(p.Name))
		fmt.Fprintf(&b, "<table><tr><th>image</th><th>mode</th><th>pull s</th><th>run s</th><th>total s</th><th>vs full pull</th><th>vs peer</th><th>vs limit</th><th>MB received</th><th>link used</th><th>snapshotter MB fg / bg</th><th>foreground ms median / p90</th><th>requests</th><th>snapshotter peak RSS</th><th>snapshotter CPU s</th></tr>\n")
		for _, s := range res.Summary {
			if s.Profile != p.Name {
				continue
			}
			fgbg := "-"
			if s.ForegroundBytes+s.BackgroundBytes > 0 {
				fgbg = fmt.Sprintf("%.1f / %.1f", float64(s.ForegroundBytes)/1e6, float64(s.BackgroundBytes)/1e6)
			}
			fmt.Fprintf(&b, "<tr><td>%s</td><td>%s</td><td>%.2f</td><td>%.2f</td><td><b>%.2f</b></td><td>%s</td><td>%s</td><td>%s</td><td>%.1f</td><td>%s</td><td>%s</td><td>%s</td><td>%d</td><td>%s</td><td>%s</td></tr>\n",
				e(s.Image), e(string(s.Mode)), s.PullSeconds, s.ReadySeconds, s.TotalSeconds, ratio(s.VsFullPull), ratio(s.VsPeer), ratio(s.VsLimit), float64(s.BytesReceived)/1e6,
				percent(s.LinkUtilization), fgbg, latency(s.ForegroundLatencyMedian, s.ForegroundLatencyP90), s.Requests, mb(s.PeakRSSBytes), cpuSecs(s.DaemonCPUSeconds))
		}
		b.WriteString("</table>\n<p class=note>Phases: when each ended, median seconds since the pull began.</p>\n<table><tr><th>image</th><th>mode</th>")
		for _, ph := range PhaseNames {
			fmt.Fprintf(&b, "<th>%s</th>", e(ph))
		}
		b.WriteString("</tr>\n")
		for _, s := range res.Summary {
			if s.Profile != p.Name {
				continue
			}
			fmt.Fprintf(&b, "<tr><td>%s</td><td>%s</td>", e(s.Image), e(string(s.Mode)))
			for _, ph := range s.Phases {
				fmt.Fprintf(&b, "<td>%.2f</td>", ph.Seconds)
			}
			b.WriteString("</tr>\n")
		}
		b.WriteString("</table>\n")
		if svg, err := os.ReadFile(filepath.Join(dir, chartFile(p.Name))); err == nil {
			b.Write(stripXMLHeader(svg))
			b.WriteString("\n")
		}
		for _, c := range costCharts {
			if svg, err := os.ReadFile(filepath.Join(dir, costChartFile(c.file, p.Name))); err == nil && res.hasCost(p.Name, c.value) {
				b.Write(stripXMLHeader(svg))
				b.WriteString("\n")
			}
		}
		b.WriteString("<h3>Timelines</h3>\n<p class=note>One run per mode (the one closest to the median): every registry request from its start to its end, coloured by kind; dashed lines end the phases; above, the link's utilization. Hover a bar for its details.</p>\n")
		for _, tl := range tls {
			if tl.sample.Profile != p.Name {
				continue
			}
			b.Write(tl.svg)
			b.WriteString("\n")
		}
	}
	b.WriteString("</body></html>\n")
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// stripXMLHeader drops an SVG file's XML declaration and doctype, for
// inlining it in HTML.
func stripXMLHeader(svg []byte) []byte {
	if i := bytes.Index(svg, []byte("<svg")); i > 0 {
		return svg[i:]
	}
	return svg
}
