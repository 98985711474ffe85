package hosts

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
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
			if err := validRegistry(r); err != nil {
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

// maxHostLen is DNS's limit on a name; a registry name is that and a port at most.
const maxHostLen = 253

// validRegistry accepts a registry as image references name it: a lower-case DNS name,
// an IPv4 address or a bracketed IPv6 address, and an optional port. The name becomes a
// directory (<hosts dir>/<registry>/hosts.toml) and a key in engine configs, so it must
// not be able to name anything else: no "..", no slashes, no empty labels. Upper case is
// refused rather than folded, because containerd looks the directory up by the name as
// the image reference spells it, and a folded directory would silently never match.
func validRegistry(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("registry %q: %s (want host[:port]: a lower-case DNS name or an IP address, and an optional port)", name, why)
	}
	if len(name) > maxHostLen+len(":65535") {
		return bad("too long")
	}
	host, port := name, ""
	if strings.HasPrefix(name, "[") {
		end := strings.IndexByte(name, ']')
		if end < 0 {
			return bad("unclosed [")
		}
		host, port = name[1:end], name[end+1:]
		if ip := net.ParseIP(host); ip == nil || ip.To4() != nil || !strings.Contains(host, ":") {
			return bad("not an IPv6 address in brackets")
		}
		if port != "" {
			p, ok := strings.CutPrefix(port, ":")
			if !ok {
				return bad("text after ]")
			}
			port = p
			if port == "" {
				return bad("empty port")
			}
		}
	} else {
		if i := strings.LastIndexByte(name, ':'); i >= 0 {
			host, port = name[:i], name[i+1:]
			if port == "" {
				return bad("empty port")
			}
		}
		if strings.Contains(host, ":") {
			return bad("an IPv6 address needs brackets, as in [fd00::1]:5000")
		}
		if err := validHostname(host); err != nil {
			return bad(err.Error())
		}
	}
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != port {
			return bad("port must be a number from 1 to 65535")
		}
	}
	return nil
}

// validHostname accepts a lower-case DNS name or a dotted IPv4 address.
func validHostname(host string) error {
	if host == "" {
		return errors.New("empty host")
	}
	if len(host) > maxHostLen {
		return errors.New("host longer than 253 characters")
	}
	labels := strings.Split(host, ".")
	for _, l := range labels {
		if l == "" {
			return errors.New("empty label (a leading, trailing or double dot)")
		}
		if len(l) > 63 {
			return errors.New("label longer than 63 characters")
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("label %q starts or ends with -", l)
		}
		for _, c := range l {
			switch {
			case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
			case c >= 'A' && c <= 'Z':
				return fmt.Errorf("upper case; registry names are lower case (%q)", strings.ToLower(host))
			default:
				return fmt.Errorf("%q is not allowed in a host name", c)
			}
		}
	}
	// A top-level label of digits is no DNS name; then it must be an IPv4 address, written
	// as one (1.2.3.04 is not).
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		if ip := net.ParseIP(host); ip == nil || ip.To4() == nil || ip.String() != host {
			return errors.New("not a valid IPv4 address")
		}
	}
	return nil
}
