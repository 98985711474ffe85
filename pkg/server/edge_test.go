package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/mirror"
)

// raw sends one request exactly as written (Host line included or not) and returns the
// answer's status and error code, if any.
func raw(t *testing.T, addr, request string) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte(request)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%q: %v", request, err)
	}
	defer resp.Body.Close()
	var env wire.Envelope
	json.NewDecoder(resp.Body).Decode(&env)
	code := ""
	if len(env.Errors) > 0 {
		code = env.Errors[0].Code
	}
	return resp.StatusCode, code
}

// serveSide runs a side listener of e's server on loopback and returns its address.
func serveSide(t *testing.T, s *Server, listen string, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	side := s.Side(listen, h)
	go side.Serve(ln)
	t.Cleanup(func() { side.Close() })
	return ln.Addr().String()
}

func debugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	return mux
}

// TestHostCheckOnLoopback: a DNS-rebinding page makes a browser send
// "Host: rebind.attacker.example" to 127.0.0.1. On a loopback listener such requests are
// refused on every path and side listener; loopback names and addresses pass.
func TestHostCheckOnLoopback(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.Admin = admin.Handler(o.Mirror.(*mirror.Mirror), nil, nil) })
	main := strings.TrimPrefix(e.url, "http://")
	metricsSide := serveSide(t, e.srv, "127.0.0.1:0", e.srv.opts.MetricsHandler)
	debugSide := serveSide(t, e.srv, "[::1]:0", debugHandler())
	targets := []struct{ name, addr, path string }{
		{"v2", main, "/v2/"},
		{"admin", main, "/admin/status"},
		{"metrics", main, "/metrics"},
		{"metrics-listen", metricsSide, "/metrics"},
		{"debug-listen", debugSide, "/debug/pprof/"},
	}
	for _, tc := range []struct {
		host string // "-" sends no Host line (HTTP/1.0)
		ok   bool
	}{
		{"rebind.attacker.example", false},
		{"rebind.attacker.example:5000", false},
		{"localhost.attacker.example", false},
		{"127.0.0.1.nip.io:5000", false},
		{"0.0.0.0:5000", false},
		{"10.0.0.1:5000", false},
		{"[fe80::1]:5000", false},
		{"127.0.0.1:5000", true},
		{"127.0.0.1", true},
		{"127.3.2.1:80", true},
		{"[::1]:5000", true},
		{"[::1]", true},
		{"[::ffff:127.0.0.1]:5000", true},
		{"localhost", true},
		{"LOCALHOST:5000", true},
		{"localhost.:5000", true},
		{"registry.localhost:5000", true},
		{"-", true},
	} {
		for _, tg := range targets {
			req := "GET " + tg.path + " HTTP/1.1\r\nHost: " + tc.host + "\r\nConnection: close\r\n\r\n"
			if tc.host == "-" {
				req = "GET " + tg.path + " HTTP/1.0\r\n\r\n"
			}
			status, code := raw(t, tg.addr, req)
			if tc.ok && status != http.StatusOK {
				t.Errorf("%s, Host %q: %d %s, want 200", tg.name, tc.host, status, code)
			}
			if !tc.ok && (status != http.StatusMisdirectedRequest || code != "DENIED") {
				t.Errorf("%s, Host %q: %d %s, want 421 DENIED", tg.name, tc.host, status, code)
			}
		}
	}
	// Probes may name the node however they like: health says nothing worth reading.
	if status, _ := raw(t, main, "GET /readyz HTTP/1.1\r\nHost: rebind.attacker.example\r\n\r\n"); status != 200 {
		t.Errorf("readyz with a foreign Host: %d", status)
	}
	// The absolute form names the host in the request line, and that is what counts.
	if status, _ := raw(t, main, "GET http://rebind.attacker.example/v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); status != http.StatusMisdirectedRequest {
		t.Errorf("absolute-form request for another host: %d", status)
	}
}

// TestNoHostCheckBeyondLoopback: a listener beyond loopback is protected by client auth
// (CheckExposure), not by names: clients reach it under any name the operator chose.
func TestNoHostCheckBeyondLoopback(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.Listen = "0.0.0.0:5000" })
	if status, _ := raw(t, strings.TrimPrefix(e.url, "http://"), "GET /v2/ HTTP/1.1\r\nHost: mirror.example:5000\r\n\r\n"); status != 200 {
		t.Fatalf("Host check applied beyond loopback: %d", status)
	}
}

// TestMetricsNeedClientAuth: with client auth on, /metrics on the main port and on
// --metrics-listen needs the same credentials as pulls; so does pprof.
func TestMetricsNeedClientAuth(t *testing.T) {
	tokens, err := LoadTokenFile(writeFile(t, "tokens", "s3cr3t-token\n"))
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(o *Options) { o.Auth = tokens })
	side := serveSide(t, e.srv, "127.0.0.1:0", e.srv.opts.MetricsHandler)
	debug := serveSide(t, e.srv, "127.0.0.1:0", debugHandler())
	for _, u := range []string{e.url + "/metrics", "http://" + side + "/metrics", "http://" + debug + "/debug/pprof/"} {
		for _, c := range []struct {
			token string
			want  int
		}{{"", 401}, {"nope", 401}, {"s3cr3t-token", 200}} {
			req, _ := http.NewRequest(http.MethodGet, u, nil)
			if c.token != "" {
				req.Header.Set("Authorization", "Bearer "+c.token)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != c.want {
				t.Errorf("%s with token %q: %d, want %d", u, c.token, resp.StatusCode, c.want)
			}
		}
	}
}

// countingCompare wraps bcrypt's compare to count concurrent calls; calls for passwords
// other than good wait for gate, so a flood holds its slots while the test looks.
type countingCompare struct {
	good        string
	gate        chan struct{}
	calls       atomic.Int32
	now, peak   atomic.Int32
	peakMu      sync.Mutex
	goodCompare atomic.Int32
}

func (c *countingCompare) compare(hash, pw []byte) error {
	c.calls.Add(1)
	n := c.now.Add(1)
	defer c.now.Add(-1)
	c.peakMu.Lock()
	if n > c.peak.Load() {
		c.peak.Store(n)
	}
	c.peakMu.Unlock()
	if string(pw) == c.good {
		c.goodCompare.Add(1)
	} else {
		<-c.gate
	}
	return bcrypt.CompareHashAndPassword(hash, pw)
}

func htpasswd(t *testing.T, users ...string) *HtpasswdAuth {
	t.Helper()
	var b strings.Builder
	for _, u := range users {
		name, pw, _ := strings.Cut(u, ":")
		h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s:%s\n", name, h)
	}
	a, err := LoadHtpasswd(writeFile(t, "htpasswd", b.String()))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestBcryptFloodIsCapped: a flood of wrong Basic passwords in parallel runs at most
// MaxChecks bcrypt verifications at once; the rest are answered 429 with Retry-After at
// once instead of queueing, and a client whose credentials were verified before the
// flood still gets in while it lasts.
func TestBcryptFloodIsCapped(t *testing.T) {
	users := htpasswd(t, "node:pw")
	const maxChecks, flood = 2, 32
	users.MaxChecks = maxChecks
	cc := &countingCompare{good: "pw", gate: make(chan struct{})}
	users.compare = cc.compare
	e := newEnv(t, func(o *Options) { o.Auth = users })
	// Registered after newEnv, so it runs before the server's shutdown waits for the
	// requests held at the gate, also when the test fails early.
	var openGate sync.Once
	t.Cleanup(func() { openGate.Do(func() { close(cc.gate) }) })
	url := e.url + "/v2/"
	get := func(user, pw string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.SetBasicAuth(user, pw)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			return 0, ""
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("Retry-After")
	}
	if s, _ := get("node", "pw"); s != 200 {
		t.Fatalf("good credentials before the flood: %d", s)
	}

	results := make(chan int, flood)
	for i := range flood {
		user := "node"
		if i%2 == 1 {
			user = fmt.Sprintf("nobody-%d", i) // unknown users cost a bcrypt run too
		}
		go func() {
			s, retry := get(user, fmt.Sprintf("wrong-%d", i))
			if s == http.StatusTooManyRequests && retry == "" {
				t.Error("429 without Retry-After")
			}
			results <- s
		}()
	}
	// Everything beyond the cap is answered while the cap's worth of checks still run.
	got := map[int]int{}
	deadline := time.After(30 * time.Second)
	for range flood - maxChecks {
		select {
		case s := <-results:
			got[s]++
		case <-deadline:
			t.Fatalf("only %v answered while %d checks ran: requests over the cap are queued", got, cc.now.Load())
		}
	}
	if got[http.StatusTooManyRequests] != flood-maxChecks {
		t.Fatalf("during the flood: %v, want %d answered 429", got, flood-maxChecks)
	}
	if n := cc.now.Load(); n != maxChecks {
		t.Fatalf("%d checks running, want the cap of %d", n, maxChecks)
	}
	goodBefore := cc.goodCompare.Load()
	if s, _ := get("node", "pw"); s != 200 {
		t.Fatalf("cached good credentials during the flood: %d", s)
	}
	if cc.goodCompare.Load() != goodBefore {
		t.Fatal("cached credentials were checked with bcrypt again")
	}
	openGate.Do(func() { close(cc.gate) })
	for range maxChecks {
		if s := <-results; s != http.StatusUnauthorized {
			t.Fatalf("a wrong password that got a slot: %d, want 401", s)
		}
	}
	if p := cc.peak.Load(); p > maxChecks {
		t.Fatalf("%d bcrypt checks ran at once, cap %d", p, maxChecks)
	}
}

// TestConcurrentLoginsShareOneCheck: an engine's first parallel layer requests carry the
// same new credentials; they share one bcrypt run instead of being refused by the cap.
func TestConcurrentLoginsShareOneCheck(t *testing.T) {
	users := htpasswd(t, "node:pw")
	users.MaxChecks = 1
	cc := &countingCompare{good: "pw"}
	users.compare = cc.compare
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, _ := http.NewRequest(http.MethodGet, "/v2/", nil)
			r.SetBasicAuth("node", "pw")
			if err := users.Authenticate(r); err != nil {
				t.Errorf("good credentials: %v", err)
			}
		}()
	}
	wg.Wait()
	if n := cc.calls.Load(); n != 1 {
		t.Fatalf("%d bcrypt runs for one set of credentials", n)
	}
}

// TestVerifiedCacheKeyAndBound: the cache key separates user from password
// unambiguously, and the cache stays bounded however many users log in.
func TestVerifiedCacheKeyAndBound(t *testing.T) {
	a := htpasswd(t, "a:b")
	if a.credentialKey("a\x00b", "c") == a.credentialKey("a", "b\x00c") {
		t.Fatal("two different credentials share a cache key")
	}
	if b := htpasswd(t, "a:b"); b.credentialKey("a", "b") == a.credentialKey("a", "b") {
		t.Fatal("cache keys do not depend on a per-process secret")
	}
	a.compare = func([]byte, []byte) error { return nil }
	for i := range 3 * maxVerified {
		user := fmt.Sprintf("user%d", i)
		a.users[user] = []byte("x")
		if err := a.verify(a.credentialKey(user, "pw"), user, "pw"); err != nil {
			t.Fatal(err)
		}
		if len(a.verified) > maxVerified {
			t.Fatalf("%d cached credentials, bound %d", len(a.verified), maxVerified)
		}
	}
	// An entry expires.
	a.verified[a.credentialKey("a", "b")] = time.Now().Add(-time.Second)
	if a.cached(a.credentialKey("a", "b")) {
		t.Fatal("an expired entry still counts")
	}
}
