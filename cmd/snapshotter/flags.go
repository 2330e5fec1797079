package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"

	"github.com/containerd/log"

	"github.com/lazypull/lazypull/service"
)

// commonFlags are the flags the daemon and the fuse manager share.
type commonFlags struct {
	root, configPath, logLevel *string
}

// addCommonFlags defines --root, --config and --log-level on fl.
func addCommonFlags(fl *flag.FlagSet) *commonFlags {
	return &commonFlags{
		root:       fl.String("root", defaultRoot, "state directory (overrides the config file's root)"),
		configPath: fl.String("config", service.DefaultConfigPath, "TOML configuration file (a missing default file means defaults)"),
		logLevel:   fl.String("log-level", "info", "log level: debug, info, warn or error"),
	}
}

// commonConfig is what the shared flags and the config file give.
type commonConfig struct {
	cfg *service.Config
	// root is the absolute state directory: --root if given, else the
	// config file's root, else the default.
	root string
	// logLevel, configPath and configGiven are passed on to a fuse
	// manager the daemon starts.
	logLevel    string
	configPath  string
	configGiven bool
}

// parse parses args with fl (which has f's flags). ok is false when the
// command must exit with code: 0 after --help, 2 for a bad flag, a bad
// log level or an argument.
func (f *commonFlags) parse(fl *flag.FlagSet, args []string, stderr io.Writer) (code int, ok bool) {
	if err := fl.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	if fl.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", fl.Name(), fl.Arg(0))
		fl.Usage()
		return 2, false
	}
	switch *f.logLevel {
	case "debug", "info", "warn", "error":
	default:
		fmt.Fprintf(stderr, "%s: invalid --log-level %q: want debug, info, warn or error\n", fl.Name(), *f.logLevel)
		return 2, false
	}
	return 0, true
}

// load sets up logging to stderr and loads the configuration, after
// parseFlags. ok is false when the command must exit with code (1).
func (f *commonFlags) load(fl *flag.FlagSet, stderr io.Writer) (_ commonConfig, code int, ok bool) {
	fail := func(err error) (commonConfig, int, bool) {
		fmt.Fprintf(stderr, "%s: %v\n", fl.Name(), err)
		return commonConfig{}, 1, false
	}
	given := map[string]bool{}
	fl.Visit(func(f *flag.Flag) { given[f.Name] = true })
	log.L.Logger.SetOutput(stderr)
	if err := log.SetFormat(log.TextFormat); err != nil {
		return fail(err)
	}
	if err := log.SetLevel(*f.logLevel); err != nil {
		return fail(err)
	}
	cfg, err := service.LoadConfig(*f.configPath, given["config"])
	if err != nil {
		return fail(err)
	}
	root := *f.root
	if !given["root"] && cfg.Root != "" {
		root = cfg.Root
	}
	if root, err = filepath.Abs(root); err != nil {
		return fail(err)
	}
	return commonConfig{cfg: cfg, root: root, logLevel: *f.logLevel, configPath: *f.configPath, configGiven: given["config"]}, 0, true
}
