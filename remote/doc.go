// Package remote is lazypull's window onto OCI registries: it resolves image
// references to manifests, streams whole blobs, reads byte ranges of layer
// blobs on demand for the FUSE layer, and pushes converted images.
//
// # Design
//
// A [Registry] is long-lived and safe for concurrent use. It keeps, per
// registry host named in a reference, the list of endpoints containerd's
// hosts.toml directory describes (mirrors first, then the server; see
// [Options.HostsDir]). Each endpoint has one tuned HTTP transport (keep-alive,
// many idle connections per host, HTTP/2 where the server offers it) and
// a containerd docker.Authorizer, which answers WWW-Authenticate challenges
// (anonymous or credentialed bearer tokens, basic auth) and caches tokens
// until they expire. Credentials come from the docker config.json users
// already have, including credential stores and helpers, or from a
// [CredentialSource] ([Options.Keychain]; package keychain has the one for
// Kubernetes nodes), which gets one authorizer per repository. A 401 (or a
// 403 to a request that carried credentials) is retried once with a fresh
// authorizer after the source is told to refresh, so rotated passwords and
// revoked tokens do not break long-lived lazy mounts.
//
// Everything above the authorizer is ours, because lazy range reads need
// things an image puller does not:
//
//   - A [Blob] reads arbitrary byte ranges (HTTP Range). It accepts a 206 with
//     one range, a 206 multipart/byteranges answer, and a 200 carrying the
//     whole blob from servers that ignore Range (see [Options.MaxWholeBlob]).
//   - When the registry redirects a blob GET to object storage, the signed
//     URL is remembered per blob and later ranges go straight there, without
//     the registry's Authorization header. When that URL stops working
//     (expired signature, 403, 404, network error) it is dropped and the
//     registry asked again.
//   - Concurrent reads of the same range of the same blob share one HTTP
//     request; a caller that gives up does not cancel the read for the others.
//   - [Blob.ReadRanges] coalesces nearby ranges (gap up to
//     [Options.RangeGap]) into one request and fetches the groups in parallel.
//
// # Failures
//
// Every HTTP attempt has a deadline for the response headers and for each
// body read that makes no progress ([Options.RequestTimeout]). Attempts that
// fail with 408, 429, 5xx, connection errors, stalls or truncated bodies are
// retried with exponential backoff and jitter, honouring Retry-After
// ([Options.Retries]). Mirrors that fail are skipped after one attempt; the
// last endpoint gets the full retry budget. Context cancellation stops
// everything promptly.
//
// Errors are [*Error] values naming the operation, host, repository, digest or
// tag, byte range, HTTP status and the registry's own error code and message.
// They match the github.com/containerd/errdefs classes: ErrNotFound (404),
// ErrUnauthenticated (401), ErrPermissionDenied (403), ErrUnavailable
// (unreachable or 5xx after retries), ErrResourceExhausted (429 after
// retries), ErrDataLoss (digest mismatch), ErrNotImplemented (range reads
// impossible), ErrInvalidArgument (bad input).
//
// # Verification
//
// Manifests, configs and whole blobs returned by [Registry.Fetch] are checked
// against their digest. Byte ranges cannot be checked here (only the whole
// blob has a digest); the caller verifies them against the chunk digests of
// the layer's table of contents.
//
// # Observability
//
// [Options.OnFetch] receives a [FetchEvent] per HTTP exchange (bytes, status,
// latency, redirect, error), which is enough for Prometheus counters and
// histograms. Logging goes through github.com/containerd/log with the
// caller's context.
//
// The subpackage remotetest runs the real distribution registry in-process,
// with fault injection, for tests here and in other packages.
package remote
