package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func get(t *testing.T, c *Client, path string) (*http.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c.Do(ctx, Request{Method: http.MethodGet, Repo: "library/app", Path: path})
}

func newClient(t *testing.T, endpoints []string, user, pass string, o Options) *Client {
	t.Helper()
	if o.BaseBackoff == 0 {
		o.BaseBackoff = time.Millisecond
	}
	c, err := New("example.io", endpoints, user, pass, o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// tokenRegistry requires a bearer token from its own token endpoint; the token endpoint
// requires basic credentials when user is set, as Docker Hub does for private repos.
func tokenRegistry(t *testing.T, user, pass string) (*httptest.Server, *atomic.Int32) {
	var tokens atomic.Int32
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			if u, p, ok := r.BasicAuth(); user != "" && (!ok || u != user || p != pass) {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			if r.URL.Query().Get("scope") != "repository:library/app:pull" {
				http.Error(w, "bad scope "+r.URL.Query().Get("scope"), http.StatusBadRequest)
				return
			}
			tokens.Add(1)
			json.NewEncoder(w).Encode(map[string]any{"token": "t0k3n", "expires_in": 300})
			return
		}
		if r.Header.Get("Authorization") != "Bearer t0k3n" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="example.io"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	}))
	t.Cleanup(srv.Close)
	return srv, &tokens
}

func TestTokenAuth(t *testing.T) {
	for _, tc := range []struct {
		name       string
		user, pass string
	}{
		{"anonymous", "", ""},
		{"credentialed", "alice", "s3cret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, tokens := tokenRegistry(t, tc.user, tc.pass)
			c := newClient(t, []string{srv.URL}, tc.user, tc.pass, Options{})
			for i := 0; i < 3; i++ {
				resp, err := get(t, c, "manifests/v1")
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
			}
			if n := tokens.Load(); n != 1 {
				t.Fatalf("fetched %d tokens for 3 requests, want 1 (cached)", n)
			}
		})
	}
}

func TestTokenAuthWrongCredentials(t *testing.T) {
	srv, _ := tokenRegistry(t, "alice", "s3cret")
	c := newClient(t, []string{srv.URL}, "alice", "wrong", Options{})
	if _, err := get(t, c, "manifests/v1"); err == nil {
		t.Fatal("wrong credentials succeeded")
	}
}

func TestBasicAuth(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "bob" || p != "pw" {
			w.Header().Set("WWW-Authenticate", `Basic realm="r"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	c := newClient(t, []string{srv.URL}, "bob", "pw", Options{})
	resp, err := get(t, c, "manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}

func TestRetries(t *testing.T) {
	for _, tc := range []struct {
		name     string
		statuses []int // answered in turn, then 200
		header   string
		wantErr  bool
		wantReqs int32
	}{
		{"503 then ok", []int{503}, "", false, 2},
		{"429 with Retry-After then ok", []int{429}, "1", false, 2},
		{"500 three times", []int{500, 500, 500}, "", true, 3},
		{"Retry-After too long fails fast", []int{429}, "3600", true, 1},
		{"400 is not retried", []int{400}, "", true, 1},
		{"404 is not retried", []int{404}, "", true, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var reqs atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				n := int(reqs.Add(1))
				if n <= len(tc.statuses) {
					if tc.header != "" {
						w.Header().Set("Retry-After", tc.header)
					}
					w.WriteHeader(tc.statuses[n-1])
					return
				}
				io.WriteString(w, "ok")
			}))
			defer srv.Close()
			c := newClient(t, []string{srv.URL}, "", "", Options{MaxRetryAfter: 2 * time.Second})
			start := time.Now()
			resp, err := get(t, c, "manifests/v1")
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err == nil {
				resp.Body.Close()
			}
			if n := reqs.Load(); n != tc.wantReqs {
				t.Fatalf("%d requests, want %d", n, tc.wantReqs)
			}
			if tc.header == "1" && time.Since(start) < time.Second {
				t.Fatal("Retry-After: 1 was not waited for")
			}
			if tc.statuses[0] == 404 && !errors.Is(err, ErrNotFound) {
				t.Fatalf("404 gave %v, want ErrNotFound", err)
			}
			var se *StatusError
			if tc.statuses[0] == 429 && tc.wantErr && (!errors.As(err, &se) || se.RetryAfter != time.Hour) {
				t.Fatalf("429 gave %v, want StatusError with RetryAfter 1h", err)
			}
		})
	}
}

func TestEndpointFallback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	var notFound, good atomic.Int32
	nf := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		notFound.Add(1)
		w.WriteHeader(404)
	}))
	defer nf.Close()
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		good.Add(1)
		io.WriteString(w, "ok")
	}))
	defer ok.Close()

	c := newClient(t, []string{dead, nf.URL, ok.URL}, "", "", Options{})
	resp, err := get(t, c, "manifests/v1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if notFound.Load() != 1 || good.Load() != 1 {
		t.Fatalf("requests: 404 endpoint %d, good endpoint %d", notFound.Load(), good.Load())
	}

	// The last endpoint's answer decides: a corporate mirror's 404 with the registry down
	// is an outage (so callers may serve stale), not "not found".
	c = newClient(t, []string{nf.URL, dead}, "", "", Options{MaxAttempts: 1})
	if _, err := get(t, c, "manifests/v1"); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want a connection error", err)
	}
}

func TestStalledBodyIsAborted(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(200)
		w.Write([]byte(strings.Repeat("x", 10)))
		w.(http.Flusher).Flush()
		<-release
	}))
	defer srv.Close()
	defer close(release)
	c := newClient(t, []string{srv.URL}, "", "", Options{StallTimeout: 200 * time.Millisecond})
	resp, err := get(t, c, "blobs/x")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(resp.Body)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("stalled body ended without error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("stalled body was not aborted")
	}
}

func TestRetryAfterParsing(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want time.Duration
	}{
		{"", 0},
		{"5", 5 * time.Second},
		{"-1", 0},
		{"soon", 0},
		{time.Now().Add(time.Hour).UTC().Format(http.TimeFormat), time.Hour},
	} {
		got := retryAfter(http.Header{"Retry-After": {tc.v}})
		if got > tc.want || got < tc.want-2*time.Second {
			t.Errorf("Retry-After %q: %v, want about %v", tc.v, got, tc.want)
		}
	}
}

func TestBadEndpointRejected(t *testing.T) {
	for _, e := range []string{"ftp://x", "registry-1.docker.io", "http://"} {
		if _, err := New("x", []string{e}, "", "", Options{}); err == nil {
			t.Errorf("endpoint %q accepted", e)
		}
	}
}

// A token server outage must not outlive itself: containerd's authorizer caches a failed
// fetch, so the client has to forget it.
func TestTokenOutageRecovers(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			if failing.Load() {
				w.WriteHeader(http.StatusInternalServerError)
				return
			}
			json.NewEncoder(w).Encode(map[string]any{"token": "t"})
			return
		}
		if r.Header.Get("Authorization") != "Bearer t" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="s"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	c := newClient(t, []string{srv.URL}, "", "", Options{MaxAttempts: 1})
	if _, err := get(t, c, "manifests/v1"); err == nil {
		t.Fatal("succeeded while the token server fails")
	}
	failing.Store(false)
	resp, err := get(t, c, "manifests/v1")
	if err != nil {
		t.Fatalf("after the token server recovered: %v", err)
	}
	resp.Body.Close()
}
