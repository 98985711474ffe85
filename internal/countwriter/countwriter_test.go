package countwriter

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCounts(t *testing.T) {
	p := filepath.Join(t.TempDir(), "blob")
	os.WriteFile(p, []byte(strings.Repeat("x", 5000)), 0o644)
	var counted int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := New(w)
		f, _ := os.Open(p)
		defer f.Close()
		io.WriteString(cw, "head") // Write
		io.Copy(cw, f)             // ReadFrom, the sendfile path
		if err := http.NewResponseController(cw).Flush(); err != nil {
			t.Errorf("flush through Unwrap: %v", err)
		}
		counted = cw.N
	}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if len(b) != 5004 || counted != 5004 {
		t.Fatalf("sent %d, counted %d, want 5004", len(b), counted)
	}
}
