// Package regname checks registry names as image references spell them (host[:port]),
// for everything that takes one from outside: install's --registries, where a name
// becomes a directory (<hosts dir>/<registry>/hosts.toml), and the daemon's config, where
// it becomes a route, a key in the index and a default endpoint URL. CheckRepo does the
// same for the repository names that clients and peers send.
package regname

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
)

// MaxHostLen is DNS's limit on a name.
const MaxHostLen = 253

// MaxLen bounds a whole registry name: a host and a port.
const MaxLen = MaxHostLen + len(":65535")

// Check accepts a lower-case DNS name, an IPv4 address or a bracketed IPv6 address, with
// an optional port from 1 to 65535. The name must not be able to name anything else: no
// "..", no slashes, no empty labels, no user info, query or zone. Upper case is refused
// rather than folded: containerd looks a hosts directory up by the name as the image
// reference spells it, and image references spell registries in lower case, so a folded
// name would silently never match. The error names the registry.
func Check(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("registry %q: %s (want host[:port]: a lower-case DNS name or an IP address, and an optional port)", name, why)
	}
	if len(name) > MaxLen {
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
		if l := strings.ToLower(host); l != host {
			return bad(fmt.Sprintf("upper case; registry names are lower case (%q)", "["+l+"]"))
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
		if err := checkHostname(host); err != nil {
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

// checkHostname accepts a lower-case DNS name or a dotted IPv4 address.
func checkHostname(host string) error {
	if host == "" {
		return errors.New("empty host")
	}
	if len(host) > MaxHostLen {
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

// MaxRepoLen bounds a whole repository name.
const MaxRepoLen = 255

// Repository path components per the distribution spec's name grammar.
var componentRe = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$`)

// CheckRepo accepts a repository name ("library/nginx"): slash-separated components of
// the distribution spec's grammar, MaxRepoLen bytes at most.
func CheckRepo(repo string) error {
	if repo == "" || len(repo) > MaxRepoLen {
		return fmt.Errorf("repository name length %d out of range [1, %d]", len(repo), MaxRepoLen)
	}
	for c := range strings.SplitSeq(repo, "/") {
		if !componentRe.MatchString(c) {
			return errors.New("invalid repository name")
		}
	}
	return nil
}
