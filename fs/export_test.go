package fs

// WithForegroundReadAhead exports withForegroundReadAhead to the
// benchmarks of package fs_test.
var WithForegroundReadAhead = withForegroundReadAhead
