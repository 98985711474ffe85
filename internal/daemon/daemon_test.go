package daemon

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/server"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// loader is a configuration the test changes between reloads.
type loader struct {
	mu  sync.Mutex
	cfg config.Config
	err error
}

func (l *loader) load() (config.Config, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.cfg
	c.Registries = append([]config.Registry(nil), l.cfg.Registries...)
	if err := c.Validate(); err != nil {
		return c, err
	}
	return c, l.err
}

func (l *loader) set(f func(*config.Config), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f(&l.cfg)
	l.err = err
}

func testConfig(t *testing.T, upstreamURL string) config.Config {
	t.Helper()
	c := config.Default()
	c.Listen = "127.0.0.1:0"
	c.DataDir = t.TempDir()
	if err := c.SetUpstreams([]string{"docker.io=" + upstreamURL}); err != nil {
		t.Fatal(err)
	}
	return c
}

// newUpstream starts a registry holding a small random image under each repo:tag in
// repos, and returns its URL.
func newUpstream(t *testing.T, repos ...string) string {
	t.Helper()
	up := testenv.NewUpstream(t)
	for _, repoTag := range repos {
		repo, tag, _ := strings.Cut(repoTag, ":")
		up.PushRandomImage(repo, tag, 3, 1024)
	}
	return up.URL()
}

// reloads reads node_mirror_config_reloads_total{result} from a /metrics answer.
func reloads(t *testing.T, metricsURL, result string) float64 {
	t.Helper()
	resp, err := http.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	prefix := `node_mirror_config_reloads_total{result="` + result + `"} `
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", sc.Text(), err)
			}
			return f
		}
	}
	return 0
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func get(t *testing.T, url string) (int, wire.Envelope) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env wire.Envelope
	json.NewDecoder(resp.Body).Decode(&env)
	return resp.StatusCode, env
}

// TestRunReloadShutdown: the daemon binds port 0 and says where in the ready file;
// reloads apply max_manifest_size (and everything but listen and data_dir), a broken one
// changes nothing and is counted; shutdown closes every listener and the store.
func TestRunReloadShutdown(t *testing.T) {
	l := &loader{cfg: testConfig(t, newUpstream(t, "library/a:v1", "library/b:v1", "library/c:v1"))}
	ready := filepath.Join(t.TempDir(), "ready")
	d, err := New(Options{Load: l.load, ReadyFile: ready, MetricsListen: "127.0.0.1:0", DebugListen: "[::1]:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	metricsURL := "http://" + d.sides[0].ln.Addr().String() + "/metrics"
	debugAddr := d.sides[1].ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reload := make(chan os.Signal, 1)
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, reload) }()

	var addr string
	waitFor(t, "the ready file names the address", func() bool {
		b, err := os.ReadFile(ready)
		addr = strings.TrimSpace(string(b))
		return err == nil
	})
	if addr != d.Addr() || strings.HasSuffix(addr, ":0") {
		t.Fatalf("ready file says %q, daemon listens on %s", addr, d.Addr())
	}
	base := "http://" + addr + "/v2/library/"
	if s, env := get(t, base+"a/manifests/v1"); s != 200 {
		t.Fatalf("before reloads: %d %+v", s, env)
	}

	l.set(func(c *config.Config) { c.Cache.MaxManifestSize = 100; c.Listen = "127.0.0.1:1" }, nil)
	reload <- nil
	waitFor(t, "the reload is counted", func() bool { return reloads(t, metricsURL, "ok") == 1 })
	s, env := get(t, base+"b/manifests/v1")
	if s != http.StatusBadGateway || len(env.Errors) != 1 || !strings.Contains(env.Errors[0].Message, "100 bytes") {
		t.Fatalf("after max_manifest_size = 100: %d %+v", s, env)
	}
	if d.cfg.Listen != "127.0.0.1:0" {
		t.Fatalf("a reload changed the running listen address to %s", d.cfg.Listen)
	}

	l.set(func(*config.Config) {}, errors.New("config.toml:1:1: broken"))
	reload <- nil
	waitFor(t, "the broken reload is counted", func() bool { return reloads(t, metricsURL, "error") == 1 })
	if s, _ := get(t, base+"c/manifests/v1"); s != http.StatusBadGateway {
		t.Fatalf("a broken reload changed the running configuration: %d", s)
	}
	if reloads(t, metricsURL, "ok") != 1 {
		t.Fatal("the broken reload counted as ok")
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	for _, a := range []string{addr, debugAddr, strings.TrimSuffix(strings.TrimPrefix(metricsURL, "http://"), "/metrics")} {
		if c, err := net.Dial("tcp", a); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after shutdown", a)
		}
	}
	if _, err := os.Stat(ready); !os.IsNotExist(err) {
		t.Errorf("ready file left behind: %v", err)
	}
	s2, err := contentstore.Open(l.cfg.DataDir) // the lock is released
	if err != nil {
		t.Fatalf("data dir after shutdown: %v", err)
	}
	s2.Close()
}

// TestNewRefusesExposure: every listener follows the exposure rule, and the refusal
// comes before anything is bound or opened.
func TestNewRefusesExposure(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Options, *config.Config)
		want string
	}{
		{"public listen", func(o *Options, c *config.Config) { c.Listen = "0.0.0.0:0" }, "--listen"},
		{"public metrics", func(o *Options, c *config.Config) { o.MetricsListen = "0.0.0.0:0" }, "--metrics-listen"},
		{"public metrics with TLS only", func(o *Options, c *config.Config) {
			o.MetricsListen, o.TLSCert, o.TLSKey = "0.0.0.0:0", "cert.pem", "key.pem"
		}, "--metrics-listen"},
		{"public pprof even with TLS and auth", func(o *Options, c *config.Config) {
			o.DebugListen, o.TLSCert, o.TLSKey, o.Auth = "0.0.0.0:0", "cert.pem", "key.pem", allowAll{}
		}, "--debug-listen"},
		{"cert without key", func(o *Options, c *config.Config) { o.TLSCert = "cert.pem" }, "--tls-key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, "http://127.0.0.1:1")
			o := Options{Logger: quiet()}
			tc.mod(&o, &cfg)
			o.Load = (&loader{cfg: cfg}).load
			d, err := New(o)
			if err == nil {
				d.close()
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want it to name %s", err, tc.want)
			}
			if entries, _ := os.ReadDir(cfg.DataDir); len(entries) != 0 {
				t.Fatalf("the data dir was opened before the refusal: %v", entries)
			}
		})
	}
}

type allowAll struct{}

func (allowAll) Authenticate(*http.Request) error { return nil }
func (allowAll) Challenge() string                { return "Bearer" }

// TestNewCleansUpWhenASideListenerFails: a side listener that cannot bind leaves nothing
// behind: the main port is closed and the data dir unlocked.
func TestNewCleansUpWhenASideListenerFails(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg := testConfig(t, "http://127.0.0.1:1")
	// The ready file of a daemon already running: this one, failing, must leave it.
	ready := filepath.Join(t.TempDir(), "ready")
	if err := os.WriteFile(ready, []byte("127.0.0.1:5000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = New(Options{Load: (&loader{cfg: cfg}).load, MetricsListen: taken.Addr().String(), ReadyFile: ready, Logger: quiet()})
	if err == nil || !strings.Contains(err.Error(), "--metrics-listen") {
		t.Fatalf("binding a taken port: %v", err)
	}
	s, err := contentstore.Open(cfg.DataDir)
	if err != nil {
		t.Fatalf("the data dir stayed locked: %v", err)
	}
	s.Close()
	if _, err := os.Stat(ready); err != nil {
		t.Fatalf("a daemon that failed to start removed another's ready file: %v", err)
	}
}

// TestEagerFetchFromConfig: the config's number reaches the mirror as it is; 0 is off.
func TestEagerFetchFromConfig(t *testing.T) {
	for _, n := range []int{0, 1, 4} {
		c := config.Default()
		c.Cache.EagerFetch = n
		if got := mirrorOptions(c, nil).EagerFetch; got != n {
			t.Errorf("eager_fetch %d reached the mirror as %d", n, got)
		}
	}
	if got := mirrorOptions(config.Default(), nil).EagerFetch; got != 4 {
		t.Errorf("default eager_fetch reached the mirror as %d, want 4", got)
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns a client that
// trusts it.
func selfSigned(t *testing.T) (cert, key string, client *http.Client) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "node-mirror test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	leaf, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return cert, key, &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// TestSideListenersServeTLSAndNeedAuth: with TLS and client auth, the metrics listener
// speaks TLS like the main one and wants the same credentials.
func TestSideListenersServeTLSAndNeedAuth(t *testing.T) {
	cert, key, client := selfSigned(t)
	tokens := filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(tokens, []byte("s3cr3t\n"), 0o600)
	auth, err := server.LoadTokenFile(tokens)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, "http://127.0.0.1:1")
	d, err := New(Options{Load: (&loader{cfg: cfg}).load, Auth: auth, TLSCert: cert, TLSKey: key,
		MetricsListen: "127.0.0.1:0", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, nil) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	for _, u := range []string{"https://" + d.Addr() + "/v2/", "https://" + d.sides[0].ln.Addr().String() + "/metrics"} {
		for _, tc := range []struct {
			token string
			want  int
		}{{"", 401}, {"s3cr3t", 200}} {
			req, _ := http.NewRequest(http.MethodGet, u, nil)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("%s: %v", u, err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Errorf("%s with token %q: %d, want %d", u, tc.token, resp.StatusCode, tc.want)
			}
		}
		// Plain HTTP is not served there.
		plain := "http" + strings.TrimPrefix(u, "https")
		if resp, err := http.Get(plain); err == nil {
			resp.Body.Close()
			if resp.StatusCode < 400 {
				t.Errorf("%s answered %d over plain HTTP", plain, resp.StatusCode)
			}
		}
	}
}

// A reload names every key it cannot apply and keeps the running value: any [fleet] key,
// node_name included, takes effect on restart.
func TestReloadNamesRestartOnlyKeys(t *testing.T) {
	var logs bytes.Buffer
	var mu sync.Mutex
	l := &loader{cfg: testConfig(t, "http://127.0.0.1:1")}
	d, err := New(Options{Load: l.load, Logger: slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	l.set(func(c *config.Config) { c.Fleet.NodeName = "renamed" }, nil)
	if err := d.Reload(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	out := logs.String()
	mu.Unlock()
	if !strings.Contains(out, "take effect on restart") || !strings.Contains(out, "keys=[fleet]") {
		t.Fatalf("a changed fleet.node_name was not named as taking effect on restart:\n%s", out)
	}
	if d.cfg.Fleet.NodeName != "" {
		t.Fatalf("the running node name became %q", d.cfg.Fleet.NodeName)
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
