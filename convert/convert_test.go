package convert_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// opts are conversion options for the tests: small chunks so that the
// large files are split.
func opts(comp estargz.Compression, ev *events) convert.Options {
	o := convert.Options{Build: estargz.BuildOptions{Compression: comp, ChunkSize: 64 << 10}}
	if ev != nil {
		o.Progress = ev.add
	}
	return o
}

func doConvert(t *testing.T, src, dst convert.Store, o convert.Options) *convert.Result {
	t.Helper()
	o.TempDir = t.TempDir()
	res, err := convert.Convert(context.Background(), src, dst, o)
	if err != nil {
		t.Fatalf("Convert %s -> %s: %v", src, dst, err)
	}
	// Nothing is left behind in the temporary directory.
	if ents, _ := os.ReadDir(o.TempDir); len(ents) > 0 {
		t.Errorf("temporary files left: %v", ents)
	}
	return res
}

// checkResult checks a converted single-manifest image at v, the Result
// and the progress events.
func checkResult(t *testing.T, v view, res *convert.Result, src *srcImage, comp estargz.Compression, ev *events) ocispec.Manifest {
	t.Helper()
	desc, raw, ok := v.root(t)
	if !ok {
		t.Fatal("destination is not tagged")
	}
	if res.Desc.Digest != desc.Digest || res.Desc.Size != desc.Size || res.Desc.MediaType != ocispec.MediaTypeImageManifest {
		t.Errorf("Result.Desc %+v, destination has %+v", res.Desc, desc)
	}
	m := checkManifest(t, v, raw, src, comp)
	if len(res.Layers) != len(uniqueLayers(src.layers)) {
		t.Errorf("Result.Layers has %d layers, want %d", len(res.Layers), len(uniqueLayers(src.layers)))
	}
	for i, l := range src.layers {
		if got := res.Layers[l.desc.Digest]; !reflect.DeepEqual(got, m.Layers[i]) {
			t.Errorf("Result.Layers[%s] = %+v, manifest has %+v", l.desc.Digest, got, m.Layers[i])
		}
	}
	if ev != nil {
		checkEvents(t, ev, src.layers, convert.PhaseDone)
		if n := len(ev.byLayer()); n != len(uniqueLayers(src.layers)) {
			t.Errorf("events for %d layers, want %d", n, len(uniqueLayers(src.layers)))
		}
	}
	return m
}

// checkEvents checks that every layer reported progress ending with
// last, and that convert events count the source's compressed bytes.
func checkEvents(t *testing.T, ev *events, layers []srcLayer, last convert.Phase) {
	t.Helper()
	by := ev.byLayer()
	for _, l := range layers {
		evs := by[l.desc.Digest]
		if len(evs) == 0 {
			t.Errorf("layer %s: no progress events", l.desc.Digest)
			continue
		}
		if p := evs[len(evs)-1].Phase; p != last {
			t.Errorf("layer %s: last event %q, want %q (events %+v)", l.desc.Digest, p, last, evs)
		}
		if last != convert.PhaseDone {
			continue
		}
		var sawConvert bool
		for _, e := range evs[:len(evs)-1] {
			switch e.Phase {
			case convert.PhaseConvert:
				sawConvert = true
				if e.Total != l.desc.Size || e.Done > e.Total {
					t.Errorf("layer %s: convert event %+v, source size %d", l.desc.Digest, e, l.desc.Size)
				}
			case convert.PhaseUpload:
			default:
				t.Errorf("layer %s: unexpected %q before the end", l.desc.Digest, e.Phase)
			}
		}
		if !sawConvert {
			t.Errorf("layer %s: no convert event", l.desc.Digest)
		}
		if e := evs[max(len(evs)-2, 0)]; e.Phase == convert.PhaseConvert && e.Done != l.desc.Size {
			t.Errorf("layer %s: last convert event %+v, want Done = %d", l.desc.Digest, e, l.desc.Size)
		}
	}
}

func uniqueLayers(ls []srcLayer) map[digest.Digest]bool {
	m := map[digest.Digest]bool{}
	for _, l := range ls {
		m[l.desc.Digest] = true
	}
	return m
}

func TestConvertRegistryToRegistry(t *testing.T) {
	for _, comp := range []estargz.Compression{estargz.Gzip, estargz.Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			t.Parallel()
			reg := remotetest.NewRegistry(t)
			src := mixedImage(t)
			pushImage(t, reg, "src/app", "v1", src)
			c := newClient(t)
			ev := &events{}
			res := doConvert(t, openStore(t, reg.Ref("src/app", "v1"), c), openStore(t, reg.Ref("dst/app", "esgz"), c), opts(comp, ev))
			checkResult(t, registryView{reg, "dst/app", "esgz"}, res, src, comp, ev)
			if res.Uploaded != len(src.layers)+1 {
				t.Errorf("Uploaded = %d, want %d (layers and config)", res.Uploaded, len(src.layers)+1)
			}
			// Every converted layer was uploaded with progress.
			for d, evs := range ev.byLayer() {
				if !slices.ContainsFunc(evs, func(e convert.Event) bool { return e.Phase == convert.PhaseUpload && e.Done == e.Total && e.Total > 0 }) {
					t.Errorf("layer %s: no complete upload event in %+v", d, evs)
				}
			}
		})
	}
}

func TestConvertDockerSchema2(t *testing.T) {
	t.Parallel()
	reg := remotetest.NewRegistry(t)
	src := dockerImage(t)
	pushImage(t, reg, "docker/app", "v1", src)
	c := newClient(t)
	ev := &events{}
	res := doConvert(t, openStore(t, reg.Ref("docker/app", "v1"), c), openStore(t, reg.Ref("docker/app", "v1-esgz"), c), opts(estargz.Gzip, ev))
	checkResult(t, registryView{reg, "docker/app", "v1-esgz"}, res, src, estargz.Gzip, ev)
}

func TestConvertLayouts(t *testing.T) {
	t.Parallel()
	src := mixedImage(t)
	t.Run("layout-to-layout", func(t *testing.T) {
		t.Parallel()
		in, out := newLayout(t), &layout{dir: t.TempDir()}
		in.putImage(t, src, "v1")
		ev := &events{}
		res := doConvert(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("esgz"), nil), opts(estargz.Zstd, ev))
		checkResult(t, layoutView{out, "esgz"}, res, src, estargz.Zstd, ev)
		b, err := os.ReadFile(out.dir + "/" + ocispec.ImageLayoutFile)
		if err != nil || !strings.Contains(string(b), `"imageLayoutVersion":"1.0.0"`) {
			t.Errorf("oci-layout file: %q, %v", b, err)
		}
		// A second tag in the same layout keeps the first.
		doConvert(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("again"), nil), opts(estargz.Gzip, nil))
		checkResult(t, layoutView{out, "esgz"}, res, src, estargz.Zstd, nil)
		if _, _, ok := (layoutView{out, "again"}).root(t); !ok {
			t.Error("second tag missing")
		}
	})
	t.Run("untagged-layout-to-registry", func(t *testing.T) {
		t.Parallel()
		reg := remotetest.NewRegistry(t)
		in := newLayout(t)
		in.putImage(t, src, "")
		ev := &events{}
		res := doConvert(t, openStore(t, in.ref(""), nil), openStore(t, reg.Ref("app", "esgz"), newClient(t)), opts(estargz.Gzip, ev))
		checkResult(t, registryView{reg, "app", "esgz"}, res, src, estargz.Gzip, ev)
	})
	t.Run("registry-to-layout", func(t *testing.T) {
		t.Parallel()
		reg := remotetest.NewRegistry(t)
		pushImage(t, reg, "app", "v1", src)
		out := &layout{dir: t.TempDir()}
		res := doConvert(t, openStore(t, reg.Ref("app", "v1"), newClient(t)), openStore(t, out.ref("esgz"), nil), opts(estargz.Gzip, nil))
		checkResult(t, layoutView{out, "esgz"}, res, src, estargz.Gzip, nil)
	})
}

// platformImages are two images sharing a base layer, and an attestation
// manifest whose layer is not a container layer at all.
func platformImages(t *testing.T, docker bool) (amd, arm *srcImage, att []byte, attDesc ocispec.Descriptor) {
	mt := ocispec.MediaTypeImageLayerGzip
	if docker {
		mt = convert.MediaTypeDockerLayer
	}
	base := mkLayer(t, mt, layerTar(t, 10))
	amd = mkImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, docker, base, mkLayer(t, mt, layerTar(t, 11)))
	arm = mkImage(t, ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, docker, base, mkLayer(t, mt, layerTar(t, 12)))
	statement := []byte(`{"_type":"https://in-toto.io/Statement/v0.1"}`)
	attImg := &srcImage{blobs: map[digest.Digest][]byte{}}
	cfg := []byte(`{"architecture":"unknown","os":"unknown","rootfs":{"type":"layers","diff_ids":["` + digest.FromBytes(statement).String() + `"]}}`)
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
		Layers: []ocispec.Descriptor{{MediaType: "application/vnd.in-toto+json", Digest: digest.FromBytes(statement), Size: int64(len(statement))}}}
	m.SchemaVersion = 2
	att, _ = json.Marshal(m)
	attImg.blobs[digest.FromBytes(cfg)] = cfg
	attImg.blobs[digest.FromBytes(statement)] = statement
	attDesc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(att), Size: int64(len(att)),
		Platform:    &ocispec.Platform{OS: "unknown", Architecture: "unknown"},
		Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": amd.desc.Digest.String()}}
	for d, b := range attImg.blobs {
		amd.blobs[d] = b
	}
	return amd, arm, att, attDesc
}

func TestConvertIndex(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		docker   bool
		platform platforms.MatchComparer
		want     []string // architectures converted, in order
	}{
		{"all", false, nil, []string{"amd64", "arm64"}},
		{"docker-list", true, nil, []string{"amd64", "arm64"}},
		{"arm64-only", false, platforms.OnlyStrict(ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}), []string{"arm64"}},
		{"amd64-only", false, platforms.OnlyStrict(ocispec.Platform{OS: "linux", Architecture: "amd64"}), []string{"amd64"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			amd, arm, att, attDesc := platformImages(t, tc.docker)
			idxRaw, _ := indexOf(t, tc.docker, amd.desc, arm.desc, attDesc)
			reg := remotetest.NewRegistry(t)
			pushImage(t, reg, "multi", "", amd)
			pushImage(t, reg, "multi", "", arm)
			reg.PushManifest(t, "multi", "", att)
			reg.PushManifest(t, "multi", "v1", idxRaw)

			ev := &events{}
			o := opts(estargz.Gzip, ev)
			o.Platform = tc.platform
			c := newClient(t)
			res := doConvert(t, openStore(t, reg.Ref("multi", "v1"), c), openStore(t, reg.Ref("multi", "esgz"), c), o)
			v := registryView{reg, "multi", "esgz"}
			desc, raw, ok := v.root(t)
			if !ok {
				t.Fatal("index not tagged")
			}
			if desc.MediaType != ocispec.MediaTypeImageIndex || res.Desc.Digest != desc.Digest {
				t.Errorf("root %+v, Result.Desc %+v", desc, res.Desc)
			}
			var idx ocispec.Index
			if err := json.Unmarshal(raw, &idx); err != nil {
				t.Fatal(err)
			}
			if idx.MediaType != ocispec.MediaTypeImageIndex || idx.SchemaVersion != 2 || idx.Annotations["org.example.index"] != "kept" {
				t.Errorf("index mediaType %q schemaVersion %d annotations %v", idx.MediaType, idx.SchemaVersion, idx.Annotations)
			}
			var got []string
			var want []srcLayer
			for _, m := range idx.Manifests {
				if m.Platform == nil {
					t.Fatalf("index entry %s without platform", m.Digest)
				}
				got = append(got, m.Platform.Architecture)
				src := amd
				if m.Platform.Architecture == "arm64" {
					src = arm
				}
				if !reflect.DeepEqual(*m.Platform, *src.desc.Platform) {
					t.Errorf("platform %+v, want %+v", *m.Platform, *src.desc.Platform)
				}
				if m.MediaType != ocispec.MediaTypeImageManifest {
					t.Errorf("entry media type %q", m.MediaType)
				}
				mraw := v.manifest(t, m.Digest)
				if int64(len(mraw)) != m.Size {
					t.Errorf("entry size %d, manifest has %d bytes", m.Size, len(mraw))
				}
				checkManifest(t, v, mraw, src, estargz.Gzip)
				want = append(want, src.layers...)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("converted platforms %v, want %v", got, tc.want)
			}
			// The shared base layer is converted once.
			if n := len(uniqueLayers(want)); len(res.Layers) != n || res.Uploaded != n+len(tc.want) {
				t.Errorf("Result: %d layers, %d uploads; want %d layers, %d uploads", len(res.Layers), res.Uploaded, n, n+len(tc.want))
			}
			checkEvents(t, ev, want, convert.PhaseDone)
		})
	}
	t.Run("no-match", func(t *testing.T) {
		t.Parallel()
		amd, arm, _, _ := platformImages(t, false)
		l := newLayout(t)
		l.putImage(t, amd, "-")
		l.putImage(t, arm, "-")
		idxRaw, idxDesc := indexOf(t, false, amd.desc, arm.desc)
		l.put(t, idxRaw)
		l.tag(t, idxDesc, "v1")
		o := opts(estargz.Gzip, nil)
		o.Platform = platforms.OnlyStrict(ocispec.Platform{OS: "windows", Architecture: "amd64"})
		out := &layout{dir: t.TempDir()}
		_, err := convert.Convert(context.Background(), openStore(t, l.ref("v1"), nil), openStore(t, out.ref("x"), nil), o)
		if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "platform") {
			t.Errorf("err = %v, want not found naming the platform", err)
		}
		if _, _, ok := (layoutView{out, "x"}).root(t); ok {
			t.Error("destination tagged after a failure")
		}
	})
}

// TestConvertConverted converts an already converted image: every layer is
// kept as it is.
func TestConvertConverted(t *testing.T) {
	for _, comp := range []estargz.Compression{estargz.Gzip, estargz.Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			t.Parallel()
			reg := remotetest.NewRegistry(t)
			src := mkImage(t, hostPlatform, false,
				mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 1)),
				mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 2)))
			pushImage(t, reg, "app", "v1", src)
			c := newClient(t)
			first := doConvert(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), opts(comp, nil))
			_, raw, _ := registryView{reg, "app", "esgz"}.root(t)
			var conv ocispec.Manifest
			json.Unmarshal(raw, &conv)

			// In the same repository: nothing to upload.
			reg.ResetRequests()
			ev := &events{}
			res := doConvert(t, openStore(t, reg.Ref("app", "esgz"), c), openStore(t, reg.Ref("app", "esgz2"), c), opts(estargz.Gzip, ev))
			if res.Uploaded != 0 {
				t.Errorf("Uploaded = %d, want 0", res.Uploaded)
			}
			if w := blobWrites(reg); len(w) > 0 {
				t.Errorf("blob uploads: %v", w)
			}
			if res.Desc.Digest != first.Desc.Digest {
				t.Errorf("converting the converted image gave manifest %s, want the same %s", res.Desc.Digest, first.Desc.Digest)
			}
			for _, l := range conv.Layers {
				if got := res.Layers[l.Digest]; !reflect.DeepEqual(got, l) {
					t.Errorf("layer %s became %+v", l.Digest, got)
				}
			}
			var kept []srcLayer
			for _, l := range conv.Layers {
				kept = append(kept, srcLayer{desc: l})
			}
			checkEvents(t, ev, kept, convert.PhaseKept)

			// The converted image as a source: its layers hold the
			// original files.
			convSrc := *src
			convSrc.layers = nil
			for i, l := range conv.Layers {
				convSrc.layers = append(convSrc.layers, srcLayer{tar: src.layers[i].tar, desc: l})
			}
			src = &convSrc

			// To another repository: the kept layers are copied.
			res = doConvert(t, openStore(t, reg.Ref("app", "esgz"), c), openStore(t, reg.Ref("other", "esgz"), c), opts(estargz.Gzip, nil))
			if res.Uploaded != len(src.layers)+1 {
				t.Errorf("Uploaded = %d, want %d", res.Uploaded, len(src.layers)+1)
			}
			checkResult(t, registryView{reg, "other", "esgz"}, res, src, comp, nil)

			// And to a layout.
			out := &layout{dir: t.TempDir()}
			res = doConvert(t, openStore(t, reg.Ref("app", "esgz"), c), openStore(t, out.ref("esgz"), nil), opts(estargz.Gzip, nil))
			checkResult(t, layoutView{out, "esgz"}, res, src, comp, nil)
		})
	}
}

// TestConvertAgain converts the same image to the same destination twice:
// the output is identical and nothing is uploaded the second time.
func TestConvertAgain(t *testing.T) {
	t.Parallel()
	reg := remotetest.NewRegistry(t)
	src := mixedImage(t)
	pushImage(t, reg, "app", "v1", src)
	c := newClient(t)
	first := doConvert(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), opts(estargz.Gzip, nil))
	reg.ResetRequests()
	ev := &events{}
	o := opts(estargz.Gzip, ev)
	o.Parallel = 4
	res := doConvert(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), o)
	if res.Uploaded != 0 || res.Desc.Digest != first.Desc.Digest {
		t.Errorf("second conversion: %d uploads, manifest %s; want 0 and %s", res.Uploaded, res.Desc.Digest, first.Desc.Digest)
	}
	if w := blobWrites(reg); len(w) > 0 {
		t.Errorf("blob uploads: %v", w)
	}
	for d, evs := range ev.byLayer() {
		if slices.ContainsFunc(evs, func(e convert.Event) bool { return e.Phase == convert.PhaseUpload }) {
			t.Errorf("layer %s: upload events although the destination has the blob", d)
		}
	}
	checkResult(t, registryView{reg, "app", "esgz"}, res, src, estargz.Gzip, ev)
}

// TestConvertRepeatedLayer converts an image that lists one layer twice:
// it is converted and uploaded once.
func TestConvertRepeatedLayer(t *testing.T) {
	t.Parallel()
	reg := remotetest.NewRegistry(t)
	l := mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 1))
	src := mkImage(t, hostPlatform, false, l, mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 2)), l)
	pushImage(t, reg, "app", "v1", src)
	c := newClient(t)
	ev := &events{}
	reg.ResetRequests()
	res := doConvert(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), opts(estargz.Gzip, ev))
	if res.Uploaded != 3 {
		t.Errorf("Uploaded = %d, want 3 (two layers and the config)", res.Uploaded)
	}
	var posts int
	for _, w := range blobWrites(reg) {
		if strings.HasPrefix(w, "POST") {
			posts++
		}
	}
	if posts != 3 {
		t.Errorf("%d uploads started, want 3: %v", posts, blobWrites(reg))
	}
	m := checkResult(t, registryView{reg, "app", "esgz"}, res, src, estargz.Gzip, ev)
	if !reflect.DeepEqual(m.Layers[0], m.Layers[2]) {
		t.Errorf("the repeated layer converted to %+v and %+v", m.Layers[0], m.Layers[2])
	}
	if n := len(ev.byLayer()[l.desc.Digest]); n > 3 {
		t.Errorf("%d events for the repeated layer: converted twice?", n)
	}
}

// TestConvertForeignLayer keeps foreign (non-distributable) layers as
// they are, without fetching them.
func TestConvertForeignLayer(t *testing.T) {
	t.Parallel()
	foreign := srcLayer{desc: ocispec.Descriptor{MediaType: convert.MediaTypeDockerForeignLayer, Digest: digest.FromString("foreign"), Size: 7,
		URLs: []string{"https://example.com/foreign.tar.gz"}}, tar: []byte("foreign tar")}
	l := mkLayer(t, convert.MediaTypeDockerLayer, layerTar(t, 1))
	src := mkImage(t, hostPlatform, true, foreign, l)
	delete(src.blobs, foreign.desc.Digest)
	in, out := newLayout(t), &layout{dir: t.TempDir()}
	in.putImage(t, src, "v1")
	ev := &events{}
	res := doConvert(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("v1"), nil), opts(estargz.Gzip, ev))
	v := layoutView{out, "v1"}
	_, raw, _ := v.root(t)
	var m ocispec.Manifest
	json.Unmarshal(raw, &m)
	if len(m.Layers) != 2 || !reflect.DeepEqual(m.Layers[0], foreign.desc) || !reflect.DeepEqual(res.Layers[foreign.desc.Digest], foreign.desc) {
		t.Fatalf("layers %+v, want the foreign layer as it was first", m.Layers)
	}
	d := checkLayer(t, m.Layers[1], v.blob(t, m.Layers[1].Digest), l.tar, estargz.Gzip)
	cfg := decodeJSON(t, v.blob(t, m.Config.Digest))
	ids := cfg["rootfs"].(map[string]any)["diff_ids"].([]any)
	if len(ids) != 2 || ids[0] != digest.FromBytes(foreign.tar).String() || ids[1] != d.String() {
		t.Errorf("diff_ids %v", ids)
	}
	if _, err := os.Stat(out.path(foreign.desc.Digest)); err == nil {
		t.Error("foreign layer copied")
	}
	checkEvents(t, ev, []srcLayer{foreign}, convert.PhaseKept)
}

func TestConvertPrioritized(t *testing.T) {
	for _, comp := range []estargz.Compression{estargz.Gzip, estargz.Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			t.Parallel()
			src := mkImage(t, hostPlatform, false,
				mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 1)),
				mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 2)))
			in, out := newLayout(t), &layout{dir: t.TempDir()}
			in.putImage(t, src, "v1")
			o := opts(comp, nil)
			prio := []string{"usr/bin/tool2", "etc/os-release", "/usr/bin/hard"}
			o.Build.Prioritized = prio
			doConvert(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("v1"), nil), o)
			v := layoutView{out, "v1"}
			_, raw, _ := v.root(t)
			m := checkManifest(t, v, raw, src, comp)

			plain := decompress(t, comp, v.blob(t, m.Layers[1].Digest))
			_, order := readEntries(t, strings.NewReader(string(plain)))
			lm := slices.Index(order, estargz.PrefetchLandmark)
			if lm < 0 {
				t.Fatalf("no %s in %v", estargz.PrefetchLandmark, order)
			}
			var pos []int
			for _, p := range prio {
				i := slices.Index(order, strings.TrimPrefix(p, "/"))
				if i < 0 || i > lm {
					t.Errorf("%s at %d, after the landmark at %d: %v", p, i, lm, order)
				}
				pos = append(pos, i)
			}
			if !slices.IsSorted(pos[:2]) {
				t.Errorf("prioritized files out of order: %v", order)
			}
			if i := slices.Index(order, "etc/empty"); i < lm {
				t.Errorf("etc/empty (not prioritized) at %d, before the landmark at %d", i, lm)
			}
			// The other layer has only some of the files; they still come
			// first, with the hardlink's target.
			plain = decompress(t, comp, v.blob(t, m.Layers[0].Digest))
			_, order = readEntries(t, strings.NewReader(string(plain)))
			lm = slices.Index(order, estargz.PrefetchLandmark)
			for _, name := range []string{"etc/os-release", "usr/bin/hard", "usr/bin/tool1"} {
				if i := slices.Index(order, name); i < 0 || i > lm {
					t.Errorf("layer 1: %s at %d, landmark at %d: %v", name, i, lm, order)
				}
			}
			if i := slices.Index(order, "etc/empty"); i < lm {
				t.Errorf("layer 1: etc/empty before the landmark: %v", order)
			}
		})
	}
}

// TestConvertPrioritizedRebuildsEStargz: an image already in eStargz form
// is rebuilt, not kept, when files are to be prioritized (what lazypull
// optimize does with a recording).
func TestConvertPrioritizedRebuildsEStargz(t *testing.T) {
	for _, comp := range []estargz.Compression{estargz.Gzip, estargz.Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			t.Parallel()
			src := mkImage(t, hostPlatform, false,
				mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 1)),
				mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 2)))
			in, mid, out := newLayout(t), &layout{dir: t.TempDir()}, &layout{dir: t.TempDir()}
			in.putImage(t, src, "v1")
			doConvert(t, openStore(t, in.ref("v1"), nil), openStore(t, mid.ref("esgz"), nil), opts(comp, nil))
			_, raw, _ := (layoutView{mid, "esgz"}).root(t)
			var esgz ocispec.Manifest
			if err := json.Unmarshal(raw, &esgz); err != nil {
				t.Fatal(err)
			}

			ev := &events{}
			o := opts(comp, ev)
			o.Build.Prioritized = []string{"usr/bin/tool2"}
			res := doConvert(t, openStore(t, mid.ref("esgz"), nil), openStore(t, out.ref("opt"), nil), o)
			v := layoutView{out, "opt"}
			_, raw, _ = v.root(t)
			m := checkManifest(t, v, raw, src, comp)
			if res.Layers[esgz.Layers[1].Digest].Digest == esgz.Layers[1].Digest {
				t.Errorf("layer 2 was kept, not rebuilt with the prioritized file")
			}
			plain := decompress(t, comp, v.blob(t, m.Layers[1].Digest))
			_, order := readEntries(t, strings.NewReader(string(plain)))
			lm := slices.Index(order, estargz.PrefetchLandmark)
			if i := slices.Index(order, "usr/bin/tool2"); lm < 0 || i < 0 || i > lm {
				t.Errorf("usr/bin/tool2 at %d, landmark at %d: %v", i, lm, order)
			}
			if slices.Contains(order, estargz.NoPrefetchLandmark) || slices.Index(order, estargz.TOCTarName) != -1 && slices.Index(order, estargz.TOCTarName) != len(order)-1 {
				t.Errorf("old landmark or TOC carried over: %v", order)
			}
			for l, evs := range ev.byLayer() {
				for _, e := range evs {
					if e.Phase == convert.PhaseKept {
						t.Errorf("layer %s reported kept", l)
					}
				}
			}
		})
	}
}
