package main

import (
	"strings"
	"testing"
	"time"
)

func TestParseProfiles(t *testing.T) {
	ps, err := parseProfiles("40ms-100Mbit, 2ms-1Gbit,500us-800kbit")
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		rtt  time.Duration
		bits int64
	}{{40 * time.Millisecond, 100_000_000}, {2 * time.Millisecond, 1_000_000_000}, {500 * time.Microsecond, 800_000}}
	if len(ps) != len(want) {
		t.Fatalf("%d profiles, want %d", len(ps), len(want))
	}
	for i, w := range want {
		if ps[i].RTT != w.rtt || ps[i].BitsPerSecond != w.bits {
			t.Errorf("profile %d: %+v, want RTT %v and %d bit/s", i, ps[i], w.rtt, w.bits)
		}
	}
	for in, msg := range map[string]string{
		"40ms":          "not RTT-bandwidth",
		"fast-100Mbit":  "bad round-trip time",
		"40ms-100":      "needs a unit",
		"40ms-0Mbit":    "bad bandwidth",
		"40ms-lotsMbit": "bad bandwidth",
		"":              "none given",
	} {
		if _, err := parseProfiles(in); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("parseProfiles(%q) = %v, want an error saying %q", in, err, msg)
		}
	}
}

func TestPickImages(t *testing.T) {
	specs, err := pickImages("python,large")
	if err != nil || len(specs) != 2 || specs[0].Name != "python" || specs[1].Name != "large" {
		t.Fatalf("pickImages: %v %v", specs, err)
	}
	if _, err := pickImages("python,ruby"); err == nil || !strings.Contains(err.Error(), `unknown image "ruby"`) {
		t.Errorf("unknown image: %v", err)
	}
	if _, err := pickImages(" , "); err == nil || !strings.Contains(err.Error(), "none given") {
		t.Errorf("empty list: %v", err)
	}
}
