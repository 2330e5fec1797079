// The clock the fetch engine reads time from.

package fs

import "time"

// Clock tells the time and runs timers. The Scheduler and its layers use
// one, so that tests can drive quiet periods and timeouts without
// sleeping. The default is the system clock.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// After returns a channel that receives the time once d has passed.
	After(d time.Duration) <-chan time.Time
}

// systemClock is the real time.
type systemClock struct{}

func (systemClock) Now() time.Time                         { return time.Now() }
func (systemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }
