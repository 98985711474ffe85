package testenv

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"
)

// RFCRanges makes blob GETs with a Range header answer as registries' storage does (RFC
// 9110, http.ServeContent): a range past the end is clamped, "bytes=N-" and suffix ranges
// work. go-containerregistry's test registry answers a range past the end with 416 and
// knows only closed ranges, which no production registry does. Other requests pass.
//
// A single satisfiable range is rewritten into the closed range the registry serves
// itself, so the blob streams from its store; only other ranges (several, or none that
// can be satisfied) are answered from a copy of the whole blob.
func RFCRanges(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rng := r.Header.Get("Range")
		if r.Method != http.MethodGet || rng == "" || !strings.Contains(r.URL.Path, "/blobs/sha256:") {
			next.ServeHTTP(w, r)
			return
		}
		if start, end, ok := closedRange(next, r, rng); ok {
			closed := r.Clone(r.Context())
			closed.Header.Set("Range", "bytes="+strconv.FormatInt(start, 10)+"-"+strconv.FormatInt(end, 10))
			w.Header().Set("Accept-Ranges", "bytes")
			w.Header().Set("Content-Type", "application/octet-stream")
			next.ServeHTTP(w, closed)
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

// closedRange turns rng, one range of the blob r asks for, into the first and last byte
// http.ServeContent would send, asking next (with a HEAD) for the blob's size. It reports
// false for anything else: several ranges, a malformed or unsatisfiable one, a blob next
// does not have.
func closedRange(next http.Handler, r *http.Request, rng string) (start, end int64, ok bool) {
	spec, ok := strings.CutPrefix(rng, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	first, last, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, 0, false
	}
	head := r.Clone(r.Context())
	head.Method = http.MethodHead
	head.Header.Del("Range")
	rec := httptest.NewRecorder()
	next.ServeHTTP(rec, head)
	size, err := strconv.ParseInt(rec.Header().Get("Content-Length"), 10, 64)
	if rec.Code != http.StatusOK || err != nil || size <= 0 {
		return 0, 0, false
	}
	if first == "" { // the last n bytes
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n <= 0 {
			return 0, 0, false
		}
		return max(size-n, 0), size - 1, true
	}
	start, err = strconv.ParseInt(first, 10, 64)
	if err != nil || start < 0 || start >= size {
		return 0, 0, false
	}
	end = size - 1
	if last != "" {
		e, err := strconv.ParseInt(last, 10, 64)
		if err != nil || e < start {
			return 0, 0, false
		}
		end = min(e, size-1)
	}
	return start, end, true
}
