package bench

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The peer lazypull is measured against: stargz-snapshotter's daemon,
// built from its Go module at bench time by a module of its own under
// bench/peer/stargz (lazypull's go.mod does not depend on it).
const (
	// PeerBinary is the peer daemon's file name.
	PeerBinary = "containerd-stargz-grpc"
	// PeerVersion is the stargz-snapshotter version bench/peer/stargz
	// pins.
	PeerVersion = "v0.19.1"
	// PeerModuleDir is the peer's module, relative to lazypull's source
	// tree.
	PeerModuleDir = "bench/peer/stargz"
)

// FindPeerModule returns the peer's module directory in the lazypull
// source tree at or above dir, or "" if dir is not in one.
func FindPeerModule(dir string) string {
	for {
		m := filepath.Join(dir, PeerModuleDir)
		if _, err := os.Stat(filepath.Join(m, "go.mod")); err == nil {
			return m
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// BuildPeer builds the peer daemon from its module directory into
// outDir and returns the binary's path. A binary built from the same
// module files (go.mod, go.sum, main.go) is reused. The Go toolchain
// fetches stargz-snapshotter's module through the machine's module proxy.
func BuildPeer(ctx context.Context, moduleDir, outDir string) (string, error) {
	h := sha256.New()
	for _, name := range []string{"go.mod", "go.sum", "main.go"} {
		b, err := os.ReadFile(filepath.Join(moduleDir, name))
		if err != nil {
			return "", fmt.Errorf("the peer's module: %w", err)
		}
		fmt.Fprintf(h, "%s\x00%d\x00", name, len(b))
		h.Write(b)
	}
	sum := hex.EncodeToString(h.Sum(nil))[:16]
	out := filepath.Join(outDir, PeerBinary+"-"+PeerVersion+"-"+sum)
	if fi, err := os.Stat(out); err == nil && fi.Mode().IsRegular() {
		return out, nil
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", errors.New("building the peer needs the Go toolchain on $PATH")
	}
	tmp := out + ".tmp"
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-o", tmp, ".")
	cmd.Dir = moduleDir
	if b, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("go build in %s: %w\n%s", moduleDir, err, strings.TrimSpace(string(b)))
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	return out, nil
}
