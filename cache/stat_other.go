//go:build !linux

package cache

import (
	"os"
	"path/filepath"
)

// statEntry returns the size and modification time (unix nanoseconds) of the
// regular file name in the directory dir; ok is false for anything else.
func statEntry(dir *os.File, name string) (size, time int64, ok bool, err error) {
	fi, err := os.Lstat(filepath.Join(dir.Name(), name))
	if err != nil || !fi.Mode().IsRegular() {
		return 0, 0, false, err
	}
	return fi.Size(), fi.ModTime().UnixNano(), true, nil
}
