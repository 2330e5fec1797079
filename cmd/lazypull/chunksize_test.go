package main

import "testing"

func TestParseChunkSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"auto", 0, true},
		{"4096", 4096, true},
		{"64K", 64 << 10, true},
		{"4M", 4 << 20, true},
		{"256M", 256 << 20, true},
		{"4095", 0, false},
		{"3K", 0, false},
		{"0", 0, false},
		{"0M", 0, false},
		{"257M", 0, false},
		{"-1", 0, false},
		{"big", 0, false},
		{"", 0, false},
	} {
		got, err := parseChunkSize(c.in)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("parseChunkSize(%q) = %d, %v; want %d, ok %v", c.in, got, err, c.want, c.ok)
		}
	}
}
