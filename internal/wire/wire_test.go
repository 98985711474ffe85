package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestWrite(t *testing.T) {
	secret := errors.New("open /var/lib/node-mirror/secret: permission denied")
	for _, tc := range []struct {
		name       string
		method     string
		err        error
		status     int
		code, msg  string
		header     string // Retry-After
		wantNoBody bool
	}{
		{"registered", "GET", NameUnknown, 404, "NAME_UNKNOWN", NameUnknown.Message, "", false},
		{"wrapped", "GET", fmt.Errorf("routing: %w", BlobUnknown.With("no such blob")), 404, "BLOB_UNKNOWN", "no such blob", "", false},
		{"with header", "GET", TooManyRequests.WithHeader("Retry-After", "1"), 429, "TOOMANYREQUESTS", TooManyRequests.Message, "1", false},
		{"head", "HEAD", Unsupported, 405, "UNSUPPORTED", "", "", true},
		// A domain error's text may name paths or hosts: clients get UNKNOWN only.
		{"domain error", "GET", secret, 500, "UNKNOWN", Unknown.Message, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			Write(rec, httptest.NewRequest(tc.method, "/v2/x", nil), tc.err)
			if rec.Code != tc.status || rec.Header().Get("Content-Type") != "application/json" {
				t.Fatalf("status %d, content type %q", rec.Code, rec.Header().Get("Content-Type"))
			}
			if got := rec.Header().Get("Retry-After"); got != tc.header {
				t.Fatalf("Retry-After %q, want %q", got, tc.header)
			}
			if tc.wantNoBody {
				if rec.Body.Len() != 0 || rec.Header().Get("Content-Length") == "0" {
					t.Fatalf("HEAD: body %q, Content-Length %q", rec.Body, rec.Header().Get("Content-Length"))
				}
				return
			}
			var env Envelope
			if err := json.Unmarshal(rec.Body.Bytes(), &env); err != nil || len(env.Errors) != 1 {
				t.Fatalf("body %q: %v", rec.Body, err)
			}
			if e := env.Errors[0]; e.Code != tc.code || e.Message != tc.msg {
				t.Fatalf("got %+v, want %s %q", e, tc.code, tc.msg)
			}
			if strings.Contains(rec.Body.String(), "secret") {
				t.Fatalf("domain error text reached the client: %s", rec.Body)
			}
		})
	}
}

func TestDerivedErrorsLeaveTheRegisteredOnesAlone(t *testing.T) {
	e := TooManyRequests.WithHeader("Retry-After", "5").With("slow down").WithStatus(503)
	if TooManyRequests.Header != nil || TooManyRequests.Message != "too many requests" || TooManyRequests.Status != 429 {
		t.Fatalf("registered error changed: %+v", TooManyRequests)
	}
	if !errors.Is(fmt.Errorf("x: %w", NameUnknown.With("registry x is not mirrored here")), NameUnknown) {
		t.Fatal("a reworded NAME_UNKNOWN is not NAME_UNKNOWN")
	}
	if errors.Is(e, TooManyRequests) {
		t.Fatal("an error sent with another status matched the registered one")
	}
}

func TestJSON(t *testing.T) {
	rec := httptest.NewRecorder()
	JSON(rec, httptest.NewRequest(http.MethodGet, "/admin/status", nil), http.StatusOK, map[string]int{"a": 1})
	var v map[string]int
	if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &v) != nil || v["a"] != 1 {
		t.Fatalf("%d %q", rec.Code, rec.Body)
	}
	rec = httptest.NewRecorder()
	JSON(rec, httptest.NewRequest(http.MethodGet, "/", nil), http.StatusOK, func() {})
	if rec.Code != 500 || !strings.Contains(rec.Body.String(), "UNKNOWN") {
		t.Fatalf("unencodable value: %d %q", rec.Code, rec.Body)
	}
}
