// Command lazypull is the lazypull user's tool: it converts images to
// eStargz, mounts images lazily without containerd, and pulls images into
// containerd through the lazypull snapshotter.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/containerd/log"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/lazypull/lazypull/remote"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lazypull:", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// usageError marks errors in how the command was called (exit status 2).
type usageError struct{ error }

func newRootCommand() *cobra.Command {
	var logLevel string
	root := &cobra.Command{
		Use:           "lazypull",
		Short:         "Lazy-pulling container images: convert, mount and pull eStargz images",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if err := log.SetLevel(logLevel); err != nil {
				return usageError{fmt.Errorf("--log-level %q: %w", logLevel, err)}
			}
			return log.SetFormat(log.TextFormat)
		},
	}
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w (see %s --help)", err, cmd.CommandPath())}
	})
	root.PersistentFlags().StringVar(&logLevel, "log-level", "warn", "log level: debug, info, warn, error")
	root.AddCommand(newConvertCommand(), newMountCommand(), newPullCommand(), newBenchCommand(), newOptimizeCommand(), newProfileCommand(), newExecInRootfsCommand())
	return root
}

// registryFlags are the flags of every command that talks to registries.
type registryFlags struct {
	plainHTTP bool
	hostsDir  string
}

func (f *registryFlags) add(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.plainHTTP, "plain-http", false, "use plain HTTP for every registry (not needed for localhost and 127.0.0.1, which fall back to it)")
	cmd.Flags().StringVar(&f.hostsDir, "hosts-dir", remote.DefaultHostsDir, "containerd hosts.toml directory for registry mirrors and TLS")
}

func (f *registryFlags) registry() (*remote.Registry, error) {
	return remote.New(remote.Options{
		PlainHTTP: f.plainHTTP,
		HostsDir:  f.hostsDir,
		UserAgent: "lazypull/" + version,
	})
}

// parsePlatforms turns "linux/amd64,linux/arm64" into a matcher; "" means
// nil (all platforms), "host" the host's.
func parsePlatforms(s string) (platforms.MatchComparer, []ocispec.Platform, error) {
	if s == "" {
		return nil, nil, nil
	}
	var ps []ocispec.Platform
	for _, p := range strings.Split(s, ",") {
		p = strings.TrimSpace(p)
		if p == "host" {
			ps = append(ps, platforms.DefaultSpec())
			continue
		}
		spec, err := platforms.Parse(p)
		if err != nil {
			return nil, nil, usageError{fmt.Errorf("--platform %q: %w", p, err)}
		}
		ps = append(ps, spec)
	}
	return platforms.Ordered(ps...), ps, nil
}

// credentials returns docker config.json credentials for containerd's
// resolver.
func (f *registryFlags) credentials() func(host string) (string, string, error) {
	return remote.DockerCredentials("")
}
