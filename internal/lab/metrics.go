package lab

import (
	"bufio"
	"bytes"
	"strconv"
	"strings"
)

// ParseMetrics reads Prometheus text exposition into a map from series
// (`name{labels}` as written) to value. A labelled metric's series are
// also summed under its bare name. Comments and unparsable lines are
// skipped.
func ParseMetrics(b []byte) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		series := line[:i]
		out[series] = v
		if j := strings.IndexByte(series, '{'); j >= 0 {
			out[series[:j]] += v
		}
	}
	return out
}
