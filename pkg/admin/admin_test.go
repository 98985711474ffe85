package admin

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

func newAdmin(t *testing.T) *httptest.Server {
	t.Helper()
	store, err := contentstore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	// The admin API never reaches upstream; the registry is only there to make a mirror.
	cl, err := upstream.New("docker.io", []string{"http://127.0.0.1:1"}, "", "", upstream.Options{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mirror.New(mirror.Options{Store: store, Registries: map[string]*upstream.Client{"docker.io": cl}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(Handler(m, nil, nil))
	t.Cleanup(func() {
		srv.Close()
		m.Close()
	})
	return srv
}

// TestHandlerAnswers: JSON for what exists, the OCI error envelope for everything else.
func TestHandlerAnswers(t *testing.T) {
	srv := newAdmin(t)
	for _, tc := range []struct {
		method, path string
		status       int
		code         string // error code, "" for a JSON answer
		allow        string
	}{
		{"GET", "/admin/status", 200, "", ""},
		{"POST", "/admin/gc?dry_run=true", 200, "", ""},
		{"GET", "/admin/gc", 405, "UNSUPPORTED", "POST"},
		{"DELETE", "/admin/status", 405, "UNSUPPORTED", "GET"},
		{"GET", "/admin/nothing", 404, "NOT_FOUND", ""},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var env wire.Envelope
		decodeErr := json.NewDecoder(resp.Body).Decode(&env)
		resp.Body.Close()
		if resp.StatusCode != tc.status || resp.Header.Get("Content-Type") != "application/json" || decodeErr != nil {
			t.Errorf("%s %s: %d %q %v", tc.method, tc.path, resp.StatusCode, resp.Header.Get("Content-Type"), decodeErr)
			continue
		}
		if tc.code != "" && (len(env.Errors) != 1 || env.Errors[0].Code != tc.code || resp.Header.Get("Allow") != tc.allow) {
			t.Errorf("%s %s: %+v, Allow %q", tc.method, tc.path, env, resp.Header.Get("Allow"))
		}
	}
}

func TestClient(t *testing.T) {
	srv := newAdmin(t)
	c := &Client{URL: srv.URL + "/"}
	st, err := c.Status(context.Background())
	if err != nil || st.Source != "daemon" || st.Mirror == nil {
		t.Fatalf("status: %+v, %v", st, err)
	}
	rep, err := c.GC(context.Background(), true)
	if err != nil || !rep.DryRun {
		t.Fatalf("gc: %+v, %v", rep, err)
	}
	// An error answer reaches the user as its code and message.
	denied := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wire.Write(w, r, wire.Unauthorized)
	}))
	defer denied.Close()
	_, err = (&Client{URL: denied.URL}).Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "UNAUTHORIZED: authentication required") {
		t.Fatalf("error answer: %v", err)
	}
}
