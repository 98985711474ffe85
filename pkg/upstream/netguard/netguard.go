// Package netguard decides where upstream traffic may go: which redirects are followed,
// which token realms are used and which of them may receive credentials, and which
// addresses may be dialled. The registries behind the mirror are trusted for verified
// bytes only; a redirect or a realm they name must not turn the daemon, which holds
// credentials and runs on every node, into a client of the node's own network.
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// nonPublic says why a non-public address is refused, and what an operator whose own
// host it is can do.
const nonPublic = "non-public address; if the host is yours, list it in the registry's trusted_hosts"

// ErrDenied is matched (errors.Is) by every refusal of this package.
var ErrDenied = errors.New("refused by the upstream address policy")

// DeniedError says what was refused and why.
type DeniedError struct {
	Target string
	Reason string
}

func (e *DeniedError) Error() string {
	return fmt.Sprintf("%s: %s (%s)", ErrDenied, e.Target, e.Reason)
}

// Is makes errors.Is(err, ErrDenied) hold.
func (e *DeniedError) Is(target error) bool { return target == ErrDenied }

// Verdict is the policy's answer for one URL.
type Verdict struct {
	// Allow: the request may be made.
	Allow bool
	// Credentials: the request may carry the endpoint's credentials.
	Credentials bool
	// Reason says why not, when Allow is false.
	Reason string
}

func deny(reason string) Verdict { return Verdict{Reason: reason} }

// Redirect judges a redirect from from to to, in a chain that began at the configured
// endpoint. It is followed only to https or back to the endpoint's own scheme and
// host:port, never from https to http, and never to a literal non-public address other
// than the endpoint's; credentials go along only to the endpoint's own scheme and
// host:port. Names are judged again at dial time, on the address actually dialled.
// allow, when not nil, admits addresses that would otherwise count as non-public (tests).
func Redirect(endpoint, from, to *url.URL, allow func(netip.AddrPort) bool) Verdict {
	v := reach(endpoint, from, to, allow)
	if v.Allow {
		v.Credentials = SameOrigin(endpoint, to)
	}
	return v
}

// Realm judges a token realm named by a challenge from the configured endpoint. The
// realm is used under the rules of Redirect; it receives credentials only over https or
// when it is the endpoint's own scheme and host:port. Docker Hub's realm, on another
// host than its registry, is https and gets them.
func Realm(endpoint, realm *url.URL, allow func(netip.AddrPort) bool) Verdict {
	v := reach(endpoint, endpoint, realm, allow)
	if v.Allow {
		v.Credentials = realm.Scheme == "https" || SameOrigin(endpoint, realm)
	}
	return v
}

func reach(endpoint, from, to *url.URL, allow func(netip.AddrPort) bool) Verdict {
	switch {
	case endpoint == nil || from == nil || to == nil:
		return deny("no endpoint to judge against")
	case to.Scheme != "http" && to.Scheme != "https":
		return deny("scheme is not http or https")
	case to.Host == "" || to.Hostname() == "":
		return deny("no host")
	case to.User != nil:
		return deny("credentials in the URL")
	case from.Scheme == "https" && to.Scheme == "http":
		return deny("https to http")
	}
	own := SameOrigin(endpoint, to)
	if !own && to.Scheme != "https" {
		return deny("plain http to another host:port than the endpoint's")
	}
	hp := HostPort(to)
	if addr, err := netip.ParseAddr(to.Hostname()); err == nil && hp != HostPort(endpoint) {
		ap := netip.AddrPortFrom(addr, port(hp))
		if !Public(addr) && (allow == nil || !allow(ap)) {
			return deny(nonPublic)
		}
	}
	return Verdict{Allow: true}
}

// SameOrigin reports whether a and b have the same scheme and host:port.
func SameOrigin(a, b *url.URL) bool {
	return a != nil && b != nil && strings.EqualFold(a.Scheme, b.Scheme) && HostPort(a) == HostPort(b)
}

// HostPort is u's host:port, lower case, with the scheme's default port filled in: the
// form in which two URLs name the same server.
func HostPort(u *url.URL) string {
	p := u.Port()
	if p == "" {
		switch strings.ToLower(u.Scheme) {
		case "https":
			p = "443"
		case "http":
			p = "80"
		}
	}
	return net.JoinHostPort(strings.ToLower(u.Hostname()), p)
}

func port(hostport string) uint16 {
	_, p, _ := net.SplitHostPort(hostport)
	n, _ := strconv.ParseUint(p, 10, 16)
	return uint16(n)
}

var (
	// Special-purpose IPv4 blocks that are not globally reachable (IANA IPv4
	// Special-Purpose Address Registry), and multicast and the reserved block.
	notPublic4 = prefixes(
		"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
		"172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
		"198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
	)
	// IPv6 is judged by allow-list: global unicast only, less the blocks in it that are
	// documentation, benchmarking, tunnels to arbitrary IPv4 (6to4, Teredo) or otherwise
	// not globally reachable.
	global6    = netip.MustParsePrefix("2000::/3")
	notPublic6 = prefixes("2001::/23", "2001:db8::/32", "2002::/16", "3fff::/20")
	// NAT64's well-known prefix carries an IPv4 address, judged as such: IPv6-only
	// nodes reach IPv4 registries and CDNs through it.
	nat64 = netip.MustParsePrefix("64:ff9b::/96")
)

func prefixes(ss ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		ps[i] = netip.MustParsePrefix(s)
	}
	return ps
}

// Public reports whether addr is a globally reachable unicast address: not loopback,
// link-local (169.254.169.254 included), private, shared, unspecified, multicast,
// documentation or otherwise special.
func Public(addr netip.Addr) bool {
	addr = addr.WithZone("").Unmap() // Prefix.Contains never matches a zoned address
	switch {
	case !addr.IsValid():
		return false
	case addr.Is4():
		return !inAny(addr, notPublic4)
	case nat64.Contains(addr):
		b := addr.As16()
		return Public(netip.AddrFrom4([4]byte(b[12:])))
	case !global6.Contains(addr):
		return false
	}
	return !inAny(addr, notPublic6)
}

func inAny(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Dialer connects to the configured endpoints wherever they resolve (the operator named
// them) and to anything else only at public addresses, judged on the address actually
// dialled, so a public name that resolves to 127.0.0.1 or 169.254.169.254 is refused.
type Dialer struct {
	plain, guarded *net.Dialer

	mu      sync.RWMutex
	trusted map[string]bool
}

// NewDialer returns a Dialer based on base (timeouts, keep-alive) that trusts the
// host:ports given. allow, when not nil, admits addresses that would otherwise count as
// non-public; production passes nil.
func NewDialer(base *net.Dialer, trusted []string, allow func(netip.AddrPort) bool) *Dialer {
	d := &Dialer{plain: base, trusted: map[string]bool{}}
	g := *base
	g.Control = nil
	g.ControlContext = func(_ context.Context, network, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return &DeniedError{Target: address, Reason: "not an IP address"}
		}
		if Public(ap.Addr()) || allow != nil && allow(ap) {
			return nil
		}
		return &DeniedError{Target: address, Reason: nonPublic}
	}
	d.guarded = &g
	for _, hp := range trusted {
		d.Trust(hp)
	}
	return d
}

// Trust lets host:port be dialled wherever it resolves: configured endpoints, and the
// HTTP proxy from the environment.
func (d *Dialer) Trust(hostport string) {
	hostport = strings.ToLower(hostport)
	d.mu.RLock()
	known := d.trusted[hostport]
	d.mu.RUnlock()
	if known {
		return // the proxy hook calls this on every request
	}
	d.mu.Lock()
	d.trusted[hostport] = true
	d.mu.Unlock()
}

// DialContext is for http.Transport.DialContext.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.RLock()
	trusted := d.trusted[strings.ToLower(addr)]
	d.mu.RUnlock()
	if trusted {
		return d.plain.DialContext(ctx, network, addr)
	}
	return d.guarded.DialContext(ctx, network, addr)
}
