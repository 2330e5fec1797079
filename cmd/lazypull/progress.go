package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// progress shows one bar per item (layer) on a terminal and nothing
// otherwise.
type progress struct {
	p    *mpb.Progress
	mu   sync.Mutex
	bars map[string]*bar
}

type bar struct {
	b     *mpb.Bar
	phase atomic.Pointer[string] // read by mpb's render goroutine
}

// newProgress returns a display on w if w is a terminal, else nil (all
// methods accept a nil receiver).
func newProgress(w io.Writer) *progress {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &progress{p: mpb.New(mpb.WithOutput(w), mpb.WithWidth(40)), bars: map[string]*bar{}}
}

// update sets item's phase and byte counts.
func (p *progress) update(item, phase string, done, total int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	b, ok := p.bars[item]
	if !ok {
		b = &bar{}
		b.phase.Store(&phase)
		name := item
		// Total 0: the bar must not complete when one phase reaches its
		// total (convert, then upload); finish completes it.
		b.b = p.p.AddBar(0,
			mpb.PrependDecorators(
				decor.Name(name, decor.WC{W: len(name) + 1, C: decor.DindentRight}),
				decor.Any(func(decor.Statistics) string { return fmt.Sprintf("%-8s", *b.phase.Load()) }),
			),
			mpb.AppendDecorators(decor.CountersKibiByte("% .1f / % .1f"), decor.Percentage(decor.WCSyncSpace)),
		)
		p.bars[item] = b
	}
	b.phase.Store(&phase)
	if total > 0 {
		b.b.SetTotal(total, false)
	}
	b.b.SetCurrent(done)
}

// finish marks item complete.
func (p *progress) finish(item, phase string) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if b, ok := p.bars[item]; ok {
		b.phase.Store(&phase)
		b.b.SetTotal(-1, true)
	}
}

// wait flushes the display.
func (p *progress) wait() {
	if p == nil {
		return
	}
	p.mu.Lock()
	for _, b := range p.bars {
		if !b.b.Completed() {
			b.b.Abort(false)
		}
	}
	p.mu.Unlock()
	p.p.Wait()
}
