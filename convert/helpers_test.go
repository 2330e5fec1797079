package convert_test

// Fixtures and independent readers for the convert tests: source images
// built from real tar layers (plain, gzip, zstd; OCI or Docker media
// types), written to a remotetest registry or to an OCI layout directory,
// and checks of converted images that read them back without the
// package's own code (plain HTTP for the registry, files for layouts) and
// open every converted layer with the estargz package.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

var fixtureTime = time.Date(2024, 5, 17, 10, 20, 30, 0, time.UTC)

// layerTar returns a layer tar whose content depends on seed: directories,
// a small and a large (multi-chunk at 64 KiB) regular file, an empty file,
// a symlink, a hardlink and a file with an xattr.
func layerTar(t testing.TB, seed int64) []byte {
	t.Helper()
	tool := fmt.Sprintf("usr/bin/tool%d", seed)
	ents := []fixture.Entry{
		fixture.Dir("etc/", 0o755),
		fixture.Reg("etc/os-release", 0o644, []byte(fmt.Sprintf("ID=lazypull\nLAYER=%d\n", seed))),
		fixture.Reg("etc/empty", 0o600, nil),
		fixture.Dir("usr/", 0o755),
		fixture.Dir("usr/bin/", 0o755),
		fixture.Reg(tool, 0o755, fixture.Random(seed, 200<<10+int(seed)*333)).Own(1000, 1000),
		fixture.Symlink("usr/bin/alias", fmt.Sprintf("tool%d", seed)),
		fixture.Hardlink("usr/bin/hard", tool),
		fixture.Reg("etc/xattr", 0o644, []byte("x")).X("user.lazypull", "v"+strconv.FormatInt(seed, 10)),
	}
	for i := range ents {
		ents[i] = ents[i].At(fixtureTime)
	}
	return fixture.Tar(t, ents)
}

// srcLayer is a source layer: its plain tar and its blob as stored.
type srcLayer struct {
	tar  []byte
	desc ocispec.Descriptor
	blob []byte
}

// mkLayer compresses tarb as mediaType says.
func mkLayer(t testing.TB, mediaType string, tarb []byte) srcLayer {
	t.Helper()
	var blob []byte
	switch mediaType {
	case ocispec.MediaTypeImageLayer:
		blob = tarb
	case ocispec.MediaTypeImageLayerZstd:
		blob = fixture.Zstd(t, tarb)
	default:
		blob = fixture.Gzip(t, tarb)
	}
	return srcLayer{tar: tarb, blob: blob, desc: ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(blob), Size: int64(len(blob))}}
}

// srcImage is a source image: a manifest, its config and layers.
type srcImage struct {
	layers   []srcLayer
	config   []byte
	cfgDesc  ocispec.Descriptor
	manifest []byte
	desc     ocispec.Descriptor // with Platform
	blobs    map[digest.Digest][]byte
}

// configJSON is a config with fields the converter does not know, a
// number too large for float64 and HTML characters, so that a converter
// that decodes and re-encodes it into structs or floats would change it.
func configJSON(p ocispec.Platform, diffIDs []digest.Digest) []byte {
	ids, _ := json.Marshal(diffIDs)
	return []byte(fmt.Sprintf(`{
  "architecture": %q, "os": %q, "variant": %q,
  "created": "2024-05-17T10:20:30.123456789Z",
  "author": "lazypull tests",
  "config": {"Cmd": ["/bin/sh", "-c", "echo <hi> && true"], "Env": ["PATH=/usr/bin"], "Labels": {"a": "b"}, "ExposedPorts": {"80/tcp": {}}},
  "rootfs": {"type": "layers", "diff_ids": %s},
  "history": [{"created_by": "step 1"}, {"created_by": "step 2", "empty_layer": true}],
  "x-unknown": {"big": 123456789012345678901234567890, "float": 1.50, "list": [null, true, "s", {"deep": [1e3]}]}
}`, p.Architecture, p.OS, p.Variant, ids))
}

// mkImage makes an image of layers for platform p; docker selects Docker
// schema 2 media types for the manifest and config.
func mkImage(t testing.TB, p ocispec.Platform, docker bool, layers ...srcLayer) *srcImage {
	t.Helper()
	img := &srcImage{layers: layers, blobs: map[digest.Digest][]byte{}}
	var diffIDs []digest.Digest
	descs := []ocispec.Descriptor{}
	for _, l := range layers {
		diffIDs = append(diffIDs, digest.FromBytes(l.tar))
		descs = append(descs, l.desc)
		img.blobs[l.desc.Digest] = l.blob
	}
	img.config = configJSON(p, diffIDs)
	mt, cmt := ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageConfig
	if docker {
		mt, cmt = convert.MediaTypeDockerManifest, convert.MediaTypeDockerConfig
	}
	img.cfgDesc = ocispec.Descriptor{MediaType: cmt, Digest: digest.FromBytes(img.config), Size: int64(len(img.config))}
	img.blobs[img.cfgDesc.Digest] = img.config
	m := ocispec.Manifest{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   mt,
		Config:      img.cfgDesc,
		Layers:      descs,
		Annotations: map[string]string{"org.opencontainers.image.source": "https://example.com/lazypull"},
	}
	if docker {
		m.Annotations = nil
	}
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	img.manifest = raw
	img.desc = ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(raw), Size: int64(len(raw)), Platform: &p}
	return img
}

var hostPlatform = ocispec.Platform{OS: "linux", Architecture: "amd64"}

// mixedImage has a plain tar, a gzip, a zstd and a Docker-media-type
// gzip layer.
func mixedImage(t testing.TB) *srcImage {
	return mkImage(t, hostPlatform, false,
		mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 1)),
		mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 2)),
		mkLayer(t, ocispec.MediaTypeImageLayerZstd, layerTar(t, 3)),
		mkLayer(t, convert.MediaTypeDockerLayer, layerTar(t, 4)),
	)
}

// dockerImage is a Docker schema 2 image.
func dockerImage(t testing.TB) *srcImage {
	return mkImage(t, hostPlatform, true,
		mkLayer(t, convert.MediaTypeDockerLayer, layerTar(t, 5)),
		mkLayer(t, convert.MediaTypeDockerLayer, layerTar(t, 6)),
	)
}

// pushImage pushes img's blobs and manifest to repo (tag "" pushes by
// digest only).
func pushImage(t testing.TB, reg *remotetest.Registry, repo, tag string, img *srcImage) {
	t.Helper()
	for _, b := range img.blobs {
		reg.PushBlob(t, repo, b)
	}
	reg.PushManifest(t, repo, tag, img.manifest)
}

// indexOf makes an index document of manifests.
func indexOf(t testing.TB, docker bool, manifests ...ocispec.Descriptor) ([]byte, ocispec.Descriptor) {
	t.Helper()
	mt := ocispec.MediaTypeImageIndex
	if docker {
		mt = convert.MediaTypeDockerManifestList
	}
	raw, err := json.Marshal(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: mt, Manifests: manifests,
		Annotations: map[string]string{"org.example.index": "kept"}})
	if err != nil {
		t.Fatal(err)
	}
	return raw, ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(raw), Size: int64(len(raw))}
}

// layout is an OCI image layout directory written by the tests.
type layout struct {
	dir string
}

func newLayout(t testing.TB) *layout {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	return &layout{dir: dir}
}

func (l *layout) path(d digest.Digest) string {
	return filepath.Join(l.dir, "blobs", d.Algorithm().String(), d.Encoded())
}

func (l *layout) put(t testing.TB, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	if err := os.MkdirAll(filepath.Dir(l.path(d)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(l.path(d), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

// tag adds desc to index.json under tag ("" adds it without a name).
func (l *layout) tag(t testing.TB, desc ocispec.Descriptor, tag string) {
	t.Helper()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	if b, err := os.ReadFile(filepath.Join(l.dir, ocispec.ImageIndexFile)); err == nil {
		if err := json.Unmarshal(b, &idx); err != nil {
			t.Fatal(err)
		}
	}
	desc.Platform = nil
	if tag != "" {
		desc.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	}
	idx.Manifests = append(idx.Manifests, desc)
	b, _ := json.Marshal(idx)
	if err := os.WriteFile(filepath.Join(l.dir, ocispec.ImageIndexFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (l *layout) putImage(t testing.TB, img *srcImage, tag string) {
	t.Helper()
	for _, b := range img.blobs {
		l.put(t, b)
	}
	l.put(t, img.manifest)
	if tag != "-" {
		l.tag(t, img.desc, tag)
	}
}

func (l *layout) ref(tag string) string {
	if tag == "" {
		return convert.LayoutPrefix + l.dir
	}
	return convert.LayoutPrefix + l.dir + ":" + tag
}

// view reads a converted image back: its root, manifests and blobs.
type view interface {
	// root returns the tagged manifest or index, or ok=false if the tag
	// does not exist.
	root(t testing.TB) (desc ocispec.Descriptor, raw []byte, ok bool)
	manifest(t testing.TB, d digest.Digest) []byte
	blob(t testing.TB, d digest.Digest) []byte
}

type layoutView struct {
	l   *layout
	tag string
}

func (v layoutView) root(t testing.TB) (ocispec.Descriptor, []byte, bool) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(v.l.dir, ocispec.ImageIndexFile))
	if os.IsNotExist(err) {
		return ocispec.Descriptor{}, nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	var found []ocispec.Descriptor
	for _, m := range idx.Manifests {
		if m.Annotations[ocispec.AnnotationRefName] == v.tag {
			found = append(found, m)
		}
	}
	switch len(found) {
	case 0:
		return ocispec.Descriptor{}, nil, false
	case 1:
		return found[0], v.blob(t, found[0].Digest), true
	}
	t.Fatalf("index.json has %d entries tagged %q", len(found), v.tag)
	return ocispec.Descriptor{}, nil, false
}

func (v layoutView) manifest(t testing.TB, d digest.Digest) []byte { return v.blob(t, d) }

func (v layoutView) blob(t testing.TB, d digest.Digest) []byte {
	t.Helper()
	b, err := os.ReadFile(v.l.path(d))
	if err != nil {
		t.Fatalf("layout blob: %v", err)
	}
	if digest.FromBytes(b) != d {
		t.Fatalf("layout blob %s does not match its digest", d)
	}
	return b
}

type registryView struct {
	reg       *remotetest.Registry
	repo, tag string
}

const acceptManifests = ocispec.MediaTypeImageIndex + ", " + ocispec.MediaTypeImageManifest + ", " +
	convert.MediaTypeDockerManifestList + ", " + convert.MediaTypeDockerManifest

func (v registryView) get(t testing.TB, ref string) (string, []byte, int) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, v.reg.URL()+"/v2/"+v.repo+"/manifests/"+ref, nil)
	req.Header.Set("Accept", acceptManifests)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Get("Content-Type"), b, resp.StatusCode
}

func (v registryView) root(t testing.TB) (ocispec.Descriptor, []byte, bool) {
	t.Helper()
	ct, b, code := v.get(t, v.tag)
	if code == http.StatusNotFound {
		return ocispec.Descriptor{}, nil, false
	}
	if code != http.StatusOK {
		t.Fatalf("GET manifest %s:%s: %d %s", v.repo, v.tag, code, b)
	}
	return ocispec.Descriptor{MediaType: ct, Digest: digest.FromBytes(b), Size: int64(len(b))}, b, true
}

func (v registryView) manifest(t testing.TB, d digest.Digest) []byte {
	t.Helper()
	_, b, code := v.get(t, d.String())
	if code != http.StatusOK {
		t.Fatalf("GET manifest %s@%s: %d %s", v.repo, d, code, b)
	}
	if digest.FromBytes(b) != d {
		t.Fatalf("manifest %s does not match its digest", d)
	}
	return b
}

func (v registryView) blob(t testing.TB, d digest.Digest) []byte {
	t.Helper()
	b := v.reg.Blob(t, v.repo, d)
	if digest.FromBytes(b) != d {
		t.Fatalf("blob %s does not match its digest", d)
	}
	return b
}

// newClient is a registry client for the tests (localhost: plain HTTP).
func newClient(t testing.TB) *remote.Registry {
	t.Helper()
	r, err := remote.New(remote.Options{HostsDir: t.TempDir(), DockerConfig: filepath.Join(t.TempDir(), "none.json"), Retries: 1, RetryBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func openStore(t testing.TB, ref string, reg *remote.Registry) convert.Store {
	t.Helper()
	s, err := convert.OpenStore(ref, reg)
	if err != nil {
		t.Fatalf("OpenStore(%q): %v", ref, err)
	}
	return s
}

// events collects progress events.
type events struct {
	mu  sync.Mutex
	evs []convert.Event
}

func (e *events) add(ev convert.Event) {
	e.mu.Lock()
	e.evs = append(e.evs, ev)
	e.mu.Unlock()
}

// byLayer returns each layer's events in order.
func (e *events) byLayer() map[digest.Digest][]convert.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[digest.Digest][]convert.Event{}
	for _, ev := range e.evs {
		out[ev.Layer] = append(out[ev.Layer], ev)
	}
	return out
}

// fileEnt is a tar entry reduced to what conversion must keep.
type fileEnt struct {
	Type     byte
	Mode     int64
	UID, GID int
	Link     string
	Data     string
	Xattrs   map[string]string
	ModTime  time.Time
}

// readEntries reads a tar into name -> entry (names cleaned) and the
// order of names.
func readEntries(t testing.TB, r io.Reader) (map[string]fileEnt, []string) {
	t.Helper()
	ents, err := fixture.ReadTar(r)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]fileEnt{}
	var order []string
	for _, e := range ents {
		h := &e.Header
		name := strings.TrimSuffix(strings.TrimPrefix(h.Name, "./"), "/")
		link := h.Linkname
		if h.Typeflag == tar.TypeLink {
			link = strings.TrimPrefix(link, "./")
		}
		typ := h.Typeflag
		if typ == tar.TypeRegA { //nolint:staticcheck // old archives
			typ = tar.TypeReg
		}
		out[name] = fileEnt{Type: typ, Mode: h.Mode & 0o7777, UID: h.Uid, GID: h.Gid, Link: link, Data: string(e.Data), Xattrs: fixture.Xattrs(h), ModTime: h.ModTime.UTC()}
		order = append(order, name)
	}
	return out, order
}

// decompress decompresses a converted blob with the standard decoders.
func decompress(t testing.TB, comp estargz.Compression, blob []byte) []byte {
	t.Helper()
	if comp == estargz.Zstd {
		dec, err := zstd.NewReader(nil)
		if err != nil {
			t.Fatal(err)
		}
		defer dec.Close()
		out, err := dec.DecodeAll(blob, nil)
		if err != nil {
			t.Fatalf("zstd-decompressing the converted blob: %v", err)
		}
		return out
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatalf("gunzip: %v", err)
	}
	out, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzipping the converted blob: %v", err)
	}
	return out
}

// checkLayer checks one converted layer against its source tar: media
// type, annotations, TOC, Verify, files, and returns its diff_id.
func checkLayer(t testing.TB, desc ocispec.Descriptor, blob, srcTar []byte, comp estargz.Compression) digest.Digest {
	t.Helper()
	if digest.FromBytes(blob) != desc.Digest || int64(len(blob)) != desc.Size {
		t.Fatalf("layer %s: blob does not match its descriptor", desc.Digest)
	}
	wantMT := ocispec.MediaTypeImageLayerGzip
	if comp == estargz.Zstd {
		wantMT = ocispec.MediaTypeImageLayerZstd
	}
	if desc.MediaType != wantMT {
		t.Errorf("layer %s: media type %q, want %q", desc.Digest, desc.MediaType, wantMT)
	}
	r, err := estargz.Open(bytes.NewReader(blob), int64(len(blob)), estargz.OpenOptions{})
	if err != nil {
		t.Fatalf("layer %s: estargz.Open: %v", desc.Digest, err)
	}
	if r.Footer.Compression != comp {
		t.Errorf("layer %s: compression %v, want %v", desc.Digest, r.Footer.Compression, comp)
	}
	if err := r.Verify(); err != nil {
		t.Errorf("layer %s: Verify: %v", desc.Digest, err)
	}
	if got, want := desc.Annotations[estargz.TOCDigestAnnotation], digest.FromBytes(r.TOCJSON).String(); got != want {
		t.Errorf("layer %s: %s = %q, want sha256 of the TOC %q", desc.Digest, estargz.TOCDigestAnnotation, got, want)
	}
	plain := decompress(t, comp, blob)
	if got, want := desc.Annotations[estargz.UncompressedSizeAnnotation], strconv.Itoa(len(plain)); got != want {
		t.Errorf("layer %s: %s = %q, want %s", desc.Digest, estargz.UncompressedSizeAnnotation, got, want)
	}
	zsum, zpos := desc.Annotations[estargz.ZstdChunkedManifestChecksumAnnotation], desc.Annotations[estargz.ZstdChunkedManifestPositionAnnotation]
	if comp == estargz.Zstd {
		var off, n, size, typ int64
		if _, err := fmt.Sscanf(zpos, "%d:%d:%d:%d", &off, &n, &size, &typ); err != nil || typ != 1 || off < 0 || off+n > int64(len(blob)) {
			t.Errorf("layer %s: %s = %q is not offset:length:uncompressed:1 within the blob", desc.Digest, estargz.ZstdChunkedManifestPositionAnnotation, zpos)
		} else {
			if got := digest.FromBytes(blob[off : off+n]).String(); zsum != got {
				t.Errorf("layer %s: %s = %q, the bytes at %s hash to %s", desc.Digest, estargz.ZstdChunkedManifestChecksumAnnotation, zsum, zpos, got)
			}
			if size != int64(len(r.TOCJSON)) || off != r.Footer.TOCOffset || n != r.Footer.TOCCompressedSize {
				t.Errorf("layer %s: %s = %q, footer says %d:%d:%d", desc.Digest, estargz.ZstdChunkedManifestPositionAnnotation, zpos, r.Footer.TOCOffset, r.Footer.TOCCompressedSize, len(r.TOCJSON))
			}
		}
	} else if zsum != "" || zpos != "" {
		t.Errorf("layer %s: gzip layer has zstd:chunked annotations", desc.Digest)
	}

	// The converted tar holds the source's entries, plus landmarks and
	// the TOC.
	want, _ := readEntries(t, bytes.NewReader(srcTar))
	got, _ := readEntries(t, bytes.NewReader(plain))
	for _, extra := range []string{estargz.TOCTarName, estargz.PrefetchLandmark, estargz.NoPrefetchLandmark} {
		delete(got, extra)
	}
	if !reflect.DeepEqual(got, want) {
		for name, w := range want {
			if g, ok := got[name]; !ok {
				t.Errorf("layer %s: %s missing", desc.Digest, name)
			} else if !reflect.DeepEqual(g, w) {
				t.Errorf("layer %s: %s differs:\n got %+v\nwant %+v", desc.Digest, name, trimEnt(g), trimEnt(w))
			}
		}
		for name := range got {
			if _, ok := want[name]; !ok {
				t.Errorf("layer %s: unexpected entry %s", desc.Digest, name)
			}
		}
	}
	// And the eStargz reader serves the same bytes.
	for name, w := range want {
		if w.Type != tar.TypeReg {
			continue
		}
		sr, err := r.OpenFile(name)
		if err != nil {
			t.Errorf("layer %s: OpenFile(%s): %v", desc.Digest, name, err)
			continue
		}
		b, err := io.ReadAll(sr)
		if err != nil || string(b) != w.Data {
			t.Errorf("layer %s: %s read through the TOC: %d bytes (%v), want %d", desc.Digest, name, len(b), err, len(w.Data))
		}
	}
	return digest.FromBytes(plain)
}

func trimEnt(e fileEnt) fileEnt {
	if len(e.Data) > 40 {
		e.Data = e.Data[:40] + "..."
	}
	return e
}

// decodeJSON decodes with json.Number, so numbers compare by their text.
func decodeJSON(t testing.TB, b []byte) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return m
}

// checkManifest checks a converted image manifest against its source and
// returns it.
func checkManifest(t testing.TB, v view, raw []byte, src *srcImage, comp estargz.Compression) ocispec.Manifest {
	t.Helper()
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("converted manifest: %v", err)
	}
	if m.SchemaVersion != 2 || m.MediaType != ocispec.MediaTypeImageManifest {
		t.Errorf("manifest schemaVersion %d mediaType %q, want 2 and OCI", m.SchemaVersion, m.MediaType)
	}
	if m.Config.MediaType != ocispec.MediaTypeImageConfig {
		t.Errorf("config media type %q, want %q", m.Config.MediaType, ocispec.MediaTypeImageConfig)
	}
	var srcM ocispec.Manifest
	json.Unmarshal(src.manifest, &srcM)
	if !reflect.DeepEqual(m.Annotations, srcM.Annotations) {
		t.Errorf("manifest annotations %v, want the source's %v", m.Annotations, srcM.Annotations)
	}
	if len(m.Layers) != len(src.layers) {
		t.Fatalf("%d layers, want %d", len(m.Layers), len(src.layers))
	}
	var diffIDs []any
	for i, l := range m.Layers {
		d := checkLayer(t, l, v.blob(t, l.Digest), src.layers[i].tar, comp)
		diffIDs = append(diffIDs, d.String())
	}
	cfg := v.blob(t, m.Config.Digest)
	if int64(len(cfg)) != m.Config.Size {
		t.Errorf("config size %d, descriptor says %d", len(cfg), m.Config.Size)
	}
	got, want := decodeJSON(t, cfg), decodeJSON(t, src.config)
	rootfs, _ := got["rootfs"].(map[string]any)
	if rootfs == nil || rootfs["type"] != "layers" || !reflect.DeepEqual(rootfs["diff_ids"], diffIDs) {
		t.Errorf("config rootfs %v, want type layers and diff_ids %v", got["rootfs"], diffIDs)
	}
	delete(got, "rootfs")
	delete(want, "rootfs")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("config changed beyond rootfs:\n got %s\nwant %s", cfg, src.config)
	}
	return m
}

// blobWrites returns the registry's blob upload requests.
func blobWrites(reg *remotetest.Registry) []string {
	var out []string
	for _, q := range reg.Requests() {
		if strings.Contains(q.Path, "/blobs/") && (q.Method == http.MethodPut || q.Method == http.MethodPatch || q.Method == http.MethodPost) {
			out = append(out, q.Method+" "+q.Path)
		}
	}
	return out
}

// manifestWrites returns the registry's manifest PUTs.
func manifestWrites(reg *remotetest.Registry) []string {
	var out []string
	for _, q := range reg.Requests() {
		if strings.Contains(q.Path, "/manifests/") && q.Method == http.MethodPut {
			out = append(out, q.Path)
		}
	}
	return out
}
