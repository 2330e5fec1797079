//go:build race

package testenv

// raceEnabled: the tests run with -race, so BuildSnapshotter builds the
// daemon with it too.
const raceEnabled = true
