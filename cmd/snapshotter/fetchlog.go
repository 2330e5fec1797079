package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fusemanager"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/service"
)

// maxFetchLog bounds the fetch log: the oldest records are dropped beyond
// it (a record is about 200 bytes: 10 MB at most).
const maxFetchLog = 50_000

// fetchRecord is one registry request the daemon (or, with the fuse
// manager, the manager) made, as served at /debug/fetches on the daemon's
// metrics address (for `lazypull bench` timelines).
type fetchRecord struct {
	// Start is when the request was sent.
	Start time.Time `json:"start"`
	// Seconds is its duration, to the end of the body or the failure.
	Seconds float64 `json:"seconds"`
	// Op is remote.FetchEvent.Op: "manifest", "blob", "range", "head".
	Op     string        `json:"op"`
	Layer  digest.Digest `json:"layer,omitempty"`
	Offset int64         `json:"offset"`
	Length int64         `json:"length"`
	Bytes  int64         `json:"bytes"`
	Status int           `json:"status"`
	// Attempt is 1 for a first try, 2 for its first retry...
	Attempt int    `json:"attempt"`
	Err     string `json:"error,omitempty"`
	// Kind is "foreground" or "background" for range reads of file
	// content (as fs.Observer was told), "" for the others (a layer's
	// footer and TOC, manifests).
	Kind string `json:"kind,omitempty"`
}

// fetchLog records every registry request with its timing. It is fed by
// remote.Options.OnFetch and classified by the fs.Observer calls that
// follow each content fetch.
type fetchLog struct {
	mu      sync.Mutex
	records []fetchRecord
	dropped int
}

func (l *fetchLog) onFetch(ev remote.FetchEvent) {
	r := fetchRecord{
		Start: time.Now().Add(-ev.Duration), Seconds: ev.Duration.Seconds(),
		Op: ev.Op, Layer: ev.Digest, Offset: ev.Offset, Length: ev.Length, Bytes: ev.Bytes,
		Status: ev.Status, Attempt: ev.Attempt,
	}
	if ev.Err != nil {
		r.Err = ev.Err.Error()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.records) >= maxFetchLog {
		n := copy(l.records, l.records[len(l.records)/2:])
		l.dropped += len(l.records) - n
		l.records = l.records[:n]
	}
	l.records = append(l.records, r)
}

// classify marks the latest unclassified range request of layer for
// length bytes (and its earlier attempts at the same offset) with kind.
// fs.Layer calls the observer right after the read that made them, on the
// same goroutine, so the latest match is the one.
func (l *fetchLog) classify(layer digest.Digest, length int64, kind string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	off := int64(-1)
	for i := len(l.records) - 1; i >= 0 && i >= len(l.records)-4096; i-- {
		r := &l.records[i]
		if r.Op != "range" || r.Layer != layer || r.Kind != "" || r.Length != length {
			continue
		}
		if off >= 0 && r.Offset != off {
			continue
		}
		r.Kind = kind
		off = r.Offset
		if r.Attempt <= 1 {
			return
		}
	}
}

// JSON encodes the log: {"dropped": N, "fetches": [...]}. The fuse
// manager hands it to the daemon this way (fusemanager.Client.Fetches).
func (l *fetchLog) JSON() ([]byte, error) {
	l.mu.Lock()
	out := struct {
		Dropped int           `json:"dropped"`
		Fetches []fetchRecord `json:"fetches"`
	}{l.dropped, append([]fetchRecord(nil), l.records...)}
	l.mu.Unlock()
	b, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encoding the fetch log: %w", err)
	}
	return append(b, '\n'), nil
}

// ServeHTTP writes the log as JSON (see JSON).
func (l *fetchLog) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	b, err := l.JSON()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

// managerFetches serves the fuse manager's fetch log at the daemon's
// /debug/fetches: with the manager, the layers are fetched there.
type managerFetches struct{ c *fusemanager.Client }

// ServeHTTP implements http.Handler.
func (m managerFetches) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	b, err := m.c.Fetches(ctx)
	if err != nil {
		code := http.StatusBadGateway // the manager did not answer
		switch {
		case errdefs.IsNotImplemented(err):
			code = http.StatusNotImplemented
		case errdefs.IsNotFound(err):
			code = http.StatusNotFound
		}
		http.Error(w, err.Error(), code)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

// withFetchLog makes opts keep a fetch log (the layers' registry requests,
// classified by what the layer file system says about each) and returns
// it.
func withFetchLog(opts *service.Options) *fetchLog {
	l := &fetchLog{}
	opts.OnFetch = l.onFetch
	opts.WrapObserver = func(o lfs.Observer) lfs.Observer { return loggingObserver{Observer: o, log: l} }
	return l
}

// loggingObserver passes fs.Observer events on and classifies the fetch
// log's records.
type loggingObserver struct {
	lfs.Observer
	log *fetchLog
}

// Fetched implements fs.Observer.
func (o loggingObserver) Fetched(layer digest.Digest, bytes int64, d time.Duration, background bool, err error) {
	o.log.classify(layer, bytes, kind(background))
	o.Observer.Fetched(layer, bytes, d, background, err)
}

// kind names a fetch as the metrics do.
func kind(background bool) string {
	if background {
		return "background"
	}
	return "foreground"
}
