package hosts

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/node-mirror/node-mirror/internal/regname"
)

// normalizeMirrorURL checks the mirror URL and drops a trailing slash.
func normalizeMirrorURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", fmt.Errorf("--mirror-url %q: want http(s)://host:port", s)
	}
	return strings.TrimSuffix(u.String(), "/"), nil
}

// normalizeRegistries checks registry names (host[:port]) and drops duplicates.
func normalizeRegistries(in []string) ([]string, error) {
	var out []string
	for _, r := range in {
		r = strings.TrimSpace(r)
		if r == "" || slices.Contains(out, r) {
			continue
		}
		if r != Wildcard {
			if err := regname.Check(r); err != nil {
				return nil, err
			}
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return nil, errors.New("no registries to mirror")
	}
	if len(out) > 1 && slices.Contains(out, Wildcard) {
		return nil, fmt.Errorf("%q mirrors every registry; give it alone", Wildcard)
	}
	return out, nil
}
