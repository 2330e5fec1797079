// Garbage collection of saved layer metadata: Root/layers/ keeps a layer's
// TOC and footer so that a restart mounts it without the registry; once no
// snapshot uses the layer any more, nothing will, and SweepLayers removes it.

package fs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/opencontainers/go-digest"
)

// SweepLayers removes the saved metadata (Root/layers/<layer>) of every
// layer for which keep returns false and that is neither mounted nor being
// prepared, and returns how many it removed. Entries it cannot read as a
// layer digest are left alone. It is meant to run when the daemon starts,
// with keep true for the layers of the snapshots that exist; a layer needed
// again later has its TOC read from the registry again.
func (m *Manager) SweepLayers(keep func(digest.Digest) bool) (int, error) {
	dir := filepath.Join(m.opts.Root, "layers")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("fs: listing saved layers: %w", err)
	}
	m.mu.Lock()
	inUse := make(map[digest.Digest]bool, len(m.mounts)+len(m.preparing))
	for _, mnt := range m.mounts {
		inUse[mnt.layer.digest] = true
	}
	for d := range m.preparing {
		inUse[d] = true
	}
	m.mu.Unlock()
	removed := 0
	var errs []error
	for _, e := range ents {
		alg, hex, ok := strings.Cut(e.Name(), "-")
		if !ok || !e.IsDir() {
			continue
		}
		d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
		if d.Validate() != nil || m.metaDir(d) != filepath.Join(dir, e.Name()) || inUse[d] || keep(d) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
			continue
		}
		removed++
	}
	return removed, errors.Join(errs...)
}

// Saved reports whether metadata of layer d is saved under Root (so that
// mounting it needs no registry request for its TOC).
func (m *Manager) Saved(d digest.Digest) bool {
	if d.Validate() != nil {
		return false
	}
	_, err := os.Stat(filepath.Join(m.metaDir(d), "layer.json"))
	return err == nil
}
