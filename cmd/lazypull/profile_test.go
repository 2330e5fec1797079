package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/profile"
	"github.com/lazypull/lazypull/remote/remotetest"
	"github.com/lazypull/lazypull/service"
)

// `lazypull profile push`, `pull` and `show` through a real registry: a
// saved profile is pushed as a referrer of the image's manifest, pulled
// into another directory and printed.
func TestProfileCommands(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("not really a layer")})
	layer := img.Layers[0].Digest
	p := &profile.Profile{Version: profile.Version, Image: img.ManifestDesc.Digest, Runs: 2,
		Layers: []profile.Layer{{Digest: layer, Chunks: []int64{300, 0, 100}}}}
	src := t.TempDir()
	if _, err := service.SaveProfile(src, p); err != nil {
		t.Fatal(err)
	}
	args := func(a ...string) []string { return append(append(a, hermetic(t)...), img.Ref) }

	out, _, err := run(t, args("profile", "push", "--dir", src)...)
	if err != nil || !strings.Contains(out, "pushed") || !strings.Contains(out, "2 runs, 3 chunks") {
		t.Fatalf("profile push: %q, %v", out, err)
	}

	dst := t.TempDir()
	out, _, err = run(t, args("profile", "pull", "--dir", dst)...)
	if err != nil || !strings.Contains(out, "saved") {
		t.Fatalf("profile pull: %q, %v", out, err)
	}
	got, path, err := service.LoadProfile(dst, img.ManifestDesc.Digest)
	if err != nil || got.Runs != 2 || got.Layer(layer) == nil || got.ChunkCount() != 3 {
		t.Fatalf("pulled profile %+v, %v", got, err)
	}

	out, _, err = run(t, "profile", "show", path)
	if err != nil || !strings.Contains(out, layer.String()+": 3 chunks, offsets [300 0 100]") {
		t.Fatalf("profile show FILE: %q, %v", out, err)
	}
	out, _, err = run(t, args("profile", "show", "--json", "--dir", dst)...)
	if err != nil || !strings.Contains(out, `"chunks": [`) || !strings.Contains(out, img.ManifestDesc.Digest.String()) {
		t.Fatalf("profile show --json REF: %q, %v", out, err)
	}
	out, _, err = run(t, args("profile", "pull", "-o", "-")...)
	if err != nil || !strings.Contains(out, `"version":1`) {
		t.Fatalf("profile pull -o -: %q, %v", out, err)
	}
}

func TestProfileCommandErrors(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", remotetest.Layer{Data: []byte("layer")})
	// Nothing saved, nothing in the registry.
	_, _, err := run(t, append([]string{"profile", "push", "--dir", t.TempDir()}, append(hermetic(t), img.Ref)...)...)
	if err == nil || !strings.Contains(err.Error(), "no profile of") {
		t.Fatalf("push without a saved profile: %v", err)
	}
	_, _, err = run(t, append([]string{"profile", "pull", "--dir", t.TempDir()}, append(hermetic(t), img.Ref)...)...)
	if err == nil || !strings.Contains(err.Error(), "no profile refers to") {
		t.Fatalf("pull without a referrer: %v", err)
	}
	// A file that is not a valid profile.
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"version":1,"runs":1,"layers":[{"digest":"`+digest.FromString("x").String()+`","chunks":[-1]}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = run(t, "profile", "show", bad)
	if !errors.Is(err, profile.ErrInvalid) || !strings.Contains(err.Error(), "negative") {
		t.Fatalf("show of an invalid file: %v", err)
	}
	var ue usageError
	if _, _, err := run(t, "profile", "push"); !errors.As(err, &ue) {
		t.Fatalf("push without REF: %v", err)
	}
}
