package keychain

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
)

// matchImage reports whether image (a repository name or reference
// without scheme, e.g. "123.dkr.ecr.us-east-1.amazonaws.com/app:v1")
// matches pattern the way kubelet matches a credential provider's
// matchImages and the keys of a plugin's auth map: the host names must
// have the same number of dot-separated parts, each matching its glob
// (path.Match syntax, so "*" never spans a dot), the ports must be equal
// (no port matches only no port), and the pattern's path, if any, must be
// a prefix of the image's path.
func matchImage(pattern, image string) bool {
	g, err := parseSchemeless(pattern)
	if err != nil {
		return false
	}
	t, err := parseSchemeless(image)
	if err != nil {
		return false
	}
	gHost, gPort := splitHost(g.Host)
	tHost, tPort := splitHost(t.Host)
	if gPort != tPort || len(gHost) != len(tHost) {
		return false
	}
	for i := range gHost {
		ok, err := filepath.Match(gHost[i], tHost[i])
		if err != nil || !ok {
			return false
		}
	}
	return strings.HasPrefix(t.Path, g.Path)
}

// validPattern checks a matchImages entry or auth key.
func validPattern(p string) error {
	if p == "" {
		return fmt.Errorf("empty image pattern")
	}
	u, err := parseSchemeless(p)
	if err != nil {
		return fmt.Errorf("image pattern %q: %w", p, err)
	}
	host, _ := splitHost(u.Host)
	for _, part := range host {
		if _, err := filepath.Match(part, ""); err != nil {
			return fmt.Errorf("image pattern %q: %w", p, err)
		}
	}
	return nil
}

func parseSchemeless(s string) (*url.URL, error) {
	return url.Parse("dummy://" + s)
}

func splitHost(hostport string) ([]string, string) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		host, port = hostport, ""
	}
	return strings.Split(host, "."), port
}
