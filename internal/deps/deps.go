//go:build tools

// Package deps pins modules that packages under construction will import,
// so that `go mod tidy` keeps them while those packages are being written.
package deps

import (
	_ "github.com/BurntSushi/toml"
	_ "github.com/containerd/containerd/api/services/snapshots/v1"
	_ "github.com/containerd/containerd/v2/client"
	_ "github.com/containerd/containerd/v2/contrib/snapshotservice"
	_ "github.com/containerd/containerd/v2/core/mount"
	_ "github.com/containerd/containerd/v2/core/remotes/docker"
	_ "github.com/containerd/containerd/v2/core/remotes/docker/config"
	_ "github.com/containerd/containerd/v2/core/snapshots/storage"
	_ "github.com/containerd/containerd/v2/core/snapshots/testsuite"
	_ "github.com/containerd/containerd/v2/pkg/snapshotters"
	_ "github.com/containerd/errdefs"
	_ "github.com/containerd/log"
	_ "github.com/containerd/platforms"
	_ "github.com/containerd/stargz-snapshotter/estargz"
	_ "github.com/distribution/distribution/v3/registry"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	_ "github.com/distribution/reference"
	_ "github.com/docker/docker-credential-helpers/client"
	_ "github.com/hanwen/go-fuse/v2/fs"
	_ "github.com/klauspost/compress/gzip"
	_ "github.com/klauspost/compress/zstd"
	_ "github.com/opencontainers/go-digest"
	_ "github.com/opencontainers/image-spec/specs-go/v1"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "go.etcd.io/bbolt"
	_ "golang.org/x/sync/errgroup"
	_ "golang.org/x/sync/singleflight"
	_ "google.golang.org/grpc"
)
