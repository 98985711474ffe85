package testenv

import (
	"net/http"
	"sync/atomic"
	"time"
)

// PacedWriter passes a response body on in pieces of at most 32 KiB, at most Rate bytes
// a second from its first Write (0: unpaced), adding what it wrote to Sent. It embeds
// only http.ResponseWriter's methods, so http.ServeContent cannot bypass Write through
// io.ReaderFrom. Test upstreams use it to count what they send and to make a download
// last long enough to act in the middle of it.
type PacedWriter struct {
	http.ResponseWriter
	Rate int64
	Sent *atomic.Int64

	start time.Time
	n     int64
}

func (w *PacedWriter) Write(p []byte) (int, error) {
	if w.start.IsZero() {
		w.start = time.Now()
	}
	written := 0
	for len(p) > 0 {
		n, err := w.ResponseWriter.Write(p[:min(len(p), 32<<10)])
		written += n
		w.n += int64(n)
		w.Sent.Add(int64(n))
		if err != nil {
			return written, err
		}
		p = p[n:]
		if w.Rate > 0 {
			if ahead := time.Duration(float64(w.n)/float64(w.Rate)*float64(time.Second)) - time.Since(w.start); ahead > 0 {
				time.Sleep(ahead)
			}
		}
	}
	return written, nil
}

// Flush passes on to the response, for handlers that flush what they wrote (the fault
// injector does).
func (w *PacedWriter) Flush() { http.NewResponseController(w.ResponseWriter).Flush() }
