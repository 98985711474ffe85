package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/node-mirror/node-mirror/pkg/upstream/netguard"
)

// fakeRegistry answers like docker-registry with token auth: 401 with a challenge naming
// the configured realm unless the request has a token, and for a blob the bytes (ranges
// honoured) with a Location built from Host, as distribution builds its URLs.
func fakeRegistry(t *testing.T, blob []byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ") {
			w.Header().Set("Www-Authenticate", fmt.Sprintf(`Bearer realm=%q,service=%q,scope="repository:bench/x:pull"`, realmPlaceholder, tokenService))
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		w.Header().Set("X-Location", "http://"+r.Host+"/v2/bench/x/blobs/uploads/1")
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(blob)))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// TestFrontRealmOnEndpoint is the regression test for the benchmark's token service: a
// client that reaches the upstream through a throttle must be sent to a realm on that
// same host:port, which node-mirror's realm rule (netguard.Realm) allows, and get a token
// there; everything else passes through, ranges and the client's Host included.
func TestFrontRealmOnEndpoint(t *testing.T) {
	blob := []byte(strings.Repeat("0123456789", 1000))
	ts, err := newTokenServer()
	if err != nil {
		t.Fatal(err)
	}
	f, err := newFront(fakeRegistry(t, blob), ts, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	th, err := newThrottle(f.Addr(), 0, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()
	endpoint := &url.URL{Scheme: "http", Host: th.Addr()}
	cl := newClient(2)
	defer closeClient(cl)
	ctx := context.Background()

	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, endpoint.String()+"/v2/", nil)
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ch := parseChallenge(resp.Header.Get("Www-Authenticate"))
	if resp.StatusCode != http.StatusUnauthorized || ch["realm"] == "" {
		t.Fatalf("GET /v2/: %s with challenge %q, want 401 with a realm", resp.Status, resp.Header.Get("Www-Authenticate"))
	}
	realm, err := url.Parse(ch["realm"])
	if err != nil {
		t.Fatal(err)
	}
	if v := netguard.Realm(endpoint, realm, nil); !v.Allow {
		t.Fatalf("node-mirror would refuse realm %s for endpoint %s: %s", realm, endpoint, v.Reason)
	}
	if ch["service"] != tokenService || ch["scope"] != "repository:bench/x:pull" {
		t.Errorf("challenge lost its other parameters: %q", resp.Header.Get("Www-Authenticate"))
	}

	// The whole dance, and a range through it.
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, endpoint.String()+"/v2/bench/x/blobs/sha256:x", nil)
	resp, err = getWithToken(ctx, cl, req.URL.String())
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(got) != string(blob) {
		t.Fatalf("blob with a token: %s, %d bytes, want 200 with the blob", resp.Status, len(got))
	}
	if loc := resp.Header.Get("X-Location"); !strings.HasPrefix(loc, "http://"+th.Addr()+"/") {
		t.Errorf("the registry saw another Host than the client's: built %q", loc)
	}
	req.Header.Set("Authorization", "Bearer x")
	req.Header.Set("Range", "bytes=10-19")
	resp, err = cl.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent || string(got) != string(blob[10:20]) {
		t.Errorf("range: %s %q, want 206 %q", resp.Status, got, blob[10:20])
	}
	if th.down.Load() == 0 {
		t.Error("the throttle counted nothing")
	}
}

func TestParseChallenge(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want map[string]string
	}{
		{`Bearer realm="http://a/token",service="reg",scope="repository:x/y:pull,push"`,
			map[string]string{"realm": "http://a/token", "service": "reg", "scope": "repository:x/y:pull,push"}},
		{`bearer Realm="r", service=plain`, map[string]string{"realm": "r", "service": "plain"}},
		{`Basic realm="r"`, map[string]string{}},
		{``, map[string]string{}},
		{`Bearer realm="unterminated`, map[string]string{}},
	} {
		got := parseChallenge(tc.in)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("parseChallenge(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
