package fusemanager

import (
	"slices"
	"sync"
	"time"
)

// FailureLog keeps the failures of the layers the manager still serves,
// for the daemon's Failures calls: a failure is dropped when its layer is
// unmounted (the daemon removed its snapshot) or mounted again. Safe for
// concurrent use.
type FailureLog struct {
	mu   sync.Mutex
	seq  uint64
	list []Failure
	// changed is closed (and replaced) at each Add.
	changed chan struct{}
}

// NewFailureLog returns an empty log.
func NewFailureLog() *FailureLog {
	return &FailureLog{changed: make(chan struct{})}
}

// Add records a failure, numbering it; a failure already recorded for
// the mountpoint is replaced.
func (l *FailureLog) Add(f Failure) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	f.Seq = l.seq
	if f.At.IsZero() {
		f.At = time.Now().UTC()
	}
	l.list = slices.DeleteFunc(l.list, func(g Failure) bool { return g.Mountpoint == f.Mountpoint })
	l.list = append(l.list, f)
	close(l.changed)
	l.changed = make(chan struct{})
}

// Drop forgets the failure of the layer at mountpoint, if any.
func (l *FailureLog) Drop(mountpoint string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.list = slices.DeleteFunc(l.list, func(g Failure) bool { return g.Mountpoint == mountpoint })
}

// after returns the failures numbered above seq, and a channel closed at
// the next Add.
func (l *FailureLog) after(seq uint64) ([]Failure, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Failure
	for _, f := range l.list {
		if f.Seq > seq {
			out = append(out, f)
		}
	}
	return out, l.changed
}
