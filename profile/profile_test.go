package profile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

var (
	img = digest.FromString("image")
	l1  = digest.FromString("layer1")
	l2  = digest.FromString("layer2")
)

func run(layers ...Layer) *Profile {
	return &Profile{Version: Version, Image: img, Runs: 1, Layers: layers}
}

func TestRoundTrip(t *testing.T) {
	p := run(Layer{Digest: l1, Chunks: []int64{300, 0, 100}, Times: []int64{0, 5, 9}})
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if got.Image != img || got.Runs != 1 || len(got.Layers) != 1 ||
		!slices.Equal(got.Layers[0].Chunks, []int64{300, 0, 100}) || !slices.Equal(got.Layers[0].Times, []int64{0, 5, 9}) {
		t.Fatalf("round trip: %+v", got)
	}
	if got.Layer(l1) == nil || got.Layer(l2) != nil || got.ChunkCount() != 3 {
		t.Fatal("Layer/ChunkCount")
	}
}

func TestDecodeRefuses(t *testing.T) {
	big := make([]int64, MaxChunksPerLayer+1)
	for i := range big {
		big[i] = int64(i)
	}
	many := make([]Layer, MaxLayers+1)
	for i := range many {
		many[i] = Layer{Digest: digest.FromString(fmt.Sprint(i))}
	}
	spread := func(n, per int) []Layer {
		var ls []Layer
		for i := range n {
			cs := make([]int64, per)
			for j := range cs {
				cs[j] = int64(j)
			}
			ls = append(ls, Layer{Digest: digest.FromString(fmt.Sprint(i)), Chunks: cs})
		}
		return ls
	}
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for name, tc := range map[string]struct {
		in   string
		want string
	}{
		"not json":       {`{"version":1,`, "unexpected end"},
		"no version":     {`{"runs":1,"layers":[]}`, "no version"},
		"future version": {`{"version":2,"runs":1}`, "version 2"},
		"trailing data":  {`{"version":1,"runs":1,"layers":[]} {}`, "after top-level value"},
		"zero runs":      {`{"version":1,"runs":0,"layers":[]}`, "runs 0"},
		"bad image":      {`{"version":1,"image":"sha256:zz","runs":1}`, "image digest"},
		"bad layer":      {`{"version":1,"runs":1,"layers":[{"digest":"nope","chunks":[]}]}`, "digest"},
		"twice":          {enc(run(Layer{Digest: l1}, Layer{Digest: l1})), "listed twice"},
		"negative":       {enc(run(Layer{Digest: l1, Chunks: []int64{-1}})), "negative"},
		"repeat offset":  {enc(run(Layer{Digest: l1, Chunks: []int64{5, 5}})), "listed twice"},
		"times length":   {enc(run(Layer{Digest: l1, Chunks: []int64{5}, Times: []int64{1, 2}})), "2 times for 1"},
		"time range":     {enc(run(Layer{Digest: l1, Chunks: []int64{5}, Times: []int64{-3}})), "time -3"},
		"count range":    {enc(run(Layer{Digest: l1, Chunks: []int64{5}, Counts: []int{2}})), "count 2"},
		"layer chunks":   {enc(run(Layer{Digest: l1, Chunks: big})), "more than 65536"},
		"layers":         {enc(run(many...)), "257 layers"},
		"all chunks":     {enc(run(spread(3, MaxChunks/3+1)...)), "in all"},
		"too large":      {`{"version":1,"runs":1,"pad":"` + strings.Repeat("x", MaxEncodedSize) + `"}`, "larger than"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Decode(strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("%v is not ErrInvalid", err)
			}
		})
	}
}

func TestMarshalRefusesInvalid(t *testing.T) {
	if _, err := run(Layer{Digest: l1, Chunks: []int64{-5}}).Marshal(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Marshal of an invalid profile: %v", err)
	}
}

func TestMergeOneKeepsOrder(t *testing.T) {
	p := run(Layer{Digest: l2, Chunks: []int64{9, 3, 7}}, Layer{Digest: l1, Chunks: []int64{1}})
	m := Merge(p)
	if m.Runs != 1 || m.Image != img || len(m.Layers) != 2 {
		t.Fatalf("%+v", m)
	}
	if got := m.Layer(l2).Chunks; !slices.Equal(got, []int64{9, 3, 7}) {
		t.Fatalf("order changed: %v", got)
	}
	if m.Layer(l2).Counts != nil {
		t.Fatal("counts written although every run read every chunk")
	}
}

func TestMergeMeanRank(t *testing.T) {
	// Run a reads A B C D, run b reads C A D B: mean relative ranks
	// A (0+.25)/2, B (.25+.75)/2, C (.5+0)/2, D (.75+.5)/2.
	a := run(Layer{Digest: l1, Chunks: []int64{10, 20, 30, 40}})
	b := run(Layer{Digest: l1, Chunks: []int64{30, 10, 40, 20}})
	m1, m2 := Merge(a, b), Merge(b, a)
	want := []int64{10, 30, 20, 40} // A .125, C .25, B .5, D .625
	if got := m1.Layer(l1).Chunks; !slices.Equal(got, want) {
		t.Fatalf("Merge(a, b) = %v, want %v", got, want)
	}
	if got := m2.Layer(l1).Chunks; !slices.Equal(got, want) {
		t.Fatalf("Merge(b, a) = %v, want %v (order of inputs matters)", got, want)
	}
	if m1.Runs != 2 {
		t.Fatalf("runs %d", m1.Runs)
	}
}

func TestMergeWeightsAndCounts(t *testing.T) {
	// A profile of 3 runs that read X before Y outweighs one run that
	// read Y before X; Z, read by one run only, gets a count.
	three := &Profile{Version: Version, Image: img, Runs: 3, Layers: []Layer{{Digest: l1, Chunks: []int64{1, 2}}}}
	one := run(Layer{Digest: l1, Chunks: []int64{2, 1, 3}, Times: []int64{0, 10, 20}})
	m := Merge(three, one)
	l := m.Layer(l1)
	if !slices.Equal(l.Chunks, []int64{1, 2, 3}) {
		t.Fatalf("chunks %v", l.Chunks)
	}
	if !slices.Equal(l.Counts, []int{4, 4, 1}) {
		t.Fatalf("counts %v", l.Counts)
	}
	// Times are means over the runs that timed the chunk.
	if !slices.Equal(l.Times, []int64{10, 0, 20}) {
		t.Fatalf("times %v", l.Times)
	}
	if m.Runs != 4 {
		t.Fatalf("runs %d", m.Runs)
	}
	if err := m.Validate(); err != nil {
		t.Fatal(err)
	}
	// Merging the merged profile with more runs stays valid and keeps
	// the counts within runs.
	if err := Merge(m, one, one).Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestMergeTimes(t *testing.T) {
	a := run(Layer{Digest: l1, Chunks: []int64{1, 2}, Times: []int64{0, 100}})
	b := run(Layer{Digest: l1, Chunks: []int64{1, 2}, Times: []int64{10, 300}})
	if got := Merge(a, b).Layer(l1).Times; !slices.Equal(got, []int64{5, 200}) {
		t.Fatalf("times %v", got)
	}
}

func TestMergeBounds(t *testing.T) {
	cs := make([]int64, MaxChunksPerLayer)
	for i := range cs {
		cs[i] = int64(i)
	}
	a := run(Layer{Digest: l1, Chunks: cs})
	cs2 := make([]int64, MaxChunksPerLayer)
	for i := range cs2 {
		cs2[i] = int64(MaxChunksPerLayer + i)
	}
	b := run(Layer{Digest: l1, Chunks: cs2})
	m := Merge(a, b)
	if n := len(m.Layer(l1).Chunks); n != MaxChunksPerLayer {
		t.Fatalf("%d chunks after merge, want the bound %d", n, MaxChunksPerLayer)
	}
	if err := m.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Marshal(); err != nil {
		t.Fatal(err)
	}
	// Images of different subjects merge without one.
	other := run(Layer{Digest: l2, Chunks: []int64{1}})
	other.Image = digest.FromString("other")
	if Merge(a, other).Image != "" {
		t.Fatal("merge of two images kept a subject")
	}
	if Merge() != nil || Merge(nil) != nil {
		t.Fatal("Merge of nothing")
	}
}
