// Package convert turns container images into eStargz images: it reads an
// image (a manifest, or an index with all or some platforms) from a
// registry or an OCI layout, rebuilds every layer as eStargz (gzip or
// zstd:chunked), writes a config with the new diff_ids and an OCI manifest
// whose layer descriptors carry the TOC digest and uncompressed size
// annotations, and pushes the result. Layers already in eStargz form are
// kept as they are, unless files are to be prioritized (then they are
// rebuilt, which is how `lazypull optimize` reorders an eStargz image);
// blobs the destination has are not uploaded again.
package convert

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/lazypull/lazypull/estargz"
)

// Media types of Docker schema 2 images, read alongside OCI ones.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
	MediaTypeDockerLayer        = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	MediaTypeDockerForeignLayer = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
)

// Options tune Convert.
type Options struct {
	// Build holds the eStargz options applied to every layer
	// (compression, level, chunk size, prioritized files). With
	// prioritized files, layers already in eStargz form are rebuilt too.
	Build estargz.BuildOptions
	// Platform, when set, selects the manifests of an index to convert;
	// nil converts every platform.
	Platform platforms.MatchComparer
	// Parallel is how many layers are converted at once (default 2; each
	// conversion already uses every core).
	Parallel int
	// TempDir holds converted blobs before upload (default os.TempDir()).
	TempDir string
	// Progress, when set, receives layer progress events.
	Progress func(Event)
}

// Phase of a layer's conversion.
type Phase string

// Phases reported in Events.
const (
	PhaseConvert Phase = "convert" // reading and compressing
	PhaseUpload  Phase = "upload"  // pushing the converted blob
	PhaseKept    Phase = "kept"    // already eStargz, copied as is
	PhaseDone    Phase = "done"
)

// Event reports progress on one layer.
type Event struct {
	// Layer is the source layer's digest.
	Layer digest.Digest
	// Phase is what is happening.
	Phase Phase
	// Done and Total are bytes of the current phase (source compressed
	// bytes while converting, converted bytes while uploading).
	Done, Total int64
}

// Result describes a converted image.
type Result struct {
	// Desc is the pushed manifest or index.
	Desc ocispec.Descriptor
	// Layers maps each source layer to its converted descriptor.
	Layers map[digest.Digest]ocispec.Descriptor
	// Uploaded counts blobs actually uploaded (others existed).
	Uploaded int
}

// Convert converts the image at src and pushes it to dst.
func Convert(ctx context.Context, src, dst Store, opts Options) (*Result, error) {
	if opts.Parallel <= 0 {
		opts.Parallel = 2
	}
	if opts.Build.Workers <= 0 {
		opts.Build.Workers = runtime.GOMAXPROCS(0)
	}
	rootDesc, raw, err := src.Root(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", src, err)
	}
	c := &converter{src: src, dst: dst, opts: opts, layers: map[digest.Digest]ocispec.Descriptor{}, diffIDs: map[digest.Digest]digest.Digest{}}
	var desc ocispec.Descriptor
	switch rootDesc.MediaType {
	case ocispec.MediaTypeImageIndex, MediaTypeDockerManifestList:
		desc, err = c.convertIndex(ctx, raw)
	case ocispec.MediaTypeImageManifest, MediaTypeDockerManifest:
		desc, err = c.convertManifest(ctx, raw, true)
	default:
		return nil, fmt.Errorf("%s: %w: unsupported media type %q", src, errdefs.ErrNotImplemented, rootDesc.MediaType)
	}
	if err != nil {
		return nil, err
	}
	return &Result{Desc: desc, Layers: c.layers, Uploaded: int(c.uploaded.Load())}, nil
}

type converter struct {
	src, dst Store
	opts     Options
	// layers and diffIDs remember converted layers, so a layer shared by
	// several manifests of an index is converted once. They are written
	// only between errgroups.
	layers   map[digest.Digest]ocispec.Descriptor
	diffIDs  map[digest.Digest]digest.Digest
	uploaded atomic.Int64
}

func (c *converter) convertIndex(ctx context.Context, raw []byte) (ocispec.Descriptor, error) {
	var idx ocispec.Index
	if err := json.Unmarshal(raw, &idx); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: parsing index: %w", c.src, err)
	}
	out := ocispec.Index{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   ocispec.MediaTypeImageIndex,
		Annotations: idx.Annotations,
	}
	for _, m := range idx.Manifests {
		if m.MediaType != ocispec.MediaTypeImageManifest && m.MediaType != MediaTypeDockerManifest {
			continue // nested indexes and artifacts are not images to convert
		}
		if m.Annotations["vnd.docker.reference.type"] == "attestation-manifest" {
			continue // attests the source image, not the converted one
		}
		if c.opts.Platform != nil && (m.Platform == nil || !c.opts.Platform.Match(*m.Platform)) {
			continue
		}
		rc, err := c.src.Fetch(ctx, m)
		if err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("%s: fetching manifest %s: %w", c.src, m.Digest, err)
		}
		mraw, err := readAllVerified(rc, m)
		if err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("%s: manifest %s: %w", c.src, m.Digest, err)
		}
		nd, err := c.convertManifest(ctx, mraw, false)
		if err != nil {
			return ocispec.Descriptor{}, err
		}
		nd.Platform = m.Platform
		out.Manifests = append(out.Manifests, nd)
	}
	if len(out.Manifests) == 0 {
		return ocispec.Descriptor{}, fmt.Errorf("%s: %w: no manifest in the index matches the requested platform", c.src, errdefs.ErrNotFound)
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := c.dst.PushManifest(ctx, desc, b, true); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: pushing index: %w", c.dst, err)
	}
	return desc, nil
}

func readAllVerified(rc io.ReadCloser, desc ocispec.Descriptor) ([]byte, error) {
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, 8<<20))
	if err != nil {
		return nil, err
	}
	if digest.FromBytes(b) != desc.Digest {
		return nil, fmt.Errorf("%w: content does not match digest %s", errdefs.ErrDataLoss, desc.Digest)
	}
	return b, nil
}

// convertManifest converts one image manifest and pushes its blobs, config
// and the new manifest (tagged when tag is set).
func (c *converter) convertManifest(ctx context.Context, raw []byte, tag bool) (ocispec.Descriptor, error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: parsing manifest: %w", c.src, err)
	}
	rc, err := c.src.Fetch(ctx, m.Config)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: fetching config %s: %w", c.src, m.Config.Digest, err)
	}
	cfgRaw, err := readAllVerified(rc, m.Config)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: config %s: %w", c.src, m.Config.Digest, err)
	}
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(cfgRaw, &cfg); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: parsing config: %w", c.src, err)
	}
	var rootfs ocispec.RootFS
	if err := json.Unmarshal(cfg["rootfs"], &rootfs); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: config rootfs: %w", c.src, err)
	}
	if len(rootfs.DiffIDs) != len(m.Layers) {
		return ocispec.Descriptor{}, fmt.Errorf("%s: config lists %d diff_ids for %d layers", c.src, len(rootfs.DiffIDs), len(m.Layers))
	}

	newLayers := make([]ocispec.Descriptor, len(m.Layers))
	diffIDs := make([]digest.Digest, len(m.Layers))
	first := map[digest.Digest]int{} // a layer listed twice is converted once
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Parallel)
	for i, l := range m.Layers {
		if done, ok := c.layers[l.Digest]; ok {
			newLayers[i], diffIDs[i] = done, c.diffIDs[l.Digest]
			continue
		}
		if _, ok := first[l.Digest]; ok {
			continue
		}
		first[l.Digest] = i
		g.Go(func() error {
			nd, diffID, err := c.convertLayer(gctx, l, rootfs.DiffIDs[i])
			if err != nil {
				return fmt.Errorf("layer %d (%s): %w", i+1, l.Digest, err)
			}
			newLayers[i], diffIDs[i] = nd, diffID
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return ocispec.Descriptor{}, err
	}
	for i, l := range m.Layers {
		if j, ok := first[l.Digest]; ok && j != i {
			newLayers[i], diffIDs[i] = newLayers[j], diffIDs[j]
		}
		c.layers[l.Digest], c.diffIDs[l.Digest] = newLayers[i], diffIDs[i]
	}

	rootfs.DiffIDs = diffIDs
	rb, err := json.Marshal(rootfs)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	cfg["rootfs"] = rb
	newCfg, err := json.Marshal(cfg)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	cfgDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(newCfg), Size: int64(len(newCfg))}
	if err := c.push(ctx, cfgDesc, newCfg); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: pushing config: %w", c.dst, err)
	}
	out := ocispec.Manifest{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   ocispec.MediaTypeImageManifest,
		Config:      cfgDesc,
		Layers:      newLayers,
		Annotations: m.Annotations,
	}
	mb, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb))}
	if err := c.dst.PushManifest(ctx, desc, mb, tag); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: pushing manifest: %w", c.dst, err)
	}
	return desc, nil
}

func (c *converter) push(ctx context.Context, desc ocispec.Descriptor, b []byte) error {
	ok, err := c.dst.Exists(ctx, desc)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	c.uploaded.Add(1)
	return c.dst.Push(ctx, desc, bytesReader(b))
}

func isLayer(mt string) bool {
	switch mt {
	case ocispec.MediaTypeImageLayer, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd, MediaTypeDockerLayer:
		return true
	}
	return false
}

// convertLayer converts (or keeps) one layer and makes sure dst has it.
func (c *converter) convertLayer(ctx context.Context, l ocispec.Descriptor, diffID digest.Digest) (ocispec.Descriptor, digest.Digest, error) {
	if l.MediaType == MediaTypeDockerForeignLayer || l.MediaType == ocispec.MediaTypeImageLayerNonDistributableGzip { //nolint:staticcheck // still seen in the wild
		c.progress(Event{Layer: l.Digest, Phase: PhaseKept, Done: l.Size, Total: l.Size})
		return l, diffID, nil
	}
	if !isLayer(l.MediaType) {
		return ocispec.Descriptor{}, "", fmt.Errorf("%w: unsupported layer media type %q", errdefs.ErrNotImplemented, l.MediaType)
	}
	if _, ok := l.Annotations[estargz.TOCDigestAnnotation]; ok && l.MediaType != ocispec.MediaTypeImageLayer && len(c.opts.Build.Prioritized) == 0 {
		// Already eStargz: keep it, but make sure dst has it.
		if err := c.copyBlob(ctx, l); err != nil {
			return ocispec.Descriptor{}, "", err
		}
		c.progress(Event{Layer: l.Digest, Phase: PhaseKept, Done: l.Size, Total: l.Size})
		nd := l
		if nd.MediaType == MediaTypeDockerLayer {
			nd.MediaType = ocispec.MediaTypeImageLayerGzip
		}
		return nd, diffID, nil
	}

	rc, err := c.src.Fetch(ctx, l)
	if err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("fetching: %w", err)
	}
	defer rc.Close()
	tmp, err := os.CreateTemp(c.opts.TempDir, "lazypull-layer-*")
	if err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("creating temporary file: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()

	verifier := l.Digest.Verifier()
	in := &progressReader{r: io.TeeReader(rc, verifier), total: l.Size, report: func(done, total int64) {
		c.progress(Event{Layer: l.Digest, Phase: PhaseConvert, Done: done, Total: total})
	}}
	bw := bufio.NewWriterSize(tmp, 1<<20)
	bo := c.opts.Build
	bo.TempDir = c.opts.TempDir
	res, err := estargz.Build(ctx, bw, in, bo)
	// Build stops at the end of the tar: read the rest, so that the whole
	// blob is checked against its digest (a corrupted source must not be
	// converted, and explains a failed Build better than the tar error).
	if ctx.Err() == nil {
		if _, derr := io.Copy(io.Discard, in); derr != nil && (err == nil || errdefs.IsDataLoss(derr)) {
			return ocispec.Descriptor{}, "", fmt.Errorf("fetching: %w", derr)
		} else if derr == nil && (in.done != l.Size || !verifier.Verified()) {
			return ocispec.Descriptor{}, "", fmt.Errorf("%w: source blob does not match its descriptor (%d bytes, digest %s)", errdefs.ErrDataLoss, l.Size, l.Digest)
		}
	}
	if err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("converting: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("writing temporary file: %w", err)
	}
	nd := ocispec.Descriptor{
		MediaType:   res.Compression.MediaType(),
		Digest:      res.Digest,
		Size:        res.Size,
		Annotations: res.Annotations,
	}
	if ok, err := c.dst.Exists(ctx, nd); err != nil {
		return ocispec.Descriptor{}, "", fmt.Errorf("checking %s: %w", c.dst, err)
	} else if !ok {
		if _, err := tmp.Seek(0, io.SeekStart); err != nil {
			return ocispec.Descriptor{}, "", err
		}
		up := &progressReader{r: tmp, total: nd.Size, report: func(done, total int64) {
			c.progress(Event{Layer: l.Digest, Phase: PhaseUpload, Done: done, Total: total})
		}}
		if err := c.dst.Push(ctx, nd, up); err != nil {
			return ocispec.Descriptor{}, "", fmt.Errorf("pushing to %s: %w", c.dst, err)
		}
		c.uploaded.Add(1)
	}
	c.progress(Event{Layer: l.Digest, Phase: PhaseDone, Done: nd.Size, Total: nd.Size})
	return nd, res.DiffID, nil
}

func (c *converter) copyBlob(ctx context.Context, l ocispec.Descriptor) error {
	ok, err := c.dst.Exists(ctx, l)
	if err != nil || ok {
		return err
	}
	rc, err := c.src.Fetch(ctx, l)
	if err != nil {
		return fmt.Errorf("fetching: %w", err)
	}
	defer rc.Close()
	c.uploaded.Add(1)
	return c.dst.Push(ctx, l, rc)
}

func (c *converter) progress(e Event) {
	if c.opts.Progress != nil {
		c.opts.Progress(e)
	}
}

type progressReader struct {
	r            io.Reader
	done, total  int64
	lastReported int64
	report       func(done, total int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.done += int64(n)
	// Report every MiB and at the end: at EOF, or when total is reached
	// (a reader that knows the size, such as an upload, stops there).
	if p.done-p.lastReported >= 1<<20 || (err == io.EOF || p.done == p.total) && p.done != p.lastReported {
		p.lastReported = p.done
		p.report(p.done, p.total)
	}
	return n, err
}
