package testenv

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"
)

// RFCRanges makes blob GETs with a Range header answer as registries' storage does (RFC
// 9110, http.ServeContent): a range past the end is clamped, "bytes=N-" and suffix ranges
// work. go-containerregistry's test registry answers a range past the end with 416 and
// knows only closed ranges, which no production registry does. Other requests pass.
func RFCRanges(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.Header.Get("Range") == "" || !strings.Contains(r.URL.Path, "/blobs/sha256:") {
			next.ServeHTTP(w, r)
			return
		}
		whole := r.Clone(r.Context())
		whole.Header.Del("Range")
		rec := httptest.NewRecorder()
		next.ServeHTTP(rec, whole)
		if rec.Code != http.StatusOK {
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(rec.Body.Bytes())
			return
		}
		w.Header().Set("Docker-Content-Digest", rec.Header().Get("Docker-Content-Digest"))
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(rec.Body.Bytes()))
	})
}
