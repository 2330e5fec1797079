package bench

import "testing"

func TestParseStatCPU(t *testing.T) {
	// utime 250 and stime 130 ticks; the command name has a space and a
	// parenthesis.
	line := "4242 (lazypull snap) d)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 130 0 0 20 0 12 0 100 0 0"
	if got := parseStatCPU(line); got != 3.8 {
		t.Fatalf("parseStatCPU = %v, want 3.8", got)
	}
	if got := parseStatCPU("garbage"); got != 0 {
		t.Fatalf("parseStatCPU(garbage) = %v", got)
	}
	if got := cpuSeconds(-1); got != 0 {
		t.Fatalf("cpuSeconds of no process = %v", got)
	}
}
