package bench

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
)

func TestWithFirstNode(t *testing.T) {
	for _, c := range []struct{ in, want []Mode }{
		{[]Mode{ModeFull, ModeLazy}, []Mode{ModeFull, ModeLazy}},
		{[]Mode{ModeSecondNode}, []Mode{ModeFirstNode, ModeSecondNode}},
		{[]Mode{ModeSecondNode, ModeFull, ModeFirstNode}, []Mode{ModeFirstNode, ModeSecondNode, ModeFull}},
		{[]Mode{ModeFirstNode, ModeLazy}, []Mode{ModeFirstNode, ModeLazy}}, // a first node alone only records and pushes
	} {
		if got := withFirstNode(c.in); !slices.Equal(got, c.want) {
			t.Errorf("withFirstNode(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// TestModeWiring checks which daemon each mode starts and that only the
// profile modes give the daemon a [profile] table (a daemon without the
// profile settings rejects unknown tables).
func TestModeWiring(t *testing.T) {
	want := map[Mode]daemonKind{ModeFull: noDaemon, ModeLazy: lazypullDaemon, ModeOptimized: lazypullDaemon,
		ModePeer: peerDaemon, ModeFirstNode: lazypullDaemon, ModeSecondNode: lazypullDaemon, "other": noDaemon}
	for m, k := range want {
		if kindOf(m) != k {
			t.Errorf("%s starts daemon kind %d, want %d", m, kindOf(m), k)
		}
		if m.fresh() != (k != noDaemon) {
			t.Errorf("%s: fresh() = %v", m, m.fresh())
		}
		cfg := m.profileConfig()
		if m.profileNode() != (cfg != "") {
			t.Errorf("%s: profile config %q", m, cfg)
		}
	}
	first, second := ModeFirstNode.profileConfig(), ModeSecondNode.profileConfig()
	for _, kv := range []string{"record = true", "push = true", "lookup = false"} {
		if !strings.Contains(first, kv) {
			t.Errorf("first node's config %q lacks %q", first, kv)
		}
	}
	for _, kv := range []string{"lookup = true", "push = false"} {
		if !strings.Contains(second, kv) {
			t.Errorf("second node's config %q lacks %q", second, kv)
		}
	}
}

func TestNewRunnerChecksPeerAndProfile(t *testing.T) {
	w := []Workload{{Name: "x", Source: "127.0.0.1:1/x:v1"}}
	_, err := NewRunner(Config{Workloads: w, Modes: []Mode{ModePeer}})
	if err == nil || !strings.Contains(err.Error(), PeerBinary) {
		t.Errorf("peer mode without its binary: %v", err)
	}
	_, err = NewRunner(Config{Workloads: w, Modes: []Mode{ModeSecondNode}, Snapshotter: "/bin/true", SnapshotterConfig: "[profile]\nlookup = true\n"})
	if err == nil || !strings.Contains(err.Error(), "[profile]") {
		t.Errorf("profile modes with a [profile] of the user's: %v", err)
	}
	r, err := NewRunner(Config{Workloads: w, Modes: []Mode{ModeFull, ModeSecondNode, ModePeer}, Snapshotter: "/bin/true", Peer: "/bin/true"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []Mode{ModeFull, ModeFirstNode, ModeSecondNode, ModePeer}; !slices.Equal(r.cfg.Modes, want) {
		t.Errorf("modes %v, want %v", r.cfg.Modes, want)
	}
}

// TestHasReferrer finds a profile pushed under the OCI fallback tag of a
// manifest in a real registry, and none before.
func TestHasReferrer(t *testing.T) {
	reg := lab.NewRegistry(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := fixture.NewLayer()
	l.FileBytes("a", []byte("a"))
	img, err := fixture.BuildImage(fixture.DefaultConfig(), l)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Push(ctx, "app:v1", img); err != nil {
		t.Fatal(err)
	}
	d := img.Descriptor().Digest
	found, err := hasReferrer(ctx, reg.URL(), "app", d)
	if err != nil || found {
		t.Fatalf("before any profile: found %v, %v", found, err)
	}
	// Another manifest's fallback tag is not this one's.
	if _, err := reg.Push(ctx, "app:"+referrersTag(digest.FromString("other")), img); err != nil {
		t.Fatal(err)
	}
	if found, err := hasReferrer(ctx, reg.URL(), "app", d); err != nil || found {
		t.Fatalf("another digest's tag: found %v, %v", found, err)
	}
	if _, err := reg.Push(ctx, "app:"+referrersTag(d), img); err != nil {
		t.Fatal(err)
	}
	if found, err := hasReferrer(ctx, reg.URL(), "app", d); err != nil || !found {
		t.Fatalf("after the fallback tag: found %v, %v", found, err)
	}
	if found, err := hasReferrer(ctx, reg.URL(), "other", d); err != nil || found {
		t.Fatalf("another repository: found %v, %v", found, err)
	}
}
