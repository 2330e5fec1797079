// Referrers: artifacts that refer to an image manifest through their
// `subject` (OCI image-spec 1.1, distribution-spec 1.1), found with the
// referrers API or, on registries without it, the referrers tag schema.

package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// maxReferrers bounds how many referrers a lookup returns: the list comes
// from the registry, and anyone with push rights can add to it.
const maxReferrers = 1024

// Artifact is an OCI artifact to push: an image manifest with its own
// artifactType, the empty config, and one layer holding Data.
type Artifact struct {
	// ArtifactType is the manifest's artifactType.
	ArtifactType string
	// MediaType is the media type of the layer holding Data.
	MediaType string
	// Data is the artifact's content.
	Data []byte
	// Subject is the manifest the artifact refers to.
	Subject ocispec.Descriptor
	// Annotations go on the manifest (and on its entry in a referrers
	// list). org.opencontainers.image.created is set when missing.
	Annotations map[string]string
}

// ReferrersTag is the tag the referrers tag schema keeps the referrers of
// subject under: "<algorithm>-<hex>".
func ReferrersTag(subject digest.Digest) string {
	return subject.Algorithm().String() + "-" + subject.Encoded()
}

// PushReferrer pushes a as an artifact into ref's repository (the tag or
// digest of ref is not used) and makes it a referrer of a.Subject: a
// registry with the referrers API says so (OCI-Subject header) and lists
// it itself; on others the index at the referrers tag (ReferrersTag) is
// read, extended and pushed again. Two nodes updating that index at the
// same time can lose one entry (the tag schema has no transaction); the
// artifact itself is pushed either way. It returns the artifact
// manifest's descriptor.
func (r *Registry) PushReferrer(ctx context.Context, ref string, a Artifact) (ocispec.Descriptor, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := a.Subject.Digest.Validate(); err != nil {
		return ocispec.Descriptor{}, &Error{Op: "push referrer", Repo: spec.name(), Err: fmt.Errorf("subject digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	if a.ArtifactType == "" || a.MediaType == "" {
		return ocispec.Descriptor{}, &Error{Op: "push referrer", Repo: spec.name(), Err: fmt.Errorf("artifact without artifactType or media type"), class: errdefs.ErrInvalidArgument}
	}
	repo := refSpec{domain: spec.domain, repo: spec.repo}
	empty := ocispec.DescriptorEmptyJSON
	if err := r.PushBlob(ctx, repo.String(), empty, bytes.NewReader(empty.Data)); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("pushing the empty config: %w", err)
	}
	layer := ocispec.Descriptor{MediaType: a.MediaType, Digest: digest.FromBytes(a.Data), Size: int64(len(a.Data))}
	if err := r.PushBlob(ctx, repo.String(), layer, bytes.NewReader(a.Data)); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("pushing the artifact blob: %w", err)
	}
	ann := map[string]string{}
	for k, v := range a.Annotations {
		ann[k] = v
	}
	if ann[ocispec.AnnotationCreated] == "" {
		ann[ocispec.AnnotationCreated] = time.Now().UTC().Format(time.RFC3339Nano)
	}
	subject := ocispec.Descriptor{MediaType: a.Subject.MediaType, Digest: a.Subject.Digest, Size: a.Subject.Size}
	if subject.MediaType == "" {
		subject.MediaType = ocispec.MediaTypeImageManifest
	}
	m := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: a.ArtifactType,
		Config:       empty,
		Layers:       []ocispec.Descriptor{layer},
		Subject:      &subject,
		Annotations:  ann,
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("encoding the artifact manifest: %w", err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(raw), Size: int64(len(raw))}
	header, err := r.pushManifest(ctx, refSpec{domain: spec.domain, repo: spec.repo, dgst: desc.Digest}.String(), desc, raw)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("pushing the artifact manifest: %w", err)
	}
	if header.Get("OCI-Subject") == subject.Digest.String() {
		return desc, nil // the registry lists it
	}
	entry := desc
	entry.ArtifactType = a.ArtifactType
	entry.Annotations = ann
	if err := r.addToReferrersTag(ctx, spec, subject.Digest, entry); err != nil {
		return desc, fmt.Errorf("adding the artifact to the referrers tag %s: %w", ReferrersTag(subject.Digest), err)
	}
	return desc, nil
}

// addToReferrersTag adds entry to the index at subject's referrers tag.
func (r *Registry) addToReferrersTag(ctx context.Context, spec refSpec, subject digest.Digest, entry ocispec.Descriptor) error {
	tagged := refSpec{domain: spec.domain, repo: spec.repo, tag: ReferrersTag(subject)}
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	_, raw, err := r.fetchTop(ctx, tagged)
	switch {
	case err == nil:
		var cur ocispec.Index
		if jerr := json.Unmarshal(raw, &cur); jerr != nil {
			return &Error{Op: "read referrers tag", Repo: spec.name(), Ref: tagged.tag, Err: jerr, class: errdefs.ErrDataLoss}
		}
		for _, d := range cur.Manifests {
			if d.Digest == entry.Digest {
				return nil // listed already
			}
		}
		idx.Manifests = cur.Manifests
	case errdefs.IsNotFound(err):
	default:
		return err
	}
	idx.Manifests = append(idx.Manifests, entry)
	if n := len(idx.Manifests); n > maxReferrers {
		// Keep the newest: entries are appended.
		idx.Manifests = idx.Manifests[n-maxReferrers:]
	}
	out, err := json.Marshal(idx)
	if err != nil {
		return fmt.Errorf("encoding the referrers index: %w", err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(out), Size: int64(len(out))}
	_, err = r.pushManifest(ctx, tagged.String(), desc, out)
	return err
}

// Referrers lists the manifests in ref's repository whose subject is
// subject, of the given artifactType ("" for any): from the referrers API
// (GET /v2/<repo>/referrers/<digest>), or, when the registry answers 404
// there, from the index at the referrers tag. No referrers is an empty
// list, not an error. Only the first page of a paginated answer is read;
// at most 1024 entries are returned, and entries that are not valid
// manifest descriptors are left out.
func (r *Registry) Referrers(ctx context.Context, ref string, subject digest.Digest, artifactType string) ([]ocispec.Descriptor, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	if err := subject.Validate(); err != nil {
		return nil, &Error{Op: "referrers", Repo: spec.name(), Err: fmt.Errorf("subject digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	eps, err := r.endpoints(spec, docker.HostCapabilityPull)
	if err != nil {
		return nil, err
	}
	var raw []byte
	err = r.onEndpoints(ctx, eps, func(ep *endpoint, last bool) error {
		return r.retry(ctx, last, func(attempt int) error {
			var err error
			raw, err = r.getReferrers(ctx, ep, spec, subject, artifactType, attempt)
			return err
		})
	})
	if errdefs.IsNotFound(err) {
		// No referrers API: the tag schema.
		_, raw, err = r.fetchTop(ctx, refSpec{domain: spec.domain, repo: spec.repo, tag: ReferrersTag(subject)})
		if errdefs.IsNotFound(err) {
			return nil, nil
		}
	}
	if err != nil {
		return nil, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, &Error{Op: "referrers", Repo: spec.name(), Ref: subject.String(), Err: fmt.Errorf("parsing the referrers index: %w", err), class: errdefs.ErrDataLoss}
	}
	var out []ocispec.Descriptor
	for _, d := range idx.Manifests {
		if len(out) == maxReferrers {
			break
		}
		if d.Digest.Validate() != nil || d.Size <= 0 || d.Size > maxManifestSize {
			continue
		}
		if artifactType != "" && d.ArtifactType != artifactType {
			continue
		}
		out = append(out, d)
	}
	return out, nil
}

// getReferrers is one attempt at the referrers API.
func (r *Registry) getReferrers(ctx context.Context, ep *endpoint, spec refSpec, subject digest.Digest, artifactType string, attempt int) (raw []byte, err error) {
	actx, wd := r.attempt(ctx)
	defer wd.done()
	start := time.Now()
	ev := FetchEvent{Op: "referrers", Host: ep.host.Host, Repo: spec.name(), Digest: subject, Length: -1, Attempt: attempt}
	defer func() {
		ev.Duration, ev.Bytes = time.Since(start), int64(len(raw))
		if err != nil {
			err = transportError(ctx, actx, err, r.opts.RequestTimeout).with("referrers", ep.host.Host, spec.name(), subject.String(), "")
			ev.Err = err
		}
		r.emit(ev)
	}()
	u := ep.url(spec.repo, "referrers", subject.String())
	if artifactType != "" {
		q := u.Query()
		q.Set("artifactType", artifactType)
		u.RawQuery = q.Encode()
	}
	q := &request{method: http.MethodGet, url: u, header: http.Header{"Accept": {ocispec.MediaTypeImageIndex}}, repo: spec.repo}
	wd.arm()
	resp, err := r.send(actx, ep, q)
	wd.disarm()
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	ev.Status, ev.Host, ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	if resp.StatusCode != http.StatusOK {
		return nil, statusError(resp.Response, nil)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, ocispec.MediaTypeImageIndex) {
		// Not the referrers API (a front page, a proxy's answer): as if
		// the registry did not have it.
		return nil, &Error{Status: resp.StatusCode, Err: fmt.Errorf("referrers answer of type %q", ct), class: errdefs.ErrNotFound}
	}
	return readAll(wd.reader(resp.Body), resp.ContentLength, maxManifestSize)
}

// FetchArtifact fetches the artifact manifest desc in ref's repository
// and its layer of the given media type, checking the manifest's
// artifactType and that the layer is at most limit bytes. The content is
// verified against its digest; what it says is the caller's to check.
func (r *Registry) FetchArtifact(ctx context.Context, ref string, desc ocispec.Descriptor, artifactType, mediaType string, limit int64) ([]byte, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	spec = refSpec{domain: spec.domain, repo: spec.repo, dgst: desc.Digest}
	if desc.Size <= 0 || desc.Size > maxManifestSize {
		return nil, &Error{Op: "fetch artifact", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("manifest size %d out of range", desc.Size), class: errdefs.ErrOutOfRange}
	}
	raw, err := r.fetchManifest(ctx, spec, desc)
	if err != nil {
		return nil, err
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, &Error{Op: "fetch artifact", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("parsing the manifest: %w", err), class: errdefs.ErrDataLoss}
	}
	at := m.ArtifactType
	if at == "" {
		at = m.Config.MediaType
	}
	if at != artifactType {
		return nil, &Error{Op: "fetch artifact", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("artifact type %q, want %q", at, artifactType), class: errdefs.ErrInvalidArgument}
	}
	var layer *ocispec.Descriptor
	for i := range m.Layers {
		if m.Layers[i].MediaType == mediaType {
			layer = &m.Layers[i]
			break
		}
	}
	if layer == nil {
		return nil, &Error{Op: "fetch artifact", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("no layer of type %q", mediaType), class: errdefs.ErrNotFound}
	}
	if err := layer.Digest.Validate(); err != nil || layer.Size < 0 {
		return nil, &Error{Op: "fetch artifact", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("bad layer descriptor: %v", err), class: errdefs.ErrDataLoss}
	}
	b, err := r.fetchBytes(ctx, spec, *layer, limit)
	if err != nil {
		return nil, err
	}
	if err := verifyBytes(b, layer.Digest, layer.Size); err != nil {
		return nil, &Error{Op: "fetch artifact", Repo: spec.name(), Ref: layer.Digest.String(), Err: err, class: errdefs.ErrDataLoss}
	}
	return b, nil
}
