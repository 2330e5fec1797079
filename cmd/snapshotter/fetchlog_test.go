package main

import (
	"encoding/json"
	"errors"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/remote"
)

type nopObserver struct{ fetched int }

func (o *nopObserver) Fetched(digest.Digest, int64, time.Duration, bool, error) { o.fetched++ }
func (o *nopObserver) CacheHit(digest.Digest)                                   {}
func (o *nopObserver) CacheMiss(digest.Digest)                                  {}
func (o *nopObserver) VerifyFailed(digest.Digest)                               {}

// TestFetchLog checks that range requests take the kind of the observer
// call that follows them (retries included), the others stay unclassified,
// and the log is served as JSON.
func TestFetchLog(t *testing.T) {
	l := &fetchLog{}
	inner := &nopObserver{}
	o := loggingObserver{Observer: inner, log: l}
	a, b := digest.FromString("a"), digest.FromString("b")
	l.onFetch(remote.FetchEvent{Op: "head", Digest: a, Length: -1, Attempt: 1, Duration: time.Millisecond})
	l.onFetch(remote.FetchEvent{Op: "range", Digest: a, Offset: 900, Length: 100, Bytes: 100, Attempt: 1}) // TOC
	l.onFetch(remote.FetchEvent{Op: "range", Digest: a, Offset: 0, Length: 100, Attempt: 1, Err: errors.New("reset")})
	l.onFetch(remote.FetchEvent{Op: "range", Digest: a, Offset: 0, Length: 100, Bytes: 100, Attempt: 2})
	o.Fetched(a, 100, time.Millisecond, false, nil)
	l.onFetch(remote.FetchEvent{Op: "range", Digest: b, Offset: 300, Length: 100, Bytes: 100, Attempt: 1})
	o.Fetched(b, 100, time.Millisecond, true, nil)
	if inner.fetched != 2 {
		t.Errorf("observer called %d times, want 2", inner.fetched)
	}
	rec := httptest.NewRecorder()
	l.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/fetches", nil))
	var got struct {
		Dropped int           `json:"dropped"`
		Fetches []fetchRecord `json:"fetches"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	want := []string{"", "", "foreground", "foreground", "background"}
	if len(got.Fetches) != len(want) {
		t.Fatalf("%d records, want %d", len(got.Fetches), len(want))
	}
	for i, r := range got.Fetches {
		if r.Kind != want[i] {
			t.Errorf("record %d (%s %d+%d attempt %d): kind %q, want %q", i, r.Op, r.Offset, r.Length, r.Attempt, r.Kind, want[i])
		}
	}
	if got.Fetches[2].Err != "reset" || got.Fetches[0].Seconds != 0.001 || got.Fetches[0].Start.IsZero() {
		t.Errorf("record fields: %+v %+v", got.Fetches[0], got.Fetches[2])
	}
}

// TestFetchLogBounded checks the log drops its oldest half when full.
func TestFetchLogBounded(t *testing.T) {
	l := &fetchLog{}
	for i := 0; i < maxFetchLog+10; i++ {
		l.onFetch(remote.FetchEvent{Op: "range", Offset: int64(i)})
	}
	if len(l.records) > maxFetchLog || l.dropped == 0 || l.records[len(l.records)-1].Offset != maxFetchLog+9 {
		t.Errorf("%d records, %d dropped, last %d", len(l.records), l.dropped, l.records[len(l.records)-1].Offset)
	}
	if len(l.records)+l.dropped != maxFetchLog+10 {
		t.Errorf("%d kept + %d dropped != %d", len(l.records), l.dropped, maxFetchLog+10)
	}
}
