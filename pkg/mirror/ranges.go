package mirror

import (
	"net/http"
	"strconv"
	"strings"
)

// window is the part of a blob a response carries: [start, end).
type window struct {
	start, end int64
	partial    bool // a 206 for a Range request; false is the whole blob
}

// requestedWindow reads the request's Range against a blob of size bytes. ok is false for
// what the mirror does not stream itself (several ranges, a range it cannot parse or
// satisfy): those wait for the verified blob and get net/http's full Range handling from
// the store. A request without Range, or whose If-Range does not match, is the whole blob.
func requestedWindow(r *http.Request, size int64, etag string) (w window, ok bool) {
	whole := window{start: 0, end: size}
	h := r.Header.Get("Range")
	if h == "" || size < 0 {
		return whole, true
	}
	if ir := r.Header.Get("If-Range"); ir != "" && ir != etag {
		return whole, true
	}
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return window{}, false
	}
	first, last, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found {
		return window{}, false
	}
	if first == "" { // suffix: the last N bytes
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n <= 0 || size == 0 {
			return window{}, false
		}
		return window{start: max(0, size-n), end: size, partial: true}, true
	}
	start, err := strconv.ParseInt(first, 10, 64)
	if err != nil || start < 0 || start >= size {
		return window{}, false
	}
	end := size
	if last != "" {
		l, err := strconv.ParseInt(last, 10, 64)
		if err != nil || l < start {
			return window{}, false
		}
		end = min(size, l+1)
	}
	return window{start: start, end: end, partial: true}, true
}

// setWindowHeaders writes the headers of a blob response carrying w.
func setWindowHeaders(rw http.ResponseWriter, dgst string, size int64, w window) {
	setContentHeaders(rw, blobContentType, dgst, w.end-w.start)
	rw.Header().Set("Accept-Ranges", "bytes")
	if w.partial {
		rw.Header().Set("Content-Range", "bytes "+strconv.FormatInt(w.start, 10)+"-"+strconv.FormatInt(w.end-1, 10)+"/"+strconv.FormatInt(size, 10))
	}
}

func (w window) status() int {
	if w.partial {
		return http.StatusPartialContent
	}
	return http.StatusOK
}
