package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/rand"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/profile"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/service"
)

// profileWorkload reads three files of the top layer, out of blob order.
const profileWorkload = "cat /data/c /data/a /data/b | sha256sum"

// profileTestImage is busybox plus a layer of random files: a, b, c (read
// by the workload) and a large one nobody reads.
func profileTestImage(t *testing.T) (*fixture.Image, string) {
	t.Helper()
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(11))
	data := map[string][]byte{}
	top := fixture.NewLayer()
	for _, name := range []string{"a", "b", "c", "unread"} {
		n := 300 << 10
		if name == "unread" {
			n = 3 << 20
		}
		data[name] = make([]byte, n)
		rng.Read(data[name])
		top.FileBytes("data/"+name, data[name])
	}
	img, err := fixture.BuildImage(fixture.DefaultConfig(), base, top)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(bytes.Join([][]byte{data["c"], data["a"], data["b"]}, nil))
	return img, hex.EncodeToString(sum[:]) + "  -\n"
}

// rangesCover reports whether every chunk offset of p's layers lies in a
// GET of an explicit byte range of that blob (suffix ranges, the tail
// reads that open a layer, do not count).
func rangesCover(reqs []lab.Request, p *profile.Profile) (missing int) {
	type span struct{ from, to int64 }
	spans := map[digest.Digest][]span{}
	for _, r := range reqs {
		i := strings.LastIndex(r.Path, "/blobs/")
		d := digest.Digest(r.Path[i+len("/blobs/"):])
		for _, part := range strings.Split(strings.TrimPrefix(r.Range, "bytes="), ",") {
			from, to, ok := strings.Cut(strings.TrimSpace(part), "-")
			if !ok || from == "" {
				continue
			}
			f, err1 := strconv.ParseInt(from, 10, 64)
			l, err2 := strconv.ParseInt(to, 10, 64)
			if to == "" {
				l, err2 = 1<<62, nil
			}
			if err1 == nil && err2 == nil {
				spans[d] = append(spans[d], span{f, l})
			}
		}
	}
	for _, l := range p.Layers {
		for _, off := range l.Chunks {
			found := false
			for _, s := range spans[l.Digest] {
				if off >= s.from && off <= s.to {
					found = true
					break
				}
			}
			if !found {
				missing++
			}
		}
	}
	return missing
}

// The profile round trip through a real registry (distribution, which has
// no referrers API: the referrers tag schema) with containerd 2.4: node 1
// runs an image and records its start-up; `lazypull profile push` pushes
// the profile; node 2, a fresh daemon and cache, finds it at the pull and
// fetches its chunks before any container runs, so the workload then
// causes no registry request. A hostile profile (another layer, offsets
// that are no chunk) and one over the size bound, pushed as newer
// referrers, fetch nothing and change nothing served.
func TestLazypullProfile(t *testing.T) {
	img, wantSum := profileTestImage(t)
	cv := convertImage(t, img, estargz.Gzip)
	v := lab.Containerd2()
	reg := lab.NewRegistry(t)
	ref := push(t, reg, "profile/app:v1", cv.image)
	hostsDir, err := reg.WriteHostsDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}

	// Node 1: run, record.
	node1 := newLazyEnv(t, v, reg, lazyOptions{})
	ctx := node1.c.Namespace(t)
	image := node1.pull(t, ctx, ref)
	manifest := image.Target()
	if manifest.MediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("image target is a %s, want a manifest", manifest.MediaType)
	}
	if out := node1.run(t, ctx, image, "sh", "-c", profileWorkload); out != wantSum {
		t.Fatalf("node 1 workload: %q, want %q", out, wantSum)
	}
	dir := filepath.Join(node1.sn.Root(), "profiles")
	var recorded *profile.Profile
	if !waitFor(60*time.Second, func() bool {
		recorded, _, err = service.LoadProfile(dir, manifest.Digest)
		return err == nil
	}) {
		t.Fatalf("no profile recorded in %s within 60 s: %v (daemon log %s)", dir, err, node1.sn.LogPath())
	}
	top := cv.manifest.Layers[len(cv.manifest.Layers)-1].Digest
	if recorded.Layer(top) == nil || len(recorded.Layer(top).Chunks) < 3 {
		t.Fatalf("recorded profile has no chunks of the top layer: %+v", recorded)
	}
	// The order read: c before a before b (each file is one chunk here).
	topIx := layerIndex(t, cv, len(cv.manifest.Layers)-1)
	var firsts []int64
	for _, f := range []string{"data/c", "data/a", "data/b"} {
		n, ok := topIx.Lookup(f)
		if !ok {
			t.Fatalf("%s not in the top layer", f)
		}
		firsts = append(firsts, n.Chunks[0].Offset)
	}
	if pos := positions(recorded.Layer(top).Chunks, firsts); pos == nil || !(pos[0] < pos[1] && pos[1] < pos[2]) {
		t.Fatalf("recorded top layer chunks %v do not hold c, a, b (%v) in that order", recorded.Layer(top).Chunks, firsts)
	}
	unread, _ := topIx.Lookup("data/unread")
	if positions(recorded.Layer(top).Chunks, []int64{unread.Chunks[len(unread.Chunks)-1].Offset}) != nil {
		t.Fatalf("the end of a file nobody read is in the profile")
	}

	// Push with the CLI.
	out, err := exec.Command(lazypullBinary(t), "profile", "push", "--dir", dir, "--hosts-dir", hostsDir, ref).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "pushed") {
		t.Fatalf("lazypull profile push: %v\n%s", err, out)
	}
	client, err := registryClient(hostsDir)
	if err != nil {
		t.Fatal(err)
	}
	refs, err := client.Referrers(context.Background(), ref, manifest.Digest, profile.ArtifactType)
	if err != nil || len(refs) != 1 {
		t.Fatalf("referrers after the push: %v, %v", refs, err)
	}

	// Node 2: a fresh daemon and cache. The pull alone fetches the
	// profile's chunks (no background fetch, no prioritized files: only
	// hints fetch before a read).
	reg.ResetRequests()
	node2 := newLazyEnv(t, v, reg, lazyOptions{})
	ctx2 := node2.c.Namespace(t)
	image2 := node2.pull(t, ctx2, ref)
	var missing int
	if !waitFor(60*time.Second, func() bool {
		missing = rangesCover(reg.BlobRequests(), recorded)
		return missing == 0
	}) {
		t.Fatalf("node 2: %d of the profile's %d chunks not fetched within 60 s (daemon log %s)", missing, recorded.ChunkCount(), node2.sn.LogPath())
	}
	if !strings.Contains(node2.sn.Logs(), "start-up profile found") {
		t.Fatal("node 2 did not log the profile it found")
	}
	// The workload needs nothing more from the registry.
	before := len(reg.BlobRequests())
	if out := node2.run(t, ctx2, image2, "sh", "-c", profileWorkload); out != wantSum {
		t.Fatalf("node 2 workload: %q, want %q", out, wantSum)
	}
	if after := reg.BlobRequests(); len(after) != before {
		t.Errorf("node 2's workload made %d blob requests although the profile was fetched: %+v", len(after)-before, after[before:])
	}

	// Hostile profiles, newer than the honest one.
	hostile := &profile.Profile{Version: profile.Version, Image: manifest.Digest, Runs: 1, Layers: []profile.Layer{
		{Digest: digest.FromString("no such layer"), Chunks: recorded.Layer(top).Chunks},
		{Digest: top, Chunks: []int64{1, 3, 1 << 40}},
	}}
	b, err := hostile.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	pushArtifact := func(data []byte) {
		t.Helper()
		time.Sleep(5 * time.Millisecond) // a newer creation time
		if _, err := client.PushReferrer(context.Background(), ref, remote.Artifact{
			ArtifactType: profile.ArtifactType, MediaType: profile.MediaType, Data: data, Subject: manifest,
		}); err != nil {
			t.Fatal(err)
		}
	}
	pushArtifact(b)
	pushArtifact(append(append([]byte(`{"version":1,"runs":1,"layers":[],"x":"`), bytes.Repeat([]byte("x"), profile.MaxEncodedSize)...), `"}`...))

	reg.ResetRequests()
	node3 := newLazyEnv(t, v, reg, lazyOptions{})
	ctx3 := node3.c.Namespace(t)
	image3 := node3.pull(t, ctx3, ref)
	if !waitFor(60*time.Second, func() bool {
		return strings.Contains(node3.sn.Logs(), "start-up profile found")
	}) {
		t.Fatalf("node 3 did not take the hostile profile (the newest valid one) within 60 s (daemon log %s)", node3.sn.LogPath())
	}
	if !strings.Contains(node3.sn.Logs(), "exceeds the limit") {
		t.Errorf("node 3 did not log refusing the oversized profile")
	}
	layers := map[string]bool{}
	for _, l := range cv.manifest.Layers {
		layers[l.Digest.String()] = true
	}
	for _, r := range reg.BlobRequests() {
		if layers[r.Path[strings.LastIndex(r.Path, "/")+1:]] && !strings.HasPrefix(r.Range, "bytes=-") {
			t.Errorf("node 3 fetched %s %s before any read", r.Path, r.Range)
		}
	}
	if out := node3.run(t, ctx3, image3, "sh", "-c", profileWorkload); out != wantSum {
		t.Fatalf("node 3 workload: %q, want %q", out, wantSum)
	}
}

// layerIndex is the TOC index of cv's layer i.
func layerIndex(t *testing.T, cv *converted, i int) *estargz.Index {
	t.Helper()
	data := cv.image.Layers[i].Data
	r, err := estargz.Open(bytes.NewReader(data), int64(len(data)), estargz.OpenOptions{})
	if err != nil {
		t.Fatalf("layer %d: %v", i, err)
	}
	return r.Index
}

// positions returns where each of want is in list, or nil if one is not.
func positions(list, want []int64) []int {
	var out []int
	for _, w := range want {
		i := indexOf(list, w)
		if i < 0 {
			return nil
		}
		out = append(out, i)
	}
	return out
}

func indexOf(list []int64, v int64) int {
	for i, x := range list {
		if x == v {
			return i
		}
	}
	return -1
}

// newProfileEnv is newLazyEnv's daemon (defaults of lazyOptions) with a
// [profile] section of its own.
func newProfileEnv(t *testing.T, v lab.Version, reg *lab.Registry, profileSection string) *lazyEnv {
	t.Helper()
	if err := v.Check(); err != nil {
		t.Fatal(err)
	}
	hostsDir, err := reg.WriteHostsDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := `[fetch]
prefetch = true
background_fetch = false
timeout = "10s"
retries = 2
read_timeout = "20s"

[registry]
hosts_dir = "` + hostsDir + `"

[verify]
policy = "off"

[metrics]
address = "127.0.0.1:0"

[profile]
` + profileSection
	sn := lab.NewSnapshotter(t, lab.SnapshotterConfig{Binary: lazypullSnapshotter(t), Config: cfg, LogLevel: "debug"})
	c := lab.NewContainerd(t, lab.ContainerdConfig{Version: v, ProxySnapshotters: map[string]string{lazypullName: sn.Address()}})
	return &lazyEnv{sn: sn, c: c}
}

// With [profile] push = true the daemon pushes the profile itself once
// the recording ends; with lookup = false a node does not ask the
// registry for one.
func TestLazypullProfileAutoPush(t *testing.T) {
	img, wantSum := profileTestImage(t)
	cv := convertImage(t, img, estargz.Gzip)
	v := lab.Containerd2()
	reg := lab.NewRegistry(t)
	ref := push(t, reg, "profile/auto:v1", cv.image)
	hostsDir, err := reg.WriteHostsDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	client, err := registryClient(hostsDir)
	if err != nil {
		t.Fatal(err)
	}

	node1 := newProfileEnv(t, v, reg, "push = true\n")
	ctx := node1.c.Namespace(t)
	image := node1.pull(t, ctx, ref)
	if out := node1.run(t, ctx, image, "sh", "-c", profileWorkload); out != wantSum {
		t.Fatalf("node 1 workload: %q, want %q", out, wantSum)
	}
	var refs []ocispec.Descriptor
	if !waitFor(60*time.Second, func() bool {
		refs, err = client.Referrers(context.Background(), ref, image.Target().Digest, profile.ArtifactType)
		return err == nil && len(refs) == 1
	}) {
		t.Fatalf("the daemon did not push its profile within 60 s: %v, %v (daemon log %s)", refs, err, node1.sn.LogPath())
	}
	b, err := client.FetchArtifact(context.Background(), ref, refs[0], profile.ArtifactType, profile.MediaType, profile.MaxEncodedSize)
	if err != nil {
		t.Fatal(err)
	}
	pushed, err := profile.Unmarshal(b)
	if err != nil || pushed.Image != image.Target().Digest || pushed.ChunkCount() == 0 {
		t.Fatalf("pushed profile %+v, %v", pushed, err)
	}

	// lookup = false: no referrer request, no hinted fetch.
	reg.ResetRequests()
	node2 := newProfileEnv(t, v, reg, "lookup = false\nrecord = false\n")
	ctx2 := node2.c.Namespace(t)
	image2 := node2.pull(t, ctx2, ref)
	if out := node2.run(t, ctx2, image2, "sh", "-c", profileWorkload); out != wantSum {
		t.Fatalf("node 2 workload: %q, want %q", out, wantSum)
	}
	for _, r := range reg.Requests() {
		if strings.Contains(r.Path, "/referrers/") || strings.Contains(r.Path, "/manifests/sha256-") {
			t.Errorf("lookup = false, yet the daemon asked %s", r.Path)
		}
	}
}
