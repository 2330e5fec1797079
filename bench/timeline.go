package bench

import (
	"bytes"
	"fmt"
	"html"
	"math"
	"sort"
	"strings"
)

// kindColors colour the request kinds in timelines.
var kindColors = map[string]string{
	KindResolve:    "#7f7f7f",
	KindManifest:   "#bcbd22",
	KindLayer:      "#8c564b",
	KindTOC:        "#9467bd",
	KindForeground: "#d62728",
	KindReadAhead:  "#ff7f0e",
	KindPrefetch:   "#2ca02c",
	KindBackground: "#1f77b4",
}

// timeline is one rendered waterfall.
type timeline struct {
	file, title string
	sample      *Sample
	svg         []byte
}

// timelines renders, per image, profile and mode, the run whose total is
// closest to the median.
func (res *Result) timelines() []timeline {
	var out []timeline
	for _, sum := range res.Summary {
		var best *Sample
		for i := range res.Samples {
			s := &res.Samples[i]
			if s.Image != sum.Image || s.Profile != sum.Profile || s.Mode != sum.Mode {
				continue
			}
			if best == nil || math.Abs(s.TotalSeconds-sum.TotalSeconds) < math.Abs(best.TotalSeconds-sum.TotalSeconds) {
				best = s
			}
		}
		if best == nil || len(best.Requests) == 0 {
			continue // results from before timelines were recorded
		}
		var bps float64
		for _, p := range res.Profiles {
			if p.Name == sum.Profile {
				bps = p.BytesPerSecond()
			}
		}
		title := fmt.Sprintf("%s, %s, %s (run #%d): ready after %.2fs, %s in %d requests", sum.Image, sum.Mode, sum.Profile, best.Repeat, best.TotalSeconds, human(best.BytesReceived), len(best.Requests))
		out = append(out, timeline{
			file:   fmt.Sprintf("timeline-%s-%s-%s.svg", fileSafe(sum.Image), fileSafe(sum.Profile), fileSafe(string(sum.Mode))),
			title:  title,
			sample: best,
			svg:    TimelineSVG(best, title, bps),
		})
	}
	return out
}

// TimelineSVG draws a run's registry requests as a waterfall: one bar per
// request from its start to its end, coloured by kind, the run's phases as
// vertical lines, and above them the link's utilization (bytes received
// per time slice; against the bandwidth when bps > 0).
func TimelineSVG(s *Sample, title string, bps float64) []byte {
	const (
		width   = 1000.0
		left    = 70.0
		right   = 20.0
		top     = 40.0
		utilH   = 80.0
		gap     = 50.0
		legendH = 30.0
		bins    = 200
	)
	plotW := width - left - right
	end := s.TotalSeconds
	for _, q := range s.Requests {
		end = max(end, q.End)
	}
	if end <= 0 {
		end = 1
	}
	x := func(t float64) float64 { return left + plotW*max(0, t)/end }

	// Rows: every request its own row when few, else packed into lanes.
	reqs := append([]Request(nil), s.Requests...)
	sort.SliceStable(reqs, func(i, j int) bool { return reqs[i].Start < reqs[j].Start })
	rows := make([]int, len(reqs))
	nrows := len(reqs)
	if len(reqs) > 250 {
		var laneEnd []float64
		for i, q := range reqs {
			lane := -1
			for l, e := range laneEnd {
				if e <= q.Start {
					lane = l
					break
				}
			}
			if lane < 0 {
				lane = len(laneEnd)
				laneEnd = append(laneEnd, 0)
			}
			laneEnd[lane] = q.End + end/float64(plotW) // one pixel apart
			rows[i] = lane
		}
		nrows = len(laneEnd)
	} else {
		for i := range rows {
			rows[i] = i
		}
	}
	rowH := math.Max(2, math.Min(10, 500/math.Max(1, float64(nrows))))
	waterTop := top + utilH + gap
	waterH := rowH * float64(max(nrows, 1))
	axisY := waterTop + waterH + 4
	height := axisY + 30 + legendH

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="11">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="18" font-size="13" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))

	// Link utilization: bytes spread evenly over each request's time.
	var util [bins]float64
	slice := end / bins
	for _, q := range reqs {
		if q.Bytes <= 0 {
			continue
		}
		d := q.End - q.Start
		if d <= 0 {
			i := min(bins-1, int(q.Start/slice))
			util[max(i, 0)] += float64(q.Bytes)
			continue
		}
		for i := max(0, int(q.Start/slice)); i < bins && float64(i)*slice < q.End; i++ {
			lo, hi := max(q.Start, float64(i)*slice), min(q.End, float64(i+1)*slice)
			if hi > lo {
				util[i] += float64(q.Bytes) * (hi - lo) / d
			}
		}
	}
	peak := bps
	label := fmt.Sprintf("link: bytes received per %.0f ms (100%% = %.0f Mbit/s)", slice*1000, bps*8/1e6)
	if peak <= 0 {
		for _, u := range util {
			peak = max(peak, u/slice)
		}
		label = fmt.Sprintf("link: bytes received per %.0f ms (top = %.1f MB/s)", slice*1000, peak/1e6)
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" fill="#555">%s</text>`+"\n", left, top-4, html.EscapeString(label))
	fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="%.0f" height="%.0f" fill="#f4f4f4"/>`+"\n", left, top, plotW, utilH)
	if peak > 0 {
		bw := plotW / bins
		for i, u := range util {
			if u <= 0 {
				continue
			}
			h := math.Min(1, u/slice/peak) * utilH
			fmt.Fprintf(&b, `<rect x="%.2f" y="%.2f" width="%.2f" height="%.2f" fill="#555"/>`+"\n", left+float64(i)*bw, top+utilH-h, bw, h)
		}
	}

	// Requests.
	fmt.Fprintf(&b, `<text x="4" y="%.0f" fill="#555">requests</text>`+"\n", waterTop+10)
	for i, q := range reqs {
		y := waterTop + float64(rows[i])*rowH
		w := math.Max(1, x(q.End)-x(q.Start))
		col := kindColors[q.Kind]
		if col == "" {
			col = "#000"
		}
		if q.Err != "" {
			col = "#000"
		}
		tip := fmt.Sprintf("%s by %s: %.3f-%.3fs, %s", q.Kind, q.By, q.Start, q.End, human(q.Bytes))
		if q.Layer != "" {
			tip += " " + shortDigest(q.Layer)
		}
		if q.Length > 0 {
			tip += fmt.Sprintf(" [%d+%d]", q.Offset, q.Length)
		}
		if q.Err != "" {
			tip += " error: " + q.Err
		}
		fmt.Fprintf(&b, `<rect x="%.2f" y="%.2f" width="%.2f" height="%.2f" fill="%s"><title>%s</title></rect>`+"\n",
			x(q.Start), y, w, math.Max(1, rowH-1), col, html.EscapeString(tip))
	}

	// Phases: dashed lines, labels in the band above the requests, each
	// on the first row where it overlaps no other (right-aligned near the
	// right edge).
	var taken [][][2]float64 // per row, the labels' extents
	for _, ph := range s.Phases {
		px := x(ph.Seconds)
		fmt.Fprintf(&b, `<line x1="%.2f" y1="%.0f" x2="%.2f" y2="%.0f" stroke="#333" stroke-dasharray="3,3"/>`+"\n", px, top, px, axisY)
		text := fmt.Sprintf("%s %.2fs", ph.Name, ph.Seconds)
		tw := 6 * float64(len(text))
		anchor, x0 := "start", px+2
		if px+2+tw > left+plotW {
			anchor, x0 = "end", px-2-tw
		}
		row := 0
		for ; row < len(taken); row++ {
			free := true
			for _, ext := range taken[row] {
				if x0 < ext[1]+4 && x0+tw > ext[0]-4 {
					free = false
					break
				}
			}
			if free {
				break
			}
		}
		if row == len(taken) {
			taken = append(taken, nil)
		}
		taken[row] = append(taken[row], [2]float64{x0, x0 + tw})
		tx := x0
		if anchor == "end" {
			tx = x0 + tw
		}
		fmt.Fprintf(&b, `<text x="%.2f" y="%.0f" fill="#333" text-anchor="%s">%s</text>`+"\n", tx, top+utilH+11+float64(row%4)*11, anchor, html.EscapeString(text))
	}

	// Axis.
	fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#000"/>`+"\n", left, axisY, left+plotW, axisY)
	step := niceStep(end / 10)
	for t := 0.0; t <= end+1e-9; t += step {
		fmt.Fprintf(&b, `<line x1="%.2f" y1="%.0f" x2="%.2f" y2="%.0f" stroke="#000"/>`+"\n", x(t), axisY, x(t), axisY+4)
		fmt.Fprintf(&b, `<text x="%.2f" y="%.0f" text-anchor="middle">%s</text>`+"\n", x(t), axisY+16, strings.TrimSuffix(fmt.Sprintf("%.2f", t), ".00")+"s")
	}

	// Legend: the kinds present.
	present := map[string]bool{}
	for _, q := range reqs {
		present[q.Kind] = true
	}
	lx := left
	for _, k := range Kinds {
		if !present[k] {
			continue
		}
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="12" height="12" fill="%s"/><text x="%.0f" y="%.0f">%s</text>`+"\n", lx, height-legendH+8, kindColors[k], lx+16, height-legendH+18, k)
		lx += 30 + 7*float64(len(k))
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

func shortDigest(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 {
		d = d[i+1:]
	}
	if len(d) > 12 {
		d = d[:12]
	}
	return d
}

// niceStep rounds a tick step up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if raw <= m*p {
			return m * p
		}
	}
	return 10 * p
}
