package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/lazypull/lazypull/profile"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/service"
)

// defaultProfileDir is the daemon's [profile] dir with the default root.
const defaultProfileDir = "/var/lib/lazypull/profiles"

// profileFlags are the flags of the profile subcommands.
type profileFlags struct {
	rf       registryFlags
	dir      string
	platform string
}

func (f *profileFlags) add(cmd *cobra.Command, registry bool) {
	if registry {
		f.rf.add(cmd)
	}
	cmd.Flags().StringVar(&f.dir, "dir", defaultProfileDir, "profile directory (the daemon's [profile] dir)")
	cmd.Flags().StringVar(&f.platform, "platform", "", "platform of a multi-platform image (default: this host's)")
}

// manifest opens the registry client the flags describe and resolves ref
// to the digest of its manifest for the platform.
func (f *profileFlags) manifest(cmd *cobra.Command, ref string) (*remote.Registry, digest.Digest, error) {
	reg, err := f.rf.registry()
	if err != nil {
		return nil, "", err
	}
	var plat *ocispec.Platform
	if f.platform != "" {
		p, err := platforms.Parse(f.platform)
		if err != nil {
			return nil, "", usageError{fmt.Errorf("--platform %q: %w", f.platform, err)}
		}
		plat = &p
	}
	img, err := reg.Resolve(cmd.Context(), ref, plat)
	if err != nil {
		return nil, "", err
	}
	return reg, img.ManifestDesc.Digest, nil
}

func oneArg(name string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != 1 {
			return usageError{fmt.Errorf("%s needs one argument, got %d", name, len(args))}
		}
		return nil
	}
}

func newProfileCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "profile",
		Short: "Push, pull and show learned start-up profiles",
		Long: `A start-up profile lists, for each layer of an image, the chunks its start-up
read, in order. The daemon records one at each cold start (saved under its
[profile] dir) and looks one up at the first mount of an image, locally or as a
referrer of the image manifest in its registry. See docs/profiles.md.`,
	}
	cmd.AddCommand(newProfilePushCommand(), newProfilePullCommand(), newProfileShowCommand())
	return cmd
}

func newProfilePushCommand() *cobra.Command {
	var f profileFlags
	cmd := &cobra.Command{
		Use:     "push [flags] REF",
		Short:   "Push the locally recorded profile of REF's manifest to REF's repository",
		Example: `  lazypull profile push 127.0.0.1:5000/app:v1-esgz`,
		Args:    oneArg("push"),
		RunE: func(cmd *cobra.Command, args []string) error {
			reg, m, err := f.manifest(cmd, args[0])
			if err != nil {
				return err
			}
			p, path, err := service.LoadProfile(f.dir, m)
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("no profile of %s (manifest %s) in %s", args[0], m, f.dir)
			}
			if err != nil {
				return err
			}
			p.Image = m
			desc, err := service.PushProfile(cmd.Context(), reg, args[0], p)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pushed %s (%d runs, %d chunks) as %s\n", path, p.Runs, p.ChunkCount(), desc.Digest)
			return nil
		},
	}
	f.add(cmd, true)
	return cmd
}

func newProfilePullCommand() *cobra.Command {
	var (
		f      profileFlags
		output string
	)
	cmd := &cobra.Command{
		Use:   "pull [flags] REF",
		Short: "Fetch the newest profile of REF's manifest from its registry",
		Long: `Fetch the newest valid profile that refers to REF's manifest (referrers API, or
the referrers tag on registries without it) and save it in --dir, where the
daemon finds it, or write it to --output ("-" for stdout).`,
		Example: `  lazypull profile pull 127.0.0.1:5000/app:v1-esgz`,
		Args:    oneArg("pull"),
		RunE: func(cmd *cobra.Command, args []string) error {
			reg, m, err := f.manifest(cmd, args[0])
			if err != nil {
				return err
			}
			p, source, err := service.FetchProfile(cmd.Context(), reg, args[0], m)
			if err != nil {
				return err
			}
			if p == nil {
				return fmt.Errorf("no profile refers to %s (manifest %s)", args[0], m)
			}
			p.Image = m
			if output != "" {
				b, err := p.Marshal()
				if err != nil {
					return err
				}
				if output == "-" {
					_, err = cmd.OutOrStdout().Write(append(b, '\n'))
					return err
				}
				return os.WriteFile(output, b, 0o644)
			}
			path, err := service.SaveProfile(f.dir, p)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "saved %s from %s (%d runs, %d chunks)\n", path, source, p.Runs, p.ChunkCount())
			return nil
		},
	}
	f.add(cmd, true)
	cmd.Flags().StringVarP(&output, "output", "o", "", `write the profile here ("-": stdout) instead of into --dir`)
	return cmd
}

func newProfileShowCommand() *cobra.Command {
	var (
		f      profileFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "show [flags] FILE|REF",
		Short: "Print a profile: a file, or the one saved in --dir for REF's manifest",
		Example: `  lazypull profile show /var/lib/lazypull/profiles/sha256-0123....json
  lazypull profile show --json 127.0.0.1:5000/app:v1-esgz`,
		Args: oneArg("show"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var (
				p    *profile.Profile
				path = args[0]
				err  error
			)
			if st, serr := os.Stat(path); serr == nil && !st.IsDir() {
				p, err = readProfileFile(path)
			} else {
				_, m, merr := f.manifest(cmd, args[0])
				if merr != nil {
					return merr
				}
				p, path, err = service.LoadProfile(f.dir, m)
			}
			if err != nil {
				return err
			}
			return printProfile(cmd.OutOrStdout(), path, p, asJSON)
		},
	}
	f.add(cmd, true)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the profile's JSON")
	return cmd
}

func readProfileFile(path string) (*profile.Profile, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	p, err := profile.Decode(fh)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return p, nil
}

func printProfile(w io.Writer, path string, p *profile.Profile, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	}
	fmt.Fprintf(w, "profile %s\nimage   %s\nruns    %d\nchunks  %d\n", path, p.Image, p.Runs, p.ChunkCount())
	for _, l := range p.Layers {
		first := l.Chunks[:min(len(l.Chunks), 8)]
		more := ""
		if len(l.Chunks) > len(first) {
			more = " ..."
		}
		fmt.Fprintf(w, "layer %s: %d chunks, offsets %v%s\n", l.Digest, len(l.Chunks), first, more)
	}
	return nil
}
