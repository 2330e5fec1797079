package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// pushEndpoint is the first host allowed to push for spec's domain.
func (r *Registry) pushEndpoint(spec refSpec) (*endpoint, error) {
	eps, err := r.endpoints(spec, docker.HostCapabilityPush)
	if err != nil {
		return nil, err
	}
	return eps[0], nil
}

// BlobExists reports whether the repository ref names has the blob desc
// describes, asking the first host with the push capability (with a
// pull+push token, so that a following push needs no new token).
func (r *Registry) BlobExists(ctx context.Context, ref string, desc ocispec.Descriptor) (bool, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return false, err
	}
	if err := desc.Digest.Validate(); err != nil {
		return false, &Error{Op: "check blob", Repo: spec.name(), Err: fmt.Errorf("descriptor digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	ep, err := r.pushEndpoint(spec)
	if err != nil {
		return false, err
	}
	var exists bool
	err = r.retry(ctx, true, func(attempt int) error {
		var err error
		exists, err = r.headBlob(ctx, ep, spec, desc, attempt)
		return err
	})
	return exists, err
}

func (r *Registry) headBlob(ctx context.Context, ep *endpoint, spec refSpec, desc ocispec.Descriptor, attempt int) (exists bool, err error) {
	actx, wd := r.attempt(ctx)
	defer wd.done()
	t0 := time.Now()
	ev := FetchEvent{Op: "head", Host: ep.host.Host, Repo: spec.name(), Digest: desc.Digest, Length: -1, Attempt: attempt}
	defer func() {
		if err != nil {
			err = transportError(ctx, actx, err, r.opts.RequestTimeout).with("check blob", ep.host.Host, spec.name(), desc.Digest.String(), "")
		}
		ev.Err, ev.Duration = err, time.Since(t0)
		r.emit(ev)
	}()
	q := &request{method: http.MethodHead, url: ep.url(spec.repo, "blobs", desc.Digest.String()), repo: spec.repo, push: true}
	wd.arm()
	resp, err := r.send(actx, ep, q)
	wd.disarm()
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	ev.Status, ev.Host, ev.Redirected = resp.StatusCode, resp.url.Host, resp.redirected
	switch resp.StatusCode {
	case http.StatusOK:
		if desc.Size > 0 && resp.ContentLength >= 0 && resp.ContentLength != desc.Size {
			return false, &Error{Err: fmt.Errorf("registry has %d bytes, descriptor says %d", resp.ContentLength, desc.Size), class: errdefs.ErrFailedPrecondition}
		}
		return true, nil
	case http.StatusNotFound:
		return false, nil
	}
	return false, statusError(resp.Response, []byte{})
}

// PushBlob uploads the blob desc describes, reading exactly desc.Size
// bytes of content, to the repository ref names. It does nothing (and
// reads nothing) when the registry already has the blob. The content is
// hashed as it is sent; the upload is committed only under desc.Digest, so
// the registry refuses content that does not match, and the error then
// matches errdefs.ErrDataLoss.
//
// A failed upload is retried only when content is an io.Seeker (it is
// rewound); otherwise the caller must retry with fresh content.
func (r *Registry) PushBlob(ctx context.Context, ref string, desc ocispec.Descriptor, content io.Reader) error {
	spec, err := parseRef(ref)
	if err != nil {
		return err
	}
	if err := desc.Digest.Validate(); err != nil {
		return &Error{Op: "push blob", Repo: spec.name(), Err: fmt.Errorf("descriptor digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	if desc.Size < 0 {
		return &Error{Op: "push blob", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("negative size %d", desc.Size), class: errdefs.ErrInvalidArgument}
	}
	ep, err := r.pushEndpoint(spec)
	if err != nil {
		return err
	}
	if exists, err := r.BlobExists(ctx, ref, desc); err != nil {
		return err
	} else if exists {
		return nil
	}

	seeker, _ := content.(io.Seeker)
	var start int64
	if seeker != nil {
		if start, err = seeker.Seek(0, io.SeekCurrent); err != nil {
			seeker = nil
		}
	}
	return r.retry(ctx, true, func(attempt int) error {
		if attempt > 1 {
			if _, err := seeker.Seek(start, io.SeekStart); err != nil {
				return &Error{Op: "push blob", Repo: spec.name(), Ref: desc.Digest.String(), Err: fmt.Errorf("rewind content: %w", err)}
			}
		}
		loc, err := r.startUpload(ctx, ep, spec, desc, attempt)
		if err != nil {
			return err
		}
		err = r.putBlob(ctx, ep, spec, desc, loc, content, attempt)
		if err != nil {
			r.cancelUpload(ctx, ep, spec, loc)
			if e := asError(err); e.retry && seeker == nil {
				e.retry = false
				e.Err = errors.Join(e.Err, errors.New("content cannot be rewound to retry"))
			}
		}
		return err
	})
}

// startUpload is POST /v2/<repo>/blobs/uploads/, returning the upload URL.
func (r *Registry) startUpload(ctx context.Context, ep *endpoint, spec refSpec, desc ocispec.Descriptor, attempt int) (loc *url.URL, err error) {
	actx, wd := r.attempt(ctx)
	defer wd.done()
	t0 := time.Now()
	ev := FetchEvent{Op: "upload", Host: ep.host.Host, Repo: spec.name(), Digest: desc.Digest, Length: -1, Attempt: attempt}
	defer func() {
		if err != nil {
			err = transportError(ctx, actx, err, r.opts.RequestTimeout).with("start upload", ep.host.Host, spec.name(), desc.Digest.String(), "")
		}
		ev.Err, ev.Duration = err, time.Since(t0)
		r.emit(ev)
	}()
	q := &request{method: http.MethodPost, url: ep.url(spec.repo, "blobs/uploads", ""), body: []byte{}, repo: spec.repo, push: true}
	wd.arm()
	resp, err := r.send(actx, ep, q)
	wd.disarm()
	if err != nil {
		return nil, err
	}
	defer drainClose(resp.Body)
	ev.Status = resp.StatusCode
	if resp.StatusCode != http.StatusAccepted {
		return nil, statusError(resp.Response, nil)
	}
	loc, err = resp.Location()
	if err != nil {
		return nil, &Error{Err: fmt.Errorf("upload started without a usable Location: %w", err)}
	}
	return loc, nil
}

// putBlob sends the content in one PUT to the upload URL, committing it
// under desc.Digest.
func (r *Registry) putBlob(ctx context.Context, ep *endpoint, spec refSpec, desc ocispec.Descriptor, loc *url.URL, content io.Reader, attempt int) (err error) {
	actx, wd := r.attempt(ctx)
	defer wd.done()
	t0 := time.Now()
	vr := &uploadBody{dg: desc.Digest.Algorithm().Digester(), wd: wd, closed: make(chan struct{})}
	vr.r = io.TeeReader(io.LimitReader(content, desc.Size), io.MultiWriter(vr.dg.Hash(), &vr.n))
	ev := FetchEvent{Op: "upload", Host: loc.Host, Repo: spec.name(), Digest: desc.Digest, Length: desc.Size, Attempt: attempt}
	defer func() {
		if err != nil {
			err = transportError(ctx, actx, err, r.opts.RequestTimeout).with("push blob", loc.Host, spec.name(), desc.Digest.String(), "")
		}
		ev.Bytes, ev.Err, ev.Duration = int64(vr.n), err, time.Since(t0)
		r.emit(ev)
	}()

	u := *loc
	qs := u.Query()
	qs.Set("digest", desc.Digest.String())
	u.RawQuery = qs.Encode()
	q := &request{method: http.MethodPut, url: &u, header: http.Header{"Content-Type": {"application/octet-stream"}},
		bodyR: vr, size: desc.Size, repo: spec.repo, push: true}
	if desc.Size == 0 {
		// An empty body must not look like one of unknown length.
		q.bodyR, q.body = nil, []byte{}
		vr.eof = true
	}
	pep := ep
	if u.Host != ep.host.Host {
		// Upload elsewhere (some registries hand off uploads): no registry credentials.
		pep = &endpoint{host: docker.RegistryHost{Host: u.Host, Scheme: u.Scheme}, client: ep.client, auths: map[string]*authorizer{}}
	}
	wd.arm()
	resp, err := r.send(actx, pep, q)
	wd.disarm()
	var (
		status int
		header http.Header
		serr   *Error
	)
	if err == nil {
		status, header = resp.StatusCode, resp.Header
		if status != http.StatusCreated {
			serr = statusError(resp.Response, nil)
		}
		drainClose(resp.Body)
	}
	// The transport may still be sending the body (a server can answer
	// before reading it all): abort the attempt and wait until the
	// transport lets go of the body, before looking at it or rewinding
	// the caller's content.
	wd.done()
	if q.bodyR != nil {
		select {
		case <-vr.closed:
		case <-time.After(time.Minute):
			return &Error{Err: errors.New("HTTP transport did not release the upload body")}
		}
	}
	ev.Status = status
	if int64(vr.n) < desc.Size && vr.eof {
		return &Error{Err: fmt.Errorf("content ended after %d bytes, descriptor says %d", vr.n, desc.Size), class: errdefs.ErrDataLoss}
	}
	if int64(vr.n) == desc.Size {
		if got := vr.dg.Digest(); got != desc.Digest {
			return &Error{Err: fmt.Errorf("content has digest %s, descriptor says %s", got, desc.Digest), class: errdefs.ErrDataLoss}
		}
	}
	if err != nil {
		return err
	}
	if serr != nil {
		if serr.Code == "DIGEST_INVALID" || serr.Code == "SIZE_INVALID" {
			serr.class = errdefs.ErrDataLoss
		}
		return serr
	}
	if got := header.Get("Docker-Content-Digest"); got != "" && got != desc.Digest.String() {
		return &Error{Err: fmt.Errorf("registry stored the blob as %s", got), class: errdefs.ErrDataLoss}
	}
	return nil
}

// cancelUpload deletes an unfinished upload, best effort.
func (r *Registry) cancelUpload(ctx context.Context, ep *endpoint, spec refSpec, loc *url.URL) {
	if loc == nil || loc.Host != ep.host.Host || ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := r.send(ctx, ep, &request{method: http.MethodDelete, url: loc, repo: spec.repo, push: true})
	if err == nil {
		drainClose(resp.Body)
	}
}

// uploadBody is the body of a blob upload: r tees what the transport reads
// into a digester and a byte count. It tells the watchdog that the upload
// makes progress, and the HTTP transport closes it when it is done with it.
type uploadBody struct {
	r      io.Reader
	dg     digest.Digester
	n      byteCount
	wd     *watchdog
	eof    bool
	once   sync.Once
	closed chan struct{}
}

// Close records that the transport is done with the body.
func (v *uploadBody) Close() error {
	v.once.Do(func() { close(v.closed) })
	return nil
}

func (v *uploadBody) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	if errors.Is(err, io.EOF) {
		v.eof = true
	}
	v.wd.arm()
	return n, err
}

// PushManifest uploads a manifest or index, raw exactly as given (its
// digest must be desc.Digest). It is stored under ref's tag, or under its
// digest when ref has a digest and no tag ("repo@sha256:..."); a ref with
// both must name desc.Digest. The blobs and manifests it refers to must be
// pushed first.
func (r *Registry) PushManifest(ctx context.Context, ref string, desc ocispec.Descriptor, raw []byte) error {
	_, err := r.pushManifest(ctx, ref, desc, raw)
	return err
}

// pushManifest is PushManifest, returning the headers of the registry's
// answer (OCI-Subject tells that it indexed the manifest's subject).
func (r *Registry) pushManifest(ctx context.Context, ref string, desc ocispec.Descriptor, raw []byte) (http.Header, error) {
	var header http.Header
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	if err := desc.Digest.Validate(); err != nil {
		return nil, &Error{Op: "push manifest", Repo: spec.name(), Err: fmt.Errorf("descriptor digest: %w", err), class: errdefs.ErrInvalidArgument}
	}
	size := desc.Size
	if size == 0 {
		size = -1
	}
	if err := verifyBytes(raw, desc.Digest, size); err != nil {
		return nil, &Error{Op: "push manifest", Repo: spec.name(), Ref: desc.Digest.String(), Err: err, class: errdefs.ErrInvalidArgument}
	}
	if spec.dgst != "" && spec.dgst != desc.Digest {
		return nil, &Error{Op: "push manifest", Repo: spec.name(), Ref: desc.Digest.String(),
			Err: fmt.Errorf("reference names digest %s", spec.dgst), class: errdefs.ErrInvalidArgument}
	}
	object := spec.tag
	if object == "" {
		object = desc.Digest.String()
	}
	mediaType := desc.MediaType
	if mediaType == "" {
		mediaType = manifestMediaType("", raw)
	}
	ep, err := r.pushEndpoint(spec)
	if err != nil {
		return nil, err
	}
	err = r.retry(ctx, true, func(attempt int) (err error) {
		actx, wd := r.attempt(ctx)
		defer wd.done()
		t0 := time.Now()
		ev := FetchEvent{Op: "push-manifest", Host: ep.host.Host, Repo: spec.name(), Digest: desc.Digest, Length: -1, Attempt: attempt}
		defer func() {
			if err != nil {
				err = transportError(ctx, actx, err, r.opts.RequestTimeout).with("push manifest", ep.host.Host, spec.name(), object, "")
			}
			ev.Err, ev.Duration, ev.Bytes = err, time.Since(t0), int64(len(raw))
			r.emit(ev)
		}()
		q := &request{method: http.MethodPut, url: ep.url(spec.repo, "manifests", object),
			header: http.Header{"Content-Type": {mediaType}}, body: raw, repo: spec.repo, push: true}
		wd.arm()
		resp, err := r.send(actx, ep, q)
		wd.disarm()
		if err != nil {
			return err
		}
		defer drainClose(resp.Body)
		ev.Status = resp.StatusCode
		if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
			return statusError(resp.Response, nil)
		}
		if got := resp.Header.Get("Docker-Content-Digest"); got != "" && got != desc.Digest.String() {
			return &Error{Err: fmt.Errorf("registry stored the manifest as %s", got), class: errdefs.ErrDataLoss}
		}
		header = resp.Header
		return nil
	})
	return header, err
}
