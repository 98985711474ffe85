package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/crypto/bcrypt"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/metrics"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

type env struct {
	srv      *Server
	url      string
	upstream *testenv.Upstream
	reg      *prometheus.Registry
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newEnv runs a real registry as upstream and the whole server in front of a mirror.
func newEnv(t *testing.T, mod func(*Options)) *env {
	t.Helper()
	up := testenv.NewUpstream(t)
	store, err := contentstore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	reg := prometheus.NewRegistry()
	met := metrics.New(reg, func() (int64, int) { b, n, _ := store.Usage(context.Background()); return b, n })
	cl, err := upstream.New("docker.io", []string{up.URL()}, "", "", upstream.Options{Observe: met.ObserveUpstream("docker.io")})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mirror.New(mirror.Options{Store: store, Registries: map[string]*upstream.Client{"docker.io": cl},
		DefaultRegistry: "docker.io", Logger: quiet(), Metrics: met})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	o := Options{Listen: "127.0.0.1:0", Mirror: m, Metrics: met, MetricsHandler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), Logger: quiet()}
	if mod != nil {
		mod(&o)
	}
	s := New(o)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	s.SetReady(true)
	t.Cleanup(func() { s.Shutdown(context.Background()) })
	return &env{srv: s, url: "http://" + ln.Addr().String(), upstream: up, reg: reg}
}

// push pushes a random image of two layers of layerSize bytes as repoTag (repo:tag).
func push(t *testing.T, e *env, repoTag string, layerSize int64) v1.Image {
	t.Helper()
	repo, tag, _ := strings.Cut(repoTag, ":")
	return e.upstream.PushRandomImage(repo, tag, 2, layerSize).Image
}

func pull(t *testing.T, e *env, repo string, opts ...remote.Option) error {
	t.Helper()
	ref, _ := name.ParseReference(strings.TrimPrefix(e.url, "http://")+"/"+repo, name.Insecure)
	img, err := remote.Image(ref, opts...)
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func status(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestHealthAndReadiness(t *testing.T) {
	e := newEnv(t, nil)
	if s := status(t, e.url+"/healthz"); s != 200 {
		t.Fatalf("healthz %d", s)
	}
	if s := status(t, e.url+"/readyz"); s != 200 {
		t.Fatalf("readyz %d", s)
	}
	// During shutdown readiness fails at once, while requests in flight are drained.
	e.srv.SetReady(true)
	done := make(chan struct{})
	go func() {
		e.srv.Shutdown(context.Background())
		close(done)
	}()
	<-done
	rec := httptest.NewRecorder()
	e.srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("readyz during shutdown: %d", rec.Code)
	}
	rec = httptest.NewRecorder()
	e.srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("healthz during shutdown: %d", rec.Code)
	}
}

func counter(t *testing.T, reg *prometheus.Registry, metric string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != metric {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			return m.Gauge.GetValue()
		}
	}
	return 0
}

// atLeast waits until a metric reaches want: the access middleware records a request
// after the handler returns, which may be just after the client read its last byte.
func atLeast(t *testing.T, reg *prometheus.Registry, metric string, labels map[string]string, want float64) float64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		v := counter(t, reg, metric, labels)
		if v >= want || time.Now().After(deadline) {
			return v
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMetricsMoveWithColdAndWarmPulls(t *testing.T) {
	e := newEnv(t, nil)
	img := push(t, e, "library/app:v1", 50<<10)
	layers, _ := img.Layers()
	var layerBytes int64
	for _, l := range layers {
		s, _ := l.Size()
		layerBytes += s
	}
	blob := map[string]string{"registry": "docker.io", "kind": "blob"}
	with := func(m map[string]string, k, v string) map[string]string {
		c := map[string]string{k: v}
		for a, b := range m {
			c[a] = b
		}
		return c
	}

	if err := pull(t, e, "library/app:v1"); err != nil {
		t.Fatal(err)
	}
	if n := atLeast(t, e.reg, "node_mirror_requests_total", with(blob, "result", "miss"), 2); n < 2 {
		t.Fatalf("cold pull: %v blob misses, want at least 2", n)
	}
	if n := counter(t, e.reg, "node_mirror_upstream_fetched_bytes_total", map[string]string{"registry": "docker.io"}); n < float64(layerBytes) {
		t.Fatalf("upstream bytes %v, want at least %d", n, layerBytes)
	}
	hitsBefore := counter(t, e.reg, "node_mirror_requests_total", with(blob, "result", "hit"))
	cacheBytesBefore := counter(t, e.reg, "node_mirror_served_bytes_total", map[string]string{"source": "cache"})

	if err := pull(t, e, "library/app:v1"); err != nil {
		t.Fatal(err)
	}
	if n := atLeast(t, e.reg, "node_mirror_requests_total", with(blob, "result", "hit"), hitsBefore+2) - hitsBefore; n < 2 {
		t.Fatalf("warm pull: %v blob hits, want at least 2", n)
	}
	if n := atLeast(t, e.reg, "node_mirror_served_bytes_total", map[string]string{"source": "cache"}, cacheBytesBefore+float64(layerBytes)) - cacheBytesBefore; n < float64(layerBytes) {
		t.Fatalf("warm pull served %v bytes from cache, want at least %d", n, layerBytes)
	}
	if n := counter(t, e.reg, "node_mirror_store_entries", nil); n < 3 { // manifest and two layers
		t.Fatalf("store entries %v", n)
	}
	// The exposition is what Prometheus scrapes.
	resp, err := http.Get(e.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if n, err := testutil.GatherAndCount(e.reg, "node_mirror_requests_total"); err != nil || n == 0 {
		t.Fatalf("requests series %d %v", n, err)
	}
	body, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(body), `node_mirror_requests_total{kind="blob",registry="docker.io",result="hit"}`) {
		t.Fatalf("scrape lacks the hit series:\n%.2000s", body)
	}
}

func TestClientAuth(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "tokens")
	os.WriteFile(tokenFile, []byte("# node tokens\ns3cr3t-token\n"), 0o600)
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("node:"+string(hash)+"\n"), 0o600)
	tokens, err := LoadTokenFile(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	users, err := LoadHtpasswd(htpasswd)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name       string
		auth       Authenticator
		good, bad  http.Header
		wantScheme string
	}{
		{"token", tokens, http.Header{"Authorization": {"Bearer s3cr3t-token"}}, http.Header{"Authorization": {"Bearer nope"}}, "Bearer"},
		{"htpasswd", users, basic("node", "pw"), basic("node", "wrong"), "Basic"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(o *Options) { o.Auth = tc.auth })
			push(t, e, "library/app:v1", 1024)
			url := e.url + "/v2/library/app/manifests/v1"
			for _, c := range []struct {
				h    http.Header
				want int
			}{{nil, 401}, {tc.bad, 401}, {tc.good, 200}, {tc.good, 200}} {
				req, _ := http.NewRequest(http.MethodGet, url, nil)
				for k, v := range c.h {
					req.Header[k] = v
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != c.want {
					t.Fatalf("auth %v: %d, want %d", c.h, resp.StatusCode, c.want)
				}
				if c.want == 401 && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), tc.wantScheme) {
					t.Fatalf("challenge %q", resp.Header.Get("WWW-Authenticate"))
				}
			}
			if n := atLeast(t, e.reg, "node_mirror_client_auth_failures_total", nil, 2); n != 2 {
				t.Fatalf("auth failures counted %v, want 2", n)
			}
			// Health stays reachable for probes without credentials.
			if s := status(t, e.url+"/healthz"); s != 200 {
				t.Fatalf("healthz behind auth: %d", s)
			}
		})
	}
}

func basic(u, p string) http.Header {
	r, _ := http.NewRequest(http.MethodGet, "/", nil)
	r.SetBasicAuth(u, p)
	return r.Header
}

func TestAuthFilesRejectBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ name, body string }{
		{"plain password", "node:secret\n"},
		{"md5", "node:$apr1$x$y\n"},
		{"no colon", "node\n"},
		{"empty", "# nothing\n"},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
		os.WriteFile(p, []byte(tc.body), 0o600)
		if _, err := LoadHtpasswd(p); err == nil {
			t.Errorf("htpasswd %s accepted", tc.name)
		}
	}
	empty := filepath.Join(dir, "tokens")
	os.WriteFile(empty, []byte("\n# none\n"), 0o600)
	if _, err := LoadTokenFile(empty); err == nil {
		t.Error("empty token file accepted")
	}
}

func TestCheckExposure(t *testing.T) {
	for _, flag := range []string{"listen", "metrics-listen"} {
		for _, tc := range []struct {
			listen              string
			tls, auth, insecure bool
			ok                  bool
		}{
			{"127.0.0.1:5000", false, false, false, true},
			{"[::1]:5000", false, false, false, true},
			{"localhost:5000", false, false, false, true},
			{"0.0.0.0:5000", false, false, false, false},
			{":5000", false, false, false, false},
			{"10.1.2.3:5000", true, false, false, false},
			{"10.1.2.3:5000", false, true, false, false},
			{"10.1.2.3:5000", true, true, false, true},
			{"0.0.0.0:5000", false, false, true, true},
			{"nonsense", false, false, false, false},
			// A name other than localhost can resolve anywhere, now or later.
			{"mirror.example:5000", false, false, false, false},
			{"127.0.0.1.nip.io:5000", false, false, false, false},
			// Browsers pin *.localhost to loopback; Go's resolver does not.
			{"mirror.localhost:5000", false, false, false, false},
		} {
			err := CheckExposure(flag, tc.listen, tc.tls, tc.auth, tc.insecure)
			if (err == nil) != tc.ok {
				t.Errorf("--%s %+v: err = %v", flag, tc, err)
			}
			if err != nil && !strings.Contains(err.Error(), "--"+flag) {
				t.Errorf("the refusal does not name --%s: %v", flag, err)
			}
		}
	}
}

// TestCheckDebugExposure: pprof beyond loopback only with the explicit insecure flag; TLS
// and client auth do not make profiles fit for the network.
func TestCheckDebugExposure(t *testing.T) {
	for _, tc := range []struct {
		listen   string
		insecure bool
		ok       bool
	}{
		{"127.0.0.1:6060", false, true},
		{"[::1]:6060", false, true},
		{"localhost:6060", false, true},
		{"0.0.0.0:6060", false, false},
		{":6060", false, false},
		{"10.1.2.3:6060", false, false},
		{"0.0.0.0:6060", true, true},
		{"nonsense", true, false},
		{"mirror.localhost:6060", false, false},
	} {
		if err := CheckDebugExposure(tc.listen, tc.insecure); (err == nil) != tc.ok {
			t.Errorf("%+v: err = %v", tc, err)
		}
	}
}

func TestOversizedRequestsRefused(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct {
		name string
		mod  func(*http.Request)
	}{
		{"header", func(r *http.Request) { r.Header.Set("X-Big", strings.Repeat("a", 200<<10)) }},
		{"url", func(r *http.Request) { r.URL.Path = "/v2/" + strings.Repeat("a/", 100<<10) + "manifests/x" }},
	} {
		req, _ := http.NewRequest(http.MethodGet, e.url+"/v2/", nil)
		tc.mod(req)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			continue // the server may cut the connection instead of answering; either way it is refused
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("oversized %s: %d", tc.name, resp.StatusCode)
		}
	}
}

// TestIdleConnectionFlood: thousands of connections that never send a request neither
// stop real requests nor stay open past the header timeout.
func TestIdleConnectionFlood(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.ReadHeaderTimeout = 500 * time.Millisecond })
	addr := strings.TrimPrefix(e.url, "http://")
	const n = 2000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	if s := status(t, e.url+"/v2/"); s != 200 {
		t.Fatalf("real request during the flood: %d", s)
	}
	// Each idle connection must be closed by the server.
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := bufio.NewReader(c).ReadByte(); err == nil {
			t.Fatalf("idle connection %d got data", i)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("idle connection %d still open after the header timeout", i)
		}
	}
}

// TestSlowReaderIsNotBuffered: clients that read a cold blob very slowly do not make the
// mirror hold the blob in memory; the bytes wait on disk.
func TestSlowReaderIsNotBuffered(t *testing.T) {
	e := newEnv(t, nil)
	img := push(t, e, "library/big:v1", 32<<20)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	const readers = 8
	conns := make([]net.Conn, readers)
	for i := range conns {
		c, err := net.Dial("tcp", strings.TrimPrefix(e.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /v2/library/big/blobs/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", ld)
		conns[i] = c
	}
	// Let the download finish while nobody reads.
	deadline := time.Now().Add(60 * time.Second)
	for counter(t, e.reg, "node_mirror_inflight_downloads", nil) != 0 || counter(t, e.reg, "node_mirror_upstream_fetched_bytes_total", nil) < float64(size) {
		if time.Now().After(deadline) {
			t.Fatal("download did not finish")
		}
		time.Sleep(50 * time.Millisecond)
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	// 8 readers x 32 MiB would be 256 MiB if buffered; allow ordinary noise.
	if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > 24<<20 {
		t.Fatalf("heap grew %d MiB with %d stalled readers of a 32 MiB blob", grew>>20, readers)
	}
	// And the slow readers still get the whole blob.
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(60 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		if err != nil || n != size {
			t.Fatalf("slow reader got %d bytes, %v", n, err)
		}
	}
}

// TestAdminBehindAuth: the admin API is served on the main port outside /v2/, and only to
// clients that pass the same authentication as pulls.
func TestAdminBehindAuth(t *testing.T) {
	tokens, err := LoadTokenFile(writeFile(t, "tokens", "s3cr3t-token\n"))
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(o *Options) {
		o.Auth = tokens
		o.Admin = admin.Handler(o.Mirror.(*mirror.Mirror), nil, nil)
	})
	for _, c := range []struct {
		method, path, token string
		want                int
	}{
		{"GET", "/admin/status", "", 401},
		{"POST", "/admin/gc?dry_run=true", "nope", 401},
		{"GET", "/admin/status", "s3cr3t-token", 200},
		{"POST", "/admin/gc?dry_run=true", "s3cr3t-token", 200},
		{"GET", "/admin/gc", "s3cr3t-token", 405},
	} {
		req, _ := http.NewRequest(c.method, e.url+c.path, nil)
		if c.token != "" {
			req.Header.Set("Authorization", "Bearer "+c.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s %s with token %q: %d, want %d", c.method, c.path, c.token, resp.StatusCode, c.want)
		}
	}
}

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
