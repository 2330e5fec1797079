package service

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/profile"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
	"github.com/lazypull/lazypull/snapshot"
)

func TestProfileBoundsMatchHint(t *testing.T) {
	if profile.MaxChunksPerLayer > lfs.MaxHintChunks {
		t.Fatalf("a profile layer may list %d chunks, Layer.Hint takes %d", profile.MaxChunksPerLayer, lfs.MaxHintChunks)
	}
}

// profileImage is a one-layer eStargz image in a test registry whose
// files are each their own chunk.
type profileImage struct {
	reg      *remotetest.Registry
	ref      string
	manifest ocispec.Descriptor
	layer    digest.Digest
	toc      digest.Digest
	files    map[string][]byte
	names    []string
}

func newProfileImage(t *testing.T) *profileImage {
	t.Helper()
	pi := &profileImage{reg: remotetest.NewRegistry(t), files: map[string][]byte{}}
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 6 {
		name := fmt.Sprintf("f%d", i)
		data := make([]byte, 40<<10)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		pi.names = append(pi.names, name)
		pi.files[name] = data
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: time.Unix(1700000000, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	res, err := estargz.Build(context.Background(), &out, bytes.NewReader(tb.Bytes()), estargz.BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	img := pi.reg.PushImage(t, "app", "v1", remotetest.Layer{
		Data: out.Bytes(), DiffID: res.DiffID,
		Annotations: map[string]string{estargz.TOCDigestAnnotation: res.TOCDigest.String()},
	})
	pi.ref, pi.manifest, pi.layer, pi.toc = img.Ref, img.ManifestDesc, img.Layers[0].Digest, res.TOCDigest
	pi.manifest.Platform = nil
	return pi
}

func (pi *profileImage) labels() map[string]string {
	return map[string]string{
		snapshot.LabelCRIImageRef:    pi.ref,
		snapshot.LabelCRILayerDigest: pi.layer.String(),
		snapshot.LabelTOCDigest:      pi.toc.String(),
		snapshot.LabelCRIImageLayers: pi.layer.String(),
		LabelManifestDigest:          pi.manifest.Digest.String(),
		snapshots.LabelSnapshotRef:   "chain",
	}
}

// newProfileService is a daemon's service with lazy fetching only (no
// prefetch, background fetch, read-ahead or verification), so that only
// reads and hints fetch, and short recording bounds.
func newProfileService(t *testing.T, pc ProfileConfig) *Service {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Verify.Policy = VerifyOff
	cfg.Fetch.Prefetch, cfg.Fetch.BackgroundFetch = false, false
	cfg.Profile = pc
	svc, err := New(context.Background(), Options{Root: t.TempDir(), Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := svc.Close(); err != nil {
			t.Error(err)
		}
	})
	svc.profiles.quiet, svc.profiles.tick = 200*time.Millisecond, 20*time.Millisecond
	return svc
}

func (pi *profileImage) mount(t *testing.T, svc *Service) (string, *lfs.Layer) {
	t.Helper()
	mp := filepath.Join(t.TempDir(), "mnt")
	if err := svc.LayerFS().Mount(context.Background(), mp, pi.labels()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.LayerFS().Unmount(context.Background(), mp) })
	m, ok := svc.Manager.Lookup(mp)
	if !ok {
		t.Fatal("mounted layer not found")
	}
	return mp, m.Layer()
}

func (pi *profileImage) read(t *testing.T, mp string, names ...string) {
	t.Helper()
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(mp, n))
		if err != nil || !bytes.Equal(b, pi.files[n]) {
			t.Fatalf("read %s: %d bytes, %v (content differs: %t)", n, len(b), err, !bytes.Equal(b, pi.files[n]))
		}
	}
}

func offsets(t *testing.T, l *lfs.Layer, names ...string) []int64 {
	t.Helper()
	var out []int64
	for _, name := range names {
		n, ok := l.Index().Lookup(name)
		if !ok {
			t.Fatalf("%s not in the layer", name)
		}
		for _, c := range n.Chunks {
			out = append(out, c.Offset)
		}
	}
	return out
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 30 s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Node 1 records a start-up, saves and pushes its profile; node 2 (fresh
// cache and state) finds it in the registry at the first mount and
// fetches the chunks before anything reads them; the reads then all hit
// the cache.
func TestProfileRecordPushAndUse(t *testing.T) {
	requireRoot(t)
	pi := newProfileImage(t)
	read := []string{"f4", "f1", "f2"}

	node1 := newProfileService(t, ProfileConfig{Record: true, Lookup: true, Push: true})
	mp, l1 := pi.mount(t, node1)
	pi.read(t, mp, read...)
	want := offsets(t, l1, read...)
	var saved *profile.Profile
	waitUntil(t, "profile saved", func() bool {
		p, _, err := LoadProfile(node1.profiles.dir, pi.manifest.Digest)
		saved = p
		return err == nil
	})
	if saved.Image != pi.manifest.Digest || saved.Runs != 1 || len(saved.Layers) != 1 || saved.Layers[0].Digest != pi.layer {
		t.Fatalf("saved profile %+v", saved)
	}
	if got := saved.Layers[0].Chunks; !slices.Equal(got, want) {
		t.Fatalf("recorded chunks %v, want %v (the order read)", got, want)
	}

	client, err := remote.New(remote.Options{PlainHTTP: true, HostsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	var refs []ocispec.Descriptor
	waitUntil(t, "profile pushed", func() bool {
		refs, err = client.Referrers(context.Background(), pi.ref, pi.manifest.Digest, profile.ArtifactType)
		return err == nil && len(refs) == 1
	})

	node2 := newProfileService(t, ProfileConfig{Record: true, Lookup: true})
	_, l2 := pi.mount(t, node2)
	waitUntil(t, "hinted chunks fetched", func() bool {
		for _, name := range read {
			n, _ := l2.Index().Lookup(name)
			for _, c := range n.Chunks {
				if !node2.Store.Has(c.Digest) {
					return false
				}
			}
		}
		return true
	})
	if st := l2.Stats(); st.CacheMisses != 0 || st.CacheHits != 0 || st.FetchedBytes == 0 {
		t.Fatalf("before any read: %+v", st)
	}
	// Only the profile's chunks: the others are not fetched.
	for _, name := range []string{"f0", "f3", "f5"} {
		n, _ := l2.Index().Lookup(name)
		if node2.Store.Has(n.Chunks[0].Digest) {
			t.Errorf("%s fetched though the profile does not name it", name)
		}
	}
}

// A profile that names other layers, offsets that are no chunk, or too
// many chunks changes nothing that is served, and fetches nothing.
func TestProfileHostile(t *testing.T) {
	requireRoot(t)
	pi := newProfileImage(t)
	node := newProfileService(t, ProfileConfig{Record: false, Lookup: true})
	bad := &profile.Profile{Version: profile.Version, Image: pi.manifest.Digest, Runs: 1, Layers: []profile.Layer{
		{Digest: digest.FromString("another layer"), Chunks: []int64{0, 1, 2}},
		{Digest: pi.layer, Chunks: []int64{1, 3, 1 << 40, 7}},
	}}
	if _, err := SaveProfile(node.profiles.dir, bad); err != nil {
		t.Fatal(err)
	}
	mp, l := pi.mount(t, node)
	waitUntil(t, "profile looked up", func() bool {
		node.profiles.mu.Lock()
		defer node.profiles.mu.Unlock()
		for _, img := range node.profiles.images {
			return img.found != nil
		}
		return false
	})
	// Hint filters offsets at once: nothing was queued.
	if st := l.Stats(); st.Requests != 0 || st.FetchedBytes != 0 {
		t.Fatalf("a profile of no real chunks fetched: %+v", st)
	}
	pi.read(t, mp, pi.names...)

	// A file of another image's profile, a profile over the size bound, or
	// one of a future version, are refused.
	other := *bad
	other.Image = digest.FromString("other image")
	if _, err := SaveProfile(node.profiles.dir, &other); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(ProfilePath(node.profiles.dir, other.Image), ProfilePath(node.profiles.dir, pi.manifest.Digest)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadProfile(node.profiles.dir, pi.manifest.Digest); err == nil || !strings.Contains(err.Error(), "is a profile of") {
		t.Fatalf("another image's profile: %v", err)
	}

	client, err := remote.New(remote.Options{PlainHTTP: true, HostsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	push := func(data []byte) {
		t.Helper()
		if _, err := client.PushReferrer(ctx, pi.ref, remote.Artifact{
			ArtifactType: profile.ArtifactType, MediaType: profile.MediaType, Data: data, Subject: pi.manifest,
		}); err != nil {
			t.Fatal(err)
		}
	}
	good, err := (&profile.Profile{Version: profile.Version, Image: pi.manifest.Digest, Runs: 1,
		Layers: []profile.Layer{{Digest: pi.layer, Chunks: []int64{0}}}}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	push(good)
	time.Sleep(10 * time.Millisecond) // newer creation time
	huge := append([]byte(`{"version":1,"runs":1,"layers":[],"pad":"`), bytes.Repeat([]byte("x"), profile.MaxEncodedSize)...)
	push(append(huge, `"}`...))
	time.Sleep(10 * time.Millisecond)
	future, _ := json.Marshal(map[string]any{"version": 2, "runs": 1})
	push(future)
	// The two newest are refused; the older valid one is taken.
	p, source, err := FetchProfile(ctx, client, pi.ref, pi.manifest.Digest)
	if p == nil || !slices.Equal(p.Layers[0].Chunks, []int64{0}) || !strings.Contains(source, "@sha256:") {
		t.Fatalf("FetchProfile: %+v %q %v", p, source, err)
	}
	time.Sleep(10 * time.Millisecond)
	push(future)
	p, _, err = FetchProfile(ctx, client, pi.ref, pi.manifest.Digest)
	if p != nil || err == nil || !strings.Contains(err.Error(), "exceeds the limit") || !strings.Contains(err.Error(), "version 2") {
		t.Fatalf("three newest invalid: %+v %v", p, err)
	}
}

// The newest referrer is taken by its creation time, not by the text of
// the annotation (".74Z" is earlier than ".743Z").
func TestFetchProfileNewest(t *testing.T) {
	pi := newProfileImage(t)
	client, err := remote.New(remote.Options{PlainHTTP: true, HostsDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i, at := range []string{"2026-12-07T20:53:50.743Z", "2026-12-07T20:53:50.74Z", "not a time"} {
		b, err := (&profile.Profile{Version: profile.Version, Runs: 1,
			Layers: []profile.Layer{{Digest: pi.layer, Chunks: []int64{int64(i)}}}}).Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := client.PushReferrer(ctx, pi.ref, remote.Artifact{
			ArtifactType: profile.ArtifactType, MediaType: profile.MediaType, Data: b, Subject: pi.manifest,
			Annotations: map[string]string{ocispec.AnnotationCreated: at},
		}); err != nil {
			t.Fatal(err)
		}
	}
	p, _, err := FetchProfile(ctx, client, pi.ref, pi.manifest.Digest)
	if err != nil || p == nil || p.Layers[0].Chunks[0] != 0 {
		t.Fatalf("FetchProfile took %+v, %v; want the one created at .743", p, err)
	}
}

// A registry's "no profile" is noted: the image's mounts after a restart
// (the same root) do not ask again.
func TestProfileLookupRemembersNone(t *testing.T) {
	requireRoot(t)
	pi := newProfileImage(t)
	cfg := DefaultConfig()
	cfg.Verify.Policy = VerifyOff
	cfg.Fetch.Prefetch, cfg.Fetch.BackgroundFetch = false, false
	root := t.TempDir()
	asks := func() int {
		return pi.reg.Count(func(q remotetest.Request) bool {
			return strings.Contains(q.Path, "/referrers/") || strings.Contains(q.Path, "/manifests/sha256-")
		})
	}
	for i := range 2 {
		svc, err := New(context.Background(), Options{Root: root, Config: cfg})
		if err != nil {
			t.Fatal(err)
		}
		mp := filepath.Join(t.TempDir(), "mnt")
		if err := svc.LayerFS().Mount(context.Background(), mp, pi.labels()); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "lookup over", func() bool {
			svc.profiles.mu.Lock()
			defer svc.profiles.mu.Unlock()
			for _, img := range svc.profiles.images {
				return img.lookedUp
			}
			return false
		})
		if _, err := os.Stat(noneMarker(svc.profiles.dir, pi.manifest.Digest)); err != nil {
			t.Fatalf("run %d: the registry's none was not noted: %v", i, err)
		}
		if err := svc.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// Asked once: the referrers API, then the tag.
	if n := asks(); n != 2 {
		t.Fatalf("%d referrer requests for two daemon runs, want the 2 of the first", n)
	}
}

// BenchmarkProfileChunkRead is the cost recording adds to the first read
// of a chunk: of a layer no image records, and of one an image records.
func BenchmarkProfileChunkRead(b *testing.B) {
	p, err := newProfiles(ProfileConfig{Record: true}, b.TempDir(), nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer p.close()
	layer := digest.FromString("layer")
	b.Run("not recording", func(b *testing.B) {
		for i := range b.N {
			p.ChunkRead(layer, estargz.Chunk{Offset: int64(i)})
		}
	})
	img := &imageProfile{recording: true, chunks: map[digest.Digest][]recordedChunk{}}
	p.byLayer[layer] = []*imageProfile{img}
	b.Run("recording", func(b *testing.B) {
		for i := range b.N {
			if i%profile.MaxChunksPerLayer == 0 {
				img.chunks[layer], img.nchunks = img.chunks[layer][:0], 0
			}
			p.ChunkRead(layer, estargz.Chunk{Offset: int64(i)})
		}
	})
}

// An image whose layer containerd did not prepare (it was mounted for
// another image before) still gets that layer hinted: the image-layers
// label names it.
func TestProfileHintsSharedLayer(t *testing.T) {
	requireRoot(t)
	pi := newProfileImage(t) // its layer is the shared one
	var out bytes.Buffer
	res, err := estargz.Build(context.Background(), &out, bytes.NewReader(tarOf(t, map[string]string{"bin/x": "own"})), estargz.BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	own := pi.reg.PushBlob(t, "app", out.Bytes()).Digest
	node := newProfileService(t, ProfileConfig{Record: true, Lookup: true})
	_, shared := pi.mount(t, node) // for image P (pi.labels)

	// Image Q = shared + own, with a saved profile naming shared chunks.
	q := digest.FromString("image Q")
	want := offsets(t, shared, "f4", "f1")
	if _, err := SaveProfile(node.profiles.dir, &profile.Profile{Version: profile.Version, Image: q, Runs: 1,
		Layers: []profile.Layer{{Digest: pi.layer, Chunks: want}}}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{
		snapshot.LabelCRIImageRef:    pi.ref,
		snapshot.LabelCRILayerDigest: own.String(),
		snapshot.LabelTOCDigest:      res.TOCDigest.String(),
		snapshot.LabelCRIImageLayers: pi.layer.String() + "," + own.String(),
		LabelManifestDigest:          q.String(),
	}
	mp := filepath.Join(t.TempDir(), "q")
	if err := node.LayerFS().Mount(context.Background(), mp, labels); err != nil {
		t.Fatal(err)
	}
	defer node.LayerFS().Unmount(context.Background(), mp)
	waitUntil(t, "the shared layer's profile chunks fetched", func() bool {
		for _, name := range []string{"f4", "f1"} {
			n, _ := shared.Index().Lookup(name)
			if !node.Store.Has(n.Chunks[0].Digest) {
				return false
			}
		}
		return true
	})
	if st := shared.Stats(); st.CacheHits+st.CacheMisses != 0 {
		t.Fatalf("the shared layer was read: %+v", st)
	}
}
