package fs_test

import lfs "github.com/lazypull/lazypull/fs"

// coldVariants are the scheduler configurations BenchmarkColdStartSlowLink
// compares: "before" is the engine before speculation (read-ahead in a
// second foreground request, speculation only after a quiet period), the
// "lane-*" variants the speculation queue with a busy lane of that size
// (lane-256K is the default), "no-lane" the queue without it.
func coldVariants() []coldVariant {
	return []coldVariant{
		{"before", func() *lfs.Scheduler {
			return lfs.NewScheduler(1, lfs.WithBusyBackground(0), lfs.WithForegroundReadAhead())
		}},
		{"before-lane-256K", func() *lfs.Scheduler {
			return lfs.NewScheduler(1, lfs.WithBusyBackground(256<<10), lfs.WithForegroundReadAhead())
		}},
		{"no-lane", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyBackground(0)) }},
		{"lane-128K", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyBackground(128<<10)) }},
		{"lane-256K", func() *lfs.Scheduler { return lfs.NewScheduler(1) }},
		{"lane-512K", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyBackground(512<<10)) }},
		{"lane-256K-max2", func() *lfs.Scheduler { return lfs.NewScheduler(2) }},
	}
}
