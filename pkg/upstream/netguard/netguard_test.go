package netguard

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"net/url"
	"testing"
	"time"
)

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestPublic(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"8.8.8.8", true},
		{"104.16.0.1", true},
		{"2606:4700::1", true},
		{"64:ff9b::808:808", true}, // NAT64 of 8.8.8.8
		{"::ffff:8.8.8.8", true},
		{"127.0.0.1", false},
		{"127.255.0.9", false},
		{"10.1.2.3", false},
		{"172.16.0.1", false},
		{"172.31.255.255", false},
		{"192.168.1.1", false},
		{"169.254.169.254", false},
		{"100.64.0.1", false},
		{"0.0.0.0", false},
		{"0.1.2.3", false},
		{"224.0.0.1", false},
		{"255.255.255.255", false},
		{"240.0.0.1", false},
		{"192.0.2.1", false},
		{"198.18.0.1", false},
		{"::", false},
		{"::1", false},
		{"::ffff:127.0.0.1", false},
		{"::ffff:169.254.169.254", false},
		{"64:ff9b::a9fe:a9fe", false}, // NAT64 of 169.254.169.254
		{"64:ff9b::7f00:1", false},    // NAT64 of 127.0.0.1
		{"64:ff9b:1::1", false},
		{"fe80::1", false},
		{"fe80::1%eth0", false},
		{"fc00::1", false},
		{"fd12:3456::1", false},
		{"ff02::1", false},
		{"2001:db8::1", false},
		{"2002:7f00:1::1", false}, // 6to4 of 127.0.0.1
		{"2001:0:4136:e378::1", false},
		{"fec0::1", false},
		{"100::1", false},
	} {
		if got := Public(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("Public(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}
	if Public(netip.Addr{}) {
		t.Error("the zero address is public")
	}
}

func TestRedirect(t *testing.T) {
	const (
		hub   = "https://registry-1.docker.io"
		local = "http://127.0.0.1:5001"
	)
	for _, tc := range []struct {
		name               string
		endpoint, from, to string
		allow, creds       bool
	}{
		{"https CDN", hub, hub + "/v2/x/blobs/sha256:1", "https://production.cloudfront.example/blob", true, false},
		{"own path", hub, hub + "/v2/x", "https://registry-1.docker.io/v2/y", true, true},
		{"own with explicit port", hub, hub, "https://REGISTRY-1.docker.io:443/v2/y", true, true},
		{"https to http", hub, hub, "http://cdn.example/blob", false, false},
		{"https to own host over http", hub, hub, "http://registry-1.docker.io/v2/y", false, false},
		{"own host, other port", hub, hub, "https://registry-1.docker.io:8443/v2/y", true, false},
		{"metadata address", hub, hub, "https://169.254.169.254/latest/meta-data", false, false},
		{"loopback literal", hub, hub, "https://127.0.0.1/x", false, false},
		{"IPv6 loopback literal", hub, hub, "https://[::1]:443/x", false, false},
		{"mapped loopback literal", hub, hub, "https://[::ffff:127.0.0.1]/x", false, false},
		{"private literal", hub, hub, "https://10.0.0.1/x", false, false},
		{"public literal", hub, hub, "https://8.8.8.8/x", true, false},
		{"userinfo", hub, hub, "https://user:pw@cdn.example/x", false, false},
		{"other scheme", hub, hub, "file:///etc/passwd", false, false},
		{"no host", hub, hub, "https:///x", false, false},
		{"loopback endpoint, own", local, local + "/v2/x", "http://127.0.0.1:5001/blobs/x", true, true},
		{"loopback endpoint, other port", local, local, "http://127.0.0.1:5002/x", false, false},
		{"loopback endpoint, other port over https", local, local, "https://127.0.0.1:5002/x", false, false},
		{"loopback endpoint, localhost over http", local, local, "http://localhost:5001/x", false, false},
		{"loopback endpoint to https CDN", local, local, "https://cdn.example/x", true, false},
		{"back from https to the http endpoint", local, "https://cdn.example/x", "http://127.0.0.1:5001/x", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := Redirect(mustURL(t, tc.endpoint), mustURL(t, tc.from), mustURL(t, tc.to), nil)
			if v.Allow != tc.allow || v.Credentials != tc.creds {
				t.Fatalf("Redirect(%s -> %s) = %+v, want allow %v credentials %v", tc.from, tc.to, v, tc.allow, tc.creds)
			}
			if !v.Allow && v.Reason == "" {
				t.Fatal("a refusal without a reason")
			}
		})
	}
	// The test seam admits a loopback address it names, and nothing else.
	allow := func(ap netip.AddrPort) bool { return ap == netip.MustParseAddrPort("127.0.0.1:8443") }
	ep := mustURL(t, local)
	if v := Redirect(ep, ep, mustURL(t, "https://127.0.0.1:8443/x"), allow); !v.Allow || v.Credentials {
		t.Fatalf("allowed address: %+v", v)
	}
	if v := Redirect(ep, ep, mustURL(t, "https://127.0.0.1:8444/x"), allow); v.Allow {
		t.Fatalf("other port admitted: %+v", v)
	}
}

func TestRealm(t *testing.T) {
	for _, tc := range []struct {
		name            string
		endpoint, realm string
		allow, creds    bool
	}{
		{"Docker Hub", "https://registry-1.docker.io", "https://auth.docker.io/token", true, true},
		{"own realm over http", "http://127.0.0.1:5001", "http://127.0.0.1:5001/token", true, true},
		{"foreign http realm", "https://registry.example", "http://auth.example/token", false, false},
		{"http realm on own host", "https://registry.example", "http://registry.example/token", false, false},
		{"loopback realm, other port", "http://127.0.0.1:5001", "http://127.0.0.1:5002/token", false, false},
		{"loopback realm over https", "https://registry.example", "https://127.0.0.1/token", false, false},
		{"metadata realm", "https://registry.example", "https://169.254.169.254/token", false, false},
		{"https realm from an http endpoint", "http://127.0.0.1:5001", "https://auth.example/token", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := Realm(mustURL(t, tc.endpoint), mustURL(t, tc.realm), nil)
			if v.Allow != tc.allow || v.Credentials != tc.creds {
				t.Fatalf("Realm(%s) = %+v, want allow %v credentials %v", tc.realm, v, tc.allow, tc.creds)
			}
		})
	}
}

// listen returns a loopback listener that accepts and closes connections.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln
}

func TestDialer(t *testing.T) {
	ln := listen(t)
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	base := &net.Dialer{Timeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name    string
		trusted []string
		allow   func(netip.AddrPort) bool
		addr    string
		ok      bool
	}{
		{"untrusted loopback", nil, nil, "127.0.0.1:" + port, false},
		{"a name resolving to loopback", nil, nil, "localhost:" + port, false},
		{"trusted endpoint", []string{"127.0.0.1:" + port}, nil, "127.0.0.1:" + port, true},
		{"trusted name", []string{"LOCALHOST:" + port}, nil, "localhost:" + port, true},
		{"trusted host, other port", []string{"127.0.0.1:1"}, nil, "127.0.0.1:" + port, false},
		{"test seam", nil, func(netip.AddrPort) bool { return true }, "127.0.0.1:" + port, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := NewDialer(base, tc.trusted, tc.allow)
			c, err := d.DialContext(ctx, "tcp", tc.addr)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
				return
			}
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			if !errors.Is(err, ErrDenied) {
				t.Fatalf("err = %v, want ErrDenied", err)
			}
		})
	}
}
