package service

import (
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazypull/lazypull/cache"
)

// metrics exports fetch, cache and mount activity to Prometheus. It
// implements fs.Observer.
type metrics struct {
	fetchBytes    *prometheus.CounterVec
	fetchRequests *prometheus.CounterVec
	fetchLatency  *prometheus.HistogramVec
	cacheLookups  *prometheus.CounterVec
	verifyFailed  prometheus.Counter
	fuseOps       *prometheus.HistogramVec
	verifications *prometheus.CounterVec
	verifyLatency prometheus.Histogram
	mounts        func() int
}

func newMetrics(reg prometheus.Registerer, store *cache.Store) *metrics {
	m := &metrics{
		fetchBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazypull", Name: "fetch_bytes_total",
			Help: "Compressed bytes fetched from registries, by kind (foreground, background).",
		}, []string{"kind"}),
		fetchRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazypull", Name: "fetch_requests_total",
			Help: "Range requests made to registries, by kind and result (ok, error).",
		}, []string{"kind", "result"}),
		fetchLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "lazypull", Name: "fetch_duration_seconds",
			Help:    "Duration of range requests, retries included.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}, []string{"kind"}),
		cacheLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazypull", Name: "chunk_lookups_total",
			Help: "Chunk lookups by reads, by result (hit, miss).",
		}, []string{"result"}),
		verifyFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "lazypull", Name: "verify_failures_total",
			Help: "Chunks that failed verification against their TOC digest (never served).",
		}),
	}
	m.fuseOps = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "lazypull", Name: "fuse_operation_duration_seconds",
		Help:    "Duration of FUSE operations served, by operation (lookup, getattr, open, read, ...).",
		Buckets: prometheus.ExponentialBuckets(0.00001, 4, 10),
	}, []string{"op"})
	m.verifications = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "lazypull", Name: "layer_verifications_total",
		Help: "Whole-layer verifications finished, by result (ok; failed: the layer was failed closed).",
	}, []string{"result"})
	m.verifyLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "lazypull", Name: "layer_verification_seconds",
		Help:    "Time from a layer's mount to the end of its verification: how long it was served unverified.",
		Buckets: prometheus.ExponentialBuckets(0.25, 2, 14),
	})
	reg.MustRegister(m.fetchBytes, m.fetchRequests, m.fetchLatency, m.cacheLookups, m.verifyFailed, m.fuseOps, m.verifications, m.verifyLatency)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "lazypull", Name: "mounted_layers",
		Help: "Layers currently mounted lazily.",
	}, func() float64 {
		if m.mounts == nil {
			return 0
		}
		return float64(m.mounts())
	}))
	for _, g := range []struct {
		name, help string
		fn         func(cache.Stats) float64
	}{
		{"cache_disk_bytes", "Bytes held by the disk chunk cache.", func(s cache.Stats) float64 { return float64(s.Disk.Bytes) }},
		{"cache_memory_bytes", "Bytes held by the memory chunk cache.", func(s cache.Stats) float64 { return float64(s.Memory.Bytes) }},
		{"cache_disk_entries", "Chunks held by the disk cache.", func(s cache.Stats) float64 { return float64(s.Disk.Entries) }},
		{"cache_evictions", "Chunks evicted from the disk cache since start.", func(s cache.Stats) float64 { return float64(s.Disk.Evictions) }},
		{"cache_corrupt_entries", "Cache entries found corrupt and discarded since start.", func(s cache.Stats) float64 { return float64(s.Corrupt) }},
	} {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "lazypull", Name: g.name, Help: g.help},
			func() float64 { return g.fn(store.Stats()) }))
	}
	return m
}

func kind(background bool) string {
	if background {
		return "background"
	}
	return "foreground"
}

// Fetched implements fs.Observer.
func (m *metrics) Fetched(_ digest.Digest, bytes int64, d time.Duration, background bool, err error) {
	k := kind(background)
	result := "ok"
	if err != nil {
		result = "error"
	} else {
		m.fetchBytes.WithLabelValues(k).Add(float64(bytes))
	}
	m.fetchRequests.WithLabelValues(k, result).Inc()
	m.fetchLatency.WithLabelValues(k).Observe(d.Seconds())
}

// CacheHit implements fs.Observer.
func (m *metrics) CacheHit(digest.Digest) { m.cacheLookups.WithLabelValues("hit").Inc() }

// CacheMiss implements fs.Observer.
func (m *metrics) CacheMiss(digest.Digest) { m.cacheLookups.WithLabelValues("miss").Inc() }

// VerifyFailed implements fs.Observer.
func (m *metrics) VerifyFailed(digest.Digest) { m.verifyFailed.Inc() }

// FuseOp records one FUSE operation (fs.MountOptions.OnOp).
func (m *metrics) FuseOp(op string, d time.Duration) {
	m.fuseOps.WithLabelValues(op).Observe(d.Seconds())
}

// verified records a finished layer verification; m may be nil.
func (m *metrics) verified(result string, sinceMount time.Duration) {
	if m == nil {
		return
	}
	m.verifications.WithLabelValues(result).Inc()
	m.verifyLatency.Observe(sinceMount.Seconds())
}
