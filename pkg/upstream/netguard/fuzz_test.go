package netguard

import (
	"net/netip"
	"net/url"
	"strings"
	"testing"
)

// FuzzPolicy checks the invariants of the redirect and realm rules on any endpoint,
// previous hop and target: nothing is allowed from https to http; credentials never go
// to another host:port than the endpoint's (a realm only over https); a literal address
// that is loopback, private, link-local, unspecified or multicast is never allowed
// unless it is the endpoint's own host:port.
func FuzzPolicy(f *testing.F) {
	for _, s := range [][3]string{
		{"https://registry-1.docker.io", "https://registry-1.docker.io/v2/a/blobs/x", "https://cdn.example/x"},
		{"https://registry-1.docker.io", "https://registry-1.docker.io", "http://registry-1.docker.io/v2/"},
		{"http://127.0.0.1:5001", "http://127.0.0.1:5001/v2/", "http://127.0.0.1:5002/latest/meta-data"},
		{"http://127.0.0.1:5001", "https://cdn.example/", "http://127.0.0.1:5001/v2/"},
		{"https://ghcr.io", "https://ghcr.io/v2/", "https://169.254.169.254/"},
		{"https://ghcr.io", "https://ghcr.io/v2/", "https://[::ffff:169.254.169.254]/"},
		{"https://ghcr.io", "https://ghcr.io/v2/", "https://[fe80::1%25eth0]:443/"},
		{"https://ghcr.io", "https://ghcr.io/v2/", "https://[64:ff9b::7f00:1]/"},
		{"https://ghcr.io", "https://ghcr.io/v2/", "HTTPS://GHCR.IO:443/v2/"},
		{"https://ghcr.io", "https://ghcr.io/v2/", "https://u:p@ghcr.io/v2/"},
		{"http://[::1]:5000", "http://[::1]:5000/v2/", "//[::1]:5001/x"},
		{"https://quay.io", "https://quay.io/v2/", "https://0.0.0.0:443/"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, endpoint, from, to string) {
		ep, err := url.Parse(endpoint)
		if err != nil || (ep.Scheme != "http" && ep.Scheme != "https") || ep.Host == "" {
			return
		}
		fu, err := ep.Parse(from)
		if err != nil {
			return
		}
		tu, err := fu.Parse(to) // a Location is resolved against the hop that sent it
		if err != nil {
			return
		}
		sameHostPort := HostPort(tu) == HostPort(ep)

		r := Redirect(ep, fu, tu, nil)
		if r.Allow && strings.EqualFold(fu.Scheme, "https") && !strings.EqualFold(tu.Scheme, "https") {
			t.Fatalf("redirect %s -> %s allowed a downgrade", fu, tu)
		}
		if r.Allow && !strings.EqualFold(tu.Scheme, "https") && !SameOrigin(ep, tu) {
			t.Fatalf("redirect to %s allowed over plain http, endpoint %s", tu, ep)
		}
		if r.Credentials && (!r.Allow || !sameHostPort) {
			t.Fatalf("redirect to %s keeps credentials of %s", tu, ep)
		}
		if r.Allow && !sameHostPort && nonPublicLiteral(tu) {
			t.Fatalf("redirect to non-public %s allowed, endpoint %s", tu, ep)
		}

		m := Realm(ep, tu, nil)
		if m.Allow && strings.EqualFold(ep.Scheme, "https") && !strings.EqualFold(tu.Scheme, "https") {
			t.Fatalf("realm %s over http for https endpoint %s", tu, ep)
		}
		if m.Credentials && (!m.Allow || !strings.EqualFold(tu.Scheme, "https") && !sameHostPort) {
			t.Fatalf("realm %s gets the credentials of %s", tu, ep)
		}
		if m.Allow && !sameHostPort && nonPublicLiteral(tu) {
			t.Fatalf("realm on non-public %s allowed, endpoint %s", tu, ep)
		}
	})
}

// nonPublicLiteral is an oracle independent of Public: the standard library's own
// classification of the obviously non-public.
func nonPublicLiteral(u *url.URL) bool {
	a, err := netip.ParseAddr(u.Hostname())
	if err != nil {
		return false
	}
	a = a.WithZone("").Unmap()
	return a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() ||
		a.IsInterfaceLocalMulticast() || a.IsMulticast() || a.IsUnspecified()
}
