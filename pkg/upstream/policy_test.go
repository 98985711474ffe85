package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/upstream/netguard"
)

// hostile is a server of the test's own that records what reached it: connections
// accepted, and the credentials (Authorization header or a password in a token POST)
// sent to it.
type hostile struct {
	*httptest.Server
	accepts atomic.Int32
	mu      sync.Mutex
	creds   []string
	paths   []string
}

type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func newHostile(t *testing.T, tls bool, h http.HandlerFunc) *hostile {
	t.Helper()
	s := &hostile{}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.paths = append(s.paths, r.URL.Path)
		if a := r.Header.Get("Authorization"); a != "" && !strings.HasPrefix(a, "Bearer ") {
			s.creds = append(s.creds, a)
		}
		if r.Method == http.MethodPost {
			r.ParseForm()
			if p := r.PostForm.Get("password"); p != "" {
				s.creds = append(s.creds, "password="+p)
			}
		}
		s.mu.Unlock()
		if h != nil {
			h(w, r)
		}
	}))
	s.Listener = countingListener{s.Listener, &s.accepts}
	if tls {
		s.StartTLS()
	} else {
		s.Start()
	}
	t.Cleanup(s.Close)
	return s
}

func (s *hostile) credsSeen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.creds...)
}

func (s *hostile) requests(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, p := range s.paths {
		if p == path {
			n++
		}
	}
	return n
}

func (s *hostile) addrPort() netip.AddrPort {
	return netip.MustParseAddrPort(s.Listener.Addr().String())
}

func (s *hostile) port() string { return fmt.Sprint(s.addrPort().Port()) }

// allowOnly is the AllowAddr test seam admitting exactly the given servers, as if they
// were public hosts: an https server in a test can only be on loopback.
func allowOnly(ss ...*hostile) func(netip.AddrPort) bool {
	return func(ap netip.AddrPort) bool {
		for _, s := range ss {
			if ap == s.addrPort() {
				return true
			}
		}
		return false
	}
}

// trustTestCA makes c trust httptest's TLS certificate.
func trustTestCA(t *testing.T, c *Client, s *hostile) {
	t.Helper()
	tr, ok := c.http.Transport.(*http.Transport)
	if !ok {
		t.Fatalf("transport is %T", c.http.Transport)
	}
	tr.TLSClientConfig = s.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
}

// basicThen answers 401 with a Basic challenge until bob's credentials come, then next.
func basicThen(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "bob" || p != "pw" {
			w.Header().Set("WWW-Authenticate", `Basic realm="r"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		next(w, r)
	}
}

func redirectTo(target func(r *http.Request) string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target(r), http.StatusTemporaryRedirect)
	}
}

func serveBlob(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "blob") }

var upstreamPaths = []struct{ method, path string }{
	{http.MethodGet, "manifests/latest"},
	{http.MethodHead, "manifests/latest"},
	{http.MethodGet, "blobs/sha256:" + strings.Repeat("a", 64)},
	{http.MethodGet, "tags/list"},
}

func do(t *testing.T, c *Client, method, path string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.Do(ctx, Request{Method: method, Repo: "library/app", Path: path})
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// A redirect from the configured endpoint that leads off it is refused, for every kind
// of request, unless it goes to https at a public address; the target sees no connection.
func TestRedirectsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		// setup returns the endpoint, and the server that must see no connection.
		setup func(t *testing.T) (endpoint string, victim *hostile, opts Options, tlsTrust *hostile)
	}{
		{"loopback, other port", func(t *testing.T) (string, *hostile, Options, *hostile) {
			victim := newHostile(t, false, serveBlob)
			ep := newHostile(t, false, basicThen(redirectTo(func(*http.Request) string {
				return "http://127.0.0.1:" + victim.port() + "/latest/meta-data/iam"
			})))
			return ep.URL, victim, Options{}, nil
		}},
		{"https to a name resolving to loopback", func(t *testing.T) (string, *hostile, Options, *hostile) {
			victim := newHostile(t, true, serveBlob)
			ep := newHostile(t, false, basicThen(redirectTo(func(*http.Request) string {
				return "https://localhost:" + victim.port() + "/x"
			})))
			return ep.URL, victim, Options{}, victim
		}},
		{"https endpoint to http", func(t *testing.T) (string, *hostile, Options, *hostile) {
			victim := newHostile(t, false, serveBlob)
			ep := newHostile(t, true, basicThen(redirectTo(func(*http.Request) string {
				return "http://127.0.0.1:" + victim.port() + "/x"
			})))
			// Even were the target a public host, https to http is a downgrade.
			return ep.URL, victim, Options{AllowAddr: allowOnly(victim)}, ep
		}},
		{"https hop back to the http endpoint", func(t *testing.T) (string, *hostile, Options, *hostile) {
			var victim *hostile
			cdn := newHostile(t, true, redirectTo(func(*http.Request) string { return victim.URL + "/back" }))
			victim = newHostile(t, false, basicThen(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/back" {
					serveBlob(w, r)
					return
				}
				http.Redirect(w, r, cdn.URL+"/x", http.StatusTemporaryRedirect)
			}))
			return victim.URL, victim, Options{AllowAddr: allowOnly(cdn)}, cdn
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			endpoint, victim, opts, tlsServer := tc.setup(t)
			c := newClient(t, []string{endpoint}, "bob", "pw", opts)
			if tlsServer != nil {
				trustTestCA(t, c, tlsServer)
			}
			before := victim.accepts.Load()
			for _, p := range upstreamPaths {
				body, err := do(t, c, p.method, p.path)
				if err == nil {
					t.Fatalf("%s %s: followed the redirect, got %q", p.method, p.path, body)
				}
				if !errors.Is(err, netguard.ErrDenied) {
					t.Fatalf("%s %s: err = %v, want a refusal", p.method, p.path, err)
				}
				if errors.Is(err, ErrNotFound) {
					t.Fatalf("%s %s: a refusal reads as not found", p.method, p.path)
				}
			}
			if endpoint == victim.URL {
				if n := victim.requests("/back"); n != 0 {
					t.Fatalf("the endpoint was reached over http after https %d times", n)
				}
			} else if n := victim.accepts.Load() - before; n != 0 {
				t.Fatalf("the redirect target accepted %d connections", n)
			}
			if got := victim.credsSeen(); endpoint != victim.URL && len(got) != 0 {
				t.Fatalf("credentials reached the redirect target: %q", got)
			}
		})
	}
}

// Redirects the registries need are followed: within the endpoint (credentials kept),
// and to an https CDN (credentials dropped, even on the same host name at another port,
// where Go itself would keep them).
func TestRedirectsFollowed(t *testing.T) {
	cdn := newHostile(t, true, serveBlob)
	var ep *hostile
	ep = newHostile(t, false, basicThen(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/storage/"):
			serveBlob(w, r)
		case strings.Contains(r.URL.Path, "/blobs/"):
			http.Redirect(w, r, "https://127.0.0.1:"+cdn.port()+"/cdn/blob", http.StatusTemporaryRedirect)
		case strings.HasSuffix(r.URL.Path, "/tags/list"):
			http.Redirect(w, r, ep.URL+"/storage/tags", http.StatusFound) // absolute, own
		default:
			http.Redirect(w, r, "/storage/x", http.StatusTemporaryRedirect) // relative, own
		}
	}))
	c := newClient(t, []string{ep.URL}, "bob", "pw", Options{AllowAddr: allowOnly(cdn)})
	trustTestCA(t, c, cdn)
	for _, p := range upstreamPaths {
		body, err := do(t, c, p.method, p.path)
		if err != nil {
			t.Fatalf("%s %s: %v", p.method, p.path, err)
		}
		if p.method == http.MethodGet && body != "blob" {
			t.Fatalf("%s %s: body %q", p.method, p.path, body)
		}
	}
	if n := cdn.requests("/cdn/blob"); n != 1 {
		t.Fatalf("CDN asked %d times, want 1", n)
	}
	if got := cdn.credsSeen(); len(got) != 0 {
		t.Fatalf("the CDN on another port received credentials: %q", got)
	}
}

func TestRedirectHopsBounded(t *testing.T) {
	var hops atomic.Int32
	ep := newHostile(t, false, func(w http.ResponseWriter, r *http.Request) {
		hops.Add(1)
		http.Redirect(w, r, fmt.Sprintf("/loop/%d", hops.Load()), http.StatusFound)
	})
	c := newClient(t, []string{ep.URL}, "", "", Options{})
	if _, err := do(t, c, http.MethodGet, "manifests/latest"); !errors.Is(err, netguard.ErrDenied) {
		t.Fatalf("err = %v, want a refusal", err)
	}
	if n := hops.Load(); n != maxRedirects+1 {
		t.Fatalf("%d requests, want %d (one, then %d redirects)", n, maxRedirects+1, maxRedirects)
	}
}

// tokenServer issues tokens and records who asked with what.
func tokenServer(t *testing.T, tls bool) *hostile {
	return newHostile(t, tls, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"token": "t0k3n", "access_token": "t0k3n"})
	})
}

// registryWithRealm wants "Bearer t0k3n" and names realm() in its challenges.
func registryWithRealm(t *testing.T, realm func() string) *hostile {
	return newHostile(t, false, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer t0k3n" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+realm()+`",service="example.io"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	})
}

func TestTokenRealms(t *testing.T) {
	for _, tc := range []struct {
		name      string
		tls       bool
		realm     func(ts *hostile) string
		allowed   bool // the realm may be used at all
		wantCreds bool // it receives the endpoint's password
		user      string
		trusted   func(ts *hostile) []string // Options.TrustedHosts
	}{
		{"http on another loopback port", false, func(ts *hostile) string { return ts.URL + "/token" }, false, false, "alice", nil},
		{"http on another port, even were it public", false, func(ts *hostile) string { return ts.URL + "/token" }, false, false, "alice", nil},
		{"https at a name resolving to loopback", true, func(ts *hostile) string { return "https://localhost:" + ts.port() + "/token" }, false, false, "alice", nil},
		{"https, public, with credentials (Docker Hub)", true, func(ts *hostile) string { return ts.URL + "/token" }, true, true, "alice", nil},
		{"https, public, anonymous", true, func(ts *hostile) string { return ts.URL + "/token" }, true, false, "", nil},
		// An on-premises token server on a private host, trusted by the operator.
		{"https at a name resolving to loopback, trusted", true, func(ts *hostile) string { return "https://localhost:" + ts.port() + "/token" }, true, true, "alice",
			func(ts *hostile) []string { return []string{"localhost:" + ts.port()} }},
		{"https at a loopback address, trusted", true, func(ts *hostile) string { return ts.URL + "/token" }, true, true, "alice",
			func(ts *hostile) []string { return []string{"127.0.0.1:" + ts.port()} }},
		{"https at a trusted name on another port", true, func(ts *hostile) string { return "https://localhost:" + ts.port() + "/token" }, false, false, "alice",
			func(ts *hostile) []string { return []string{"localhost"} }},
		{"http at a trusted host", false, func(ts *hostile) string { return ts.URL + "/token" }, false, false, "alice",
			func(ts *hostile) []string { return []string{"127.0.0.1:" + ts.port()} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := tokenServer(t, tc.tls)
			reg := registryWithRealm(t, func() string { return tc.realm(ts) })
			opts := Options{}
			if tc.trusted != nil {
				opts.TrustedHosts = tc.trusted(ts)
			} else if tc.allowed || strings.Contains(tc.name, "were it public") {
				opts.AllowAddr = allowOnly(ts)
			}
			pass := ""
			if tc.user != "" {
				pass = "s3cret"
			}
			c := newClient(t, []string{reg.URL}, tc.user, pass, opts)
			if tc.tls {
				trustTestCA(t, c, ts)
				if strings.Contains(tc.realm(ts), "//localhost:") {
					// httptest's certificate names example.com, not localhost.
					c.http.Transport.(*http.Transport).TLSClientConfig.ServerName = "example.com"
				}
			}
			body, err := do(t, c, http.MethodGet, "manifests/latest")
			if tc.allowed {
				if err != nil || body != "ok" {
					t.Fatalf("body %q, err %v", body, err)
				}
			} else {
				if err == nil {
					t.Fatal("the request succeeded through a refused realm")
				}
				if n := ts.accepts.Load(); n != 0 {
					t.Fatalf("the refused realm accepted %d connections", n)
				}
			}
			gotCreds := len(ts.credsSeen()) > 0
			if gotCreds != tc.wantCreds {
				t.Fatalf("realm received credentials %q, want any: %v", ts.credsSeen(), tc.wantCreds)
			}
		})
	}
}

// Registry-level credentials belong to the registry's own endpoint: a corporate mirror
// listed first does not receive them, and gets its own when configured.
func TestCredentialsPerEndpoint(t *testing.T) {
	for _, scheme := range []string{"basic", "bearer"} {
		for _, ownCreds := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/corp credentials %v", scheme, ownCreds), func(t *testing.T) {
				var corp *hostile
				corp = newHostile(t, false, func(w http.ResponseWriter, r *http.Request) {
					if r.URL.Path == "/token" {
						json.NewEncoder(w).Encode(map[string]any{"token": "corp"})
						return
					}
					if scheme == "basic" {
						w.Header().Set("WWW-Authenticate", `Basic realm="corp"`)
					} else {
						w.Header().Set("WWW-Authenticate", `Bearer realm="`+corp.URL+`/token"`)
					}
					w.WriteHeader(http.StatusUnauthorized)
				})
				own := newHostile(t, false, basicThen(serveBlob))
				// The registry's name is its own endpoint's host, as docker.io's is
				// registry-1.docker.io.
				name := strings.TrimPrefix(own.URL, "http://")
				opts := Options{BaseBackoff: time.Millisecond}
				if ownCreds {
					opts.EndpointCredentials = map[string]Credentials{strings.TrimPrefix(corp.URL, "http://"): {"corp", "corppw"}}
				}
				c, err := New(name, []string{corp.URL, own.URL}, "bob", "pw", opts)
				if err != nil {
					t.Fatal(err)
				}
				body, err := do(t, c, http.MethodGet, "blobs/sha256:"+strings.Repeat("b", 64))
				if err != nil || body != "blob" {
					t.Fatalf("body %q, err %v", body, err)
				}
				for _, cr := range corp.credsSeen() {
					if strings.Contains(cr, "pw") && !strings.Contains(cr, "corppw") || strings.Contains(cr, basicOf("bob", "pw")) {
						t.Fatalf("the corporate mirror received the registry's credentials: %q", cr)
					}
				}
				if ownCreds && len(corp.credsSeen()) == 0 {
					t.Fatal("the corporate mirror did not receive its own credentials")
				}
				if !ownCreds && len(corp.credsSeen()) != 0 {
					t.Fatalf("the corporate mirror received %q", corp.credsSeen())
				}
			})
		}
	}
}

func basicOf(u, p string) string {
	r, _ := http.NewRequest(http.MethodGet, "http://x", nil)
	r.SetBasicAuth(u, p)
	return r.Header.Get("Authorization")
}

func TestCredentialsNeedTheirEndpoint(t *testing.T) {
	for _, tc := range []struct {
		name      string
		registry  string
		endpoints []string
		user      string
		ep        map[string]Credentials
		ok        bool
	}{
		{"own endpoint listed second", "docker.io", []string{"https://mirror.corp", "https://registry-1.docker.io"}, "u", nil, true},
		{"the only endpoint", "docker.io", []string{"https://mirror.corp"}, "u", nil, true},
		{"no own endpoint", "docker.io", []string{"https://a.corp", "https://b.corp"}, "u", nil, false},
		{"per endpoint instead", "docker.io", []string{"https://a.corp", "https://b.corp"}, "", map[string]Credentials{"a.corp": {"x", "y"}, "b.corp:443": {"z", "w"}}, true},
		{"unknown endpoint host", "ghcr.io", []string{"https://ghcr.io"}, "", map[string]Credentials{"evil.example": {"x", "y"}}, false},
		{"host with the wrong port", "ghcr.io", []string{"https://ghcr.io"}, "", map[string]Credentials{"ghcr.io:80": {"x", "y"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pass := ""
			if tc.user != "" {
				pass = "p"
			}
			_, err := New(tc.registry, tc.endpoints, tc.user, pass, Options{EndpointCredentials: tc.ep})
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok %v", err, tc.ok)
			}
		})
	}
}

// 3000 repositories named by a client leave at most maxScopes tokens behind.
func TestTokenCacheBounded(t *testing.T) {
	const repos = 3000
	bigToken := strings.Repeat("t", 16<<10)
	var fetched atomic.Int32
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			fetched.Add(1)
			json.NewEncoder(w).Encode(map[string]any{"token": bigToken + r.URL.Query().Get("scope")})
			return
		}
		if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer "+bigToken) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="s"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	c := newClient(t, []string{srv.URL}, "", "", Options{})
	get := func(repo string) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		resp, err := c.Do(ctx, Request{Method: http.MethodHead, Repo: repo, Path: "manifests/latest"})
		if err != nil {
			t.Fatalf("%s: %v", repo, err)
		}
		resp.Body.Close()
	}
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	get("warm/up")
	before := heap()
	for i := 0; i < repos; i++ {
		get(fmt.Sprintf("r/%d", i))
	}
	after := heap()
	// Tokens are still reused within the bound.
	n := fetched.Load()
	get(fmt.Sprintf("r/%d", repos-1))
	if fetched.Load() != n {
		t.Fatal("a recent repository's token was fetched again")
	}
	c.mu.Lock()
	scopes := len(c.scopes)
	c.mu.Unlock()
	if scopes > maxScopes {
		t.Fatalf("the authorizer holds %d scopes, want at most %d", scopes, maxScopes)
	}
	// Unbounded, 3000 tokens of 16 KiB hold about 60 MiB; bounded, about 4 MiB.
	if grown := int64(after) - int64(before); grown > 24<<20 {
		t.Fatalf("heap grew by %d MiB over %d repositories", grown>>20, repos)
	}
}

// A token server cannot make the client hold an answer of any size.
func TestTokenResponseBounded(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			json.NewEncoder(w).Encode(map[string]any{"token": strings.Repeat("t", maxTokenResponse)})
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="s"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer srv.Close()
	c := newClient(t, []string{srv.URL}, "", "", Options{MaxAttempts: 1})
	if _, err := do(t, c, http.MethodGet, "manifests/latest"); err == nil || !strings.Contains(err.Error(), "too large") {
		t.Fatalf("err = %v, want the token response refused as too large", err)
	}
}

// What the config package accepts, New accepts: endpoint credentials name endpoints the
// same way, and a registry's default endpoint is its own endpoint.
func TestConfigAgrees(t *testing.T) {
	for _, name := range append([]string{"localhost:5000"}, config.DefaultRegistries...) {
		if own := OwnEndpoint(name, []string{"https://mirror.corp.example", config.DefaultEndpoint(name)}); own != 1 {
			t.Errorf("%s: the default endpoint %s is not its own", name, config.DefaultEndpoint(name))
		}
	}
	r := config.Registry{
		Name:      "docker.io",
		Endpoints: []string{"https://Mirror.corp.example", "http://[fd00::5]:5000", "https://registry-1.docker.io:443"},
		Username:  "hub", Password: "pw",
		EndpointCredentials: []config.EndpointCredentials{
			{Host: "mirror.corp.example:443", Username: "a", Password: "b"},
			{Host: "[fd00::5]:5000", Password: "c"},
		},
	}
	cfg := config.Default()
	cfg.Registries = []config.Registry{r}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	creds := map[string]Credentials{}
	for _, ec := range cfg.Registries[0].EndpointCredentials {
		creds[ec.Host] = Credentials{ec.Username, ec.Password}
	}
	if _, err := New(r.Name, r.Endpoints, r.Username, r.Password, Options{EndpointCredentials: creds}); err != nil {
		t.Fatal(err)
	}
}

// The environment's proxy is the operator's: it is dialled wherever it is, and the
// names behind it are the proxy's to resolve.
func TestProxyIsTrusted(t *testing.T) {
	proxy := newHostile(t, false, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "via proxy to "+r.URL.Host)
	})
	proxyURL, _ := url.Parse(proxy.URL)
	tr := NewTransport()
	tr.Proxy = func(*http.Request) (*url.URL, error) { return proxyURL, nil }
	ep, _ := url.Parse("https://registry.example")
	guard(tr, []*url.URL{ep}, nil, nil)
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("http://registry.example/v2/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if b, _ := io.ReadAll(resp.Body); string(b) != "via proxy to registry.example" {
		t.Fatalf("body %q", b)
	}
	// Without a proxy, the same loopback address is refused.
	tr = NewTransport()
	tr.Proxy = nil
	guard(tr, []*url.URL{ep}, nil, nil)
	if _, err := (&http.Client{Transport: tr}).Get(proxy.URL); !errors.Is(err, netguard.ErrDenied) {
		t.Fatalf("err = %v, want a refusal", err)
	}
}

// A redirect to a host the operator trusts (on-premises storage on a private address)
// is followed over https, without the endpoint's credentials; other hosts stay refused.
func TestRedirectToTrustedHost(t *testing.T) {
	storage := newHostile(t, true, serveBlob)
	other := newHostile(t, true, serveBlob)
	ep := newHostile(t, false, basicThen(func(w http.ResponseWriter, r *http.Request) {
		target := storage
		if strings.Contains(r.URL.Path, "/tags/") {
			target = other
		}
		http.Redirect(w, r, target.URL+"/blob", http.StatusTemporaryRedirect)
	}))
	c := newClient(t, []string{ep.URL}, "bob", "pw", Options{TrustedHosts: []string{"127.0.0.1:" + storage.port()}})
	trustTestCA(t, c, storage) // both servers share httptest's certificate
	if body, err := do(t, c, http.MethodGet, "blobs/sha256:"+strings.Repeat("a", 64)); err != nil || body != "blob" {
		t.Fatalf("redirect to the trusted host: body %q, err %v", body, err)
	}
	if got := storage.credsSeen(); len(got) != 0 {
		t.Fatalf("the trusted host received the endpoint's credentials: %q", got)
	}
	if _, err := do(t, c, http.MethodGet, "tags/list"); !errors.Is(err, netguard.ErrDenied) {
		t.Fatalf("redirect to an untrusted private host: err = %v, want a refusal", err)
	}
	if n := other.accepts.Load(); n != 0 {
		t.Fatalf("the untrusted host accepted %d connections", n)
	}
}

func TestTrustedHostsChecked(t *testing.T) {
	for _, h := range []string{"", "https://gitlab.corp", "gitlab.corp/jwt", "gitlab.corp:", "user@gitlab.corp", "gitlab.corp?x", "gitlab.corp:0", "gitlab.corp:99999",
		"fd00::7", "GitLab.corp", "gitlab.corp.", "gitlab..corp", "gitlab_corp", "10.0.0.07"} {
		if _, err := New("example.io", []string{"https://example.io"}, "", "", Options{TrustedHosts: []string{h}}); err == nil {
			t.Errorf("trusted host %q accepted", h)
		}
	}
	for _, h := range []string{"gitlab.corp", "gitlab.corp:8443", "10.0.0.7", "[fd00::7]:443"} {
		if _, err := New("example.io", []string{"https://example.io"}, "", "", Options{TrustedHosts: []string{h}}); err != nil {
			t.Errorf("trusted host %q: %v", h, err)
		}
	}
}
