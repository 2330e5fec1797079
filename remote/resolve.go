package remote

import (
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Limits on documents read into memory.
const (
	maxManifestSize = 4 << 20
	maxConfigSize   = 32 << 20
	maxIndexDepth   = 4
)

// Docker media types (the OCI ones come from image-spec).
const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaTypeDockerSchema1      = "application/vnd.docker.distribution.manifest.v1+prettyjws"
)

// manifestAccept lists the manifest media types we understand, for the
// Accept header.
var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageIndex,
	ocispec.MediaTypeImageManifest,
	mediaTypeDockerManifestList,
	mediaTypeDockerManifest,
}, ", ")

// Image is a resolved image: the manifest for one platform, its config,
// and the index it was chosen from, if any.
type Image struct {
	// Ref is the normalised reference that was resolved, e.g.
	// "docker.io/library/alpine:3.20".
	Ref string
	// Name is the repository, e.g. "docker.io/library/alpine"; pass it (or
	// Ref) to Fetch and OpenBlob.
	Name string

	// Index is the index (or Docker manifest list) the reference pointed
	// at, nil when it pointed at a manifest. For nested indexes it is the
	// innermost one.
	Index *ocispec.Index
	// IndexDesc describes Index; zero when Index is nil.
	IndexDesc ocispec.Descriptor
	// IndexRaw is Index as the registry sent it.
	IndexRaw []byte

	// ManifestDesc describes the manifest; when chosen from an index it
	// carries the index entry's platform and annotations.
	ManifestDesc ocispec.Descriptor
	// Manifest is the image manifest (OCI or Docker schema 2).
	Manifest ocispec.Manifest
	// ManifestRaw is the manifest as the registry sent it.
	ManifestRaw []byte

	// ConfigDesc describes the image config (Manifest.Config).
	ConfigDesc ocispec.Descriptor
	// Config is the image config.
	Config ocispec.Image
	// ConfigRaw is the config as the registry sent it.
	ConfigRaw []byte
}

// Resolve turns an image reference (e.g. "127.0.0.1:5000/app:v1",
// "docker.io/library/alpine@sha256:...", "alpine") into its manifest and
// config. An index or manifest list resolves to the manifest for platform,
// or for the host's platform when platform is nil.
func (r *Registry) Resolve(ctx context.Context, ref string, platform *ocispec.Platform) (*Image, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	desc, raw, err := r.fetchTop(ctx, spec)
	if err != nil {
		return nil, err
	}
	img := &Image{Ref: spec.String(), Name: spec.name()}

	matcher := platforms.Default()
	if platform != nil {
		matcher = platforms.Only(*platform)
	}
	for depth := 0; isIndexType(desc.MediaType); depth++ {
		if depth >= maxIndexDepth {
			return nil, &Error{Op: "resolve", Repo: spec.name(), Ref: desc.Digest.String(),
				Err: fmt.Errorf("indexes nested more than %d deep", maxIndexDepth), class: errdefs.ErrInvalidArgument}
		}
		var idx ocispec.Index
		if err := json.Unmarshal(raw, &idx); err != nil {
			return nil, badDocument("resolve", spec, desc, err)
		}
		img.Index, img.IndexDesc, img.IndexRaw = &idx, desc, raw
		child, err := selectManifest(idx, matcher)
		if err != nil {
			return nil, &Error{Op: "resolve", Repo: spec.name(), Ref: desc.Digest.String(), Err: err, class: errdefs.ErrNotFound}
		}
		raw, err = r.fetchManifest(ctx, spec, child)
		if err != nil {
			return nil, err
		}
		desc = child
	}
	if !isManifestType(desc.MediaType) {
		return nil, &Error{Op: "resolve", Repo: spec.name(), Ref: desc.Digest.String(),
			Err: fmt.Errorf("unsupported manifest media type %q", desc.MediaType), class: errdefs.ErrNotImplemented}
	}
	if err := json.Unmarshal(raw, &img.Manifest); err != nil {
		return nil, badDocument("resolve", spec, desc, err)
	}
	if err := img.Manifest.Config.Digest.Validate(); err != nil {
		return nil, badDocument("resolve", spec, desc, fmt.Errorf("config digest: %w", err))
	}
	img.ManifestDesc, img.ManifestRaw = desc, raw
	img.ConfigDesc = img.Manifest.Config

	cfg, err := r.fetchBytes(ctx, spec, img.ConfigDesc, maxConfigSize)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(cfg, &img.Config); err != nil {
		return nil, badDocument("resolve", spec, img.ConfigDesc, err)
	}
	img.ConfigRaw = cfg
	return img, nil
}

// FetchIndexOrManifest fetches what ref points at, an index or a manifest,
// as the registry sent it, with its descriptor (media type, digest, size).
// Tags are resolved only on hosts with the resolve capability.
func (r *Registry) FetchIndexOrManifest(ctx context.Context, ref string) (ocispec.Descriptor, []byte, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	return r.fetchTop(ctx, spec)
}

func (r *Registry) fetchTop(ctx context.Context, spec refSpec) (ocispec.Descriptor, []byte, error) {
	capability := docker.HostCapabilityResolve
	if spec.dgst != "" {
		capability = docker.HostCapabilityPull
	}
	eps, err := r.endpoints(spec, capability)
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	var (
		desc ocispec.Descriptor
		raw  []byte
	)
	err = r.onEndpoints(ctx, eps, func(ep *endpoint, last bool) error {
		return r.retry(ctx, last, func(attempt int) error {
			var err error
			desc, raw, err = r.getManifest(ctx, ep, spec, spec.object(), spec.dgst, -1, attempt)
			return err
		})
	})
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	return desc, raw, nil
}

// fetchManifest fetches the manifest or index desc describes, by digest.
func (r *Registry) fetchManifest(ctx context.Context, spec refSpec, desc ocispec.Descriptor) ([]byte, error) {
	eps, err := r.endpoints(spec, docker.HostCapabilityPull)
	if err != nil {
		return nil, err
	}
	var raw []byte
	err = r.onEndpoints(ctx, eps, func(ep *endpoint, last bool) error {
		return r.retry(ctx, last, func(attempt int) error {
			var err error
			_, raw, err = r.getManifest(ctx, ep, spec, desc.Digest.String(), desc.Digest, desc.Size, attempt)
			return err
		})
	})
	return raw, err
}

// getManifest is one attempt at GET /v2/<repo>/manifests/<object>. When
// want is set the body must have that digest (and size, if size >= 0).
func (r *Registry) getManifest(ctx context.Context, ep *endpoint, spec refSpec, object string, want digest.Digest, size int64, attempt int) (desc ocispec.Descriptor, raw []byte, err error) {
	actx, wd := r.attempt(ctx)
	defer wd.done()
	start := time.Now()
	ev := FetchEvent{Op: "manifest", Host: ep.host.Host, Repo: spec.name(), Digest: want, Length: -1, Attempt: attempt}
	defer func() {
		ev.Duration, ev.Bytes = time.Since(start), int64(len(raw))
		if err != nil {
			err = transportError(ctx, actx, err, r.opts.RequestTimeout).with("resolve", ep.host.Host, spec.name(), object, "")
			ev.Err = err
		}
		r.emit(ev)
	}()

	q := &request{method: http.MethodGet, url: ep.url(spec.repo, "manifests", object),
		header: http.Header{"Accept": {manifestAccept}}, repo: spec.repo}
	wd.arm()
	resp, err := r.send(actx, ep, q)
	wd.disarm()
	if err != nil {
		return desc, nil, err
	}
	defer resp.Body.Close()
	ev.Status, ev.Host, ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	if resp.StatusCode != http.StatusOK {
		return desc, nil, statusError(resp.Response, nil)
	}
	raw, err = readAll(wd.reader(resp.Body), resp.ContentLength, maxManifestSize)
	if err != nil {
		return desc, nil, err
	}

	desc.Size = int64(len(raw))
	desc.MediaType = manifestMediaType(resp.Header.Get("Content-Type"), raw)
	switch {
	case want != "":
		desc.Digest = want
	case resp.Header.Get("Docker-Content-Digest") != "":
		desc.Digest, err = digest.Parse(resp.Header.Get("Docker-Content-Digest"))
		if err != nil {
			desc.Digest = digest.FromBytes(raw)
		}
	default:
		desc.Digest = digest.FromBytes(raw)
	}
	if err := verifyBytes(raw, desc.Digest, size); err != nil {
		e := &Error{Err: err, class: errdefs.ErrDataLoss, retry: true}
		return desc, nil, e
	}
	return desc, raw, nil
}

// fetchBytes fetches a small blob (a config) whole, verified.
func (r *Registry) fetchBytes(ctx context.Context, spec refSpec, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	if desc.Size > limit {
		return nil, &Error{Op: "fetch", Repo: spec.name(), Ref: desc.Digest.String(),
			Err: fmt.Errorf("blob of %d bytes exceeds the limit of %d", desc.Size, limit), class: errdefs.ErrOutOfRange}
	}
	rc, err := r.Fetch(ctx, spec.String(), desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := readAll(rc, -1, limit)
	if err != nil {
		return nil, asError(err).with("fetch", "", spec.name(), desc.Digest.String(), "")
	}
	return b, nil
}

// verifyBytes checks b against a digest and, if size >= 0, a size.
func verifyBytes(b []byte, d digest.Digest, size int64) error {
	if size >= 0 && int64(len(b)) != size {
		return fmt.Errorf("got %d bytes, descriptor says %d", len(b), size)
	}
	if !d.Algorithm().Available() {
		return fmt.Errorf("unsupported digest algorithm %q", d.Algorithm())
	}
	if got := d.Algorithm().FromBytes(b); got != d {
		return fmt.Errorf("content has digest %s, expected %s", got, d)
	}
	return nil
}

// selectManifest picks the best manifest of idx for the matcher.
func selectManifest(idx ocispec.Index, m platforms.MatchComparer) (ocispec.Descriptor, error) {
	var (
		best      *ocispec.Descriptor
		available []string
	)
	for i := range idx.Manifests {
		d := &idx.Manifests[i]
		if d.Platform == nil {
			// An index entry without a platform (e.g. a nested index)
			// is a candidate only when it is the only entry.
			if len(idx.Manifests) == 1 {
				best = d
			}
			continue
		}
		available = append(available, platforms.Format(*d.Platform))
		if !m.Match(*d.Platform) {
			continue
		}
		if best == nil || best.Platform == nil || m.Less(*d.Platform, *best.Platform) {
			best = d
		}
	}
	if best == nil {
		slices.Sort(available)
		available = slices.Compact(available)
		return ocispec.Descriptor{}, fmt.Errorf("no manifest for the requested platform in index (has: %s)", strings.Join(available, ", "))
	}
	return *best, nil
}

// manifestMediaType decides the media type of a manifest document: its own
// mediaType field, else a known Content-Type, else its shape.
func manifestMediaType(contentType string, raw []byte) string {
	var probe struct {
		SchemaVersion int             `json:"schemaVersion"`
		MediaType     string          `json:"mediaType"`
		Manifests     json.RawMessage `json:"manifests"`
		Config        json.RawMessage `json:"config"`
		FSLayers      json.RawMessage `json:"fsLayers"`
	}
	_ = json.Unmarshal(raw, &probe)
	if probe.MediaType != "" {
		return probe.MediaType
	}
	if ct, _, err := mime.ParseMediaType(contentType); err == nil && (isIndexType(ct) || isManifestType(ct)) {
		return ct
	}
	switch {
	case probe.Manifests != nil:
		return ocispec.MediaTypeImageIndex
	case probe.Config != nil:
		return ocispec.MediaTypeImageManifest
	case probe.FSLayers != nil || probe.SchemaVersion == 1:
		return mediaTypeDockerSchema1
	}
	if ct, _, err := mime.ParseMediaType(contentType); err == nil {
		return ct
	}
	return contentType
}

func isIndexType(mt string) bool {
	return mt == ocispec.MediaTypeImageIndex || mt == mediaTypeDockerManifestList
}

func isManifestType(mt string) bool {
	return mt == ocispec.MediaTypeImageManifest || mt == mediaTypeDockerManifest
}

func badDocument(op string, spec refSpec, desc ocispec.Descriptor, err error) error {
	return &Error{Op: op, Repo: spec.name(), Ref: desc.Digest.String(),
		Err: fmt.Errorf("malformed %s: %w", desc.MediaType, err), class: errdefs.ErrInvalidArgument}
}
