//go:build race

package lab

// raceEnabled: the tests run with -race, so Build builds binaries with it
// too.
const raceEnabled = true
