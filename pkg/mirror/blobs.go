package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/node-mirror/node-mirror/internal/countwriter"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

const blobContentType = "application/octet-stream"

// unknownLengthStep is how much room a download without Content-Length asks for at a time.
const unknownLengthStep = 8 << 20

func (m *Mirror) serveBlob(w http.ResponseWriter, r *http.Request, rt route) {
	if m.serveStoredBlob(w, r, rt, "") {
		return
	}
	if r.Method == http.MethodHead {
		m.headBlob(w, r, rt)
		return
	}
	d := m.joinDownload(rt, false)
	if d == nil { // committed between our look and the join
		if !m.serveStoredBlob(w, r, rt, "") {
			m.fail(w, r, rt, contentstore.ErrNotFound)
		}
		return
	}
	defer d.release()
	select {
	case <-d.ready:
	case <-r.Context().Done():
		return
	}
	switch {
	case errors.Is(d.startErr, errCommitted):
		if !m.serveStoredBlob(w, r, rt, "") {
			m.fail(w, r, rt, contentstore.ErrNotFound)
		}
		return
	case isNoStore(d.startErr):
		m.passThrough(w, r, rt, d.startErr)
		return
	case d.startErr != nil:
		m.fail(w, r, rt, d.startErr)
		return
	}
	win, streamable := requestedWindow(r, d.size, `"`+rt.digest.String()+`"`)
	if d.size < 0 || !streamable || win.start == win.end {
		// Without a length there is no honest Content-Length to promise while streaming;
		// several ranges are net/http's job; an empty answer would be complete before the
		// blob verified. Wait for the verified blob instead.
		m.serveWhenStored(w, r, rt, d)
		return
	}
	noteResult(r.Context(), ResultMiss)
	m.count(ResultMiss)
	w.Header().Set(cacheHeader, ResultMiss)
	fr := &followReader{d: d, ctx: r.Context(), pos: win.start, end: win.end,
		flush: func() { http.NewResponseController(w).Flush() }}
	fr.fallback = func(pos int64) (io.ReadCloser, error) {
		// The disk filled up under the download: finish this response from upstream.
		m.notePassThrough(r.Context(), rt, errNoSpace)
		return m.continueUpstream(r.Context(), rt, d, pos, win.end)
	}
	defer fr.close()
	setWindowHeaders(w, rt.digest.String(), d.size, win)
	w.WriteHeader(win.status())
	if _, err := io.Copy(w, fr); err != nil || fr.pos != win.end {
		// The bytes so far may be wrong, or the client left. Abort the connection so the
		// client sees a short body rather than a clean end.
		panic(http.ErrAbortHandler)
	}
}

// serveWhenStored waits for the download to commit, then answers from the store; a
// download that could not be stored is passed through (nothing was sent yet).
func (m *Mirror) serveWhenStored(w http.ResponseWriter, r *http.Request, rt route, d *download) {
	err := d.wait(r.Context())
	if isNoStore(err) {
		m.passThrough(w, r, rt, err)
		return
	}
	if err != nil {
		m.fail(w, r, rt, err)
		return
	}
	if !m.serveStoredBlob(w, r, rt, ResultMiss) {
		m.fail(w, r, rt, contentstore.ErrNotFound)
	}
}

// serveStoredBlob answers from the store when the blob is there. ServeContent of an
// *os.File handles Range and HEAD and lets the kernel send the bytes (sendfile). result
// is what the request counts as; "" means a hit, unless eager fetching brought the blob
// in for this very pull.
func (m *Mirror) serveStoredBlob(w http.ResponseWriter, r *http.Request, rt route, result string) bool {
	// Pinned before it is opened, so eviction cannot take it between the two.
	m.store.Pin(rt.digest)
	defer m.store.Unpin(rt.digest)
	f, size, err := m.store.OpenBlob(rt.digest)
	if err != nil {
		return false
	}
	defer f.Close()
	if result == "" {
		result = ResultHit
		if m.takeEager(rt.digest) {
			result = ResultMiss // fetched from upstream for this very pull, just ahead of it
		}
	}
	noteResult(r.Context(), result)
	m.count(result)
	if result == ResultHit {
		m.store.Touch(rt.digest)
	}
	w.Header().Set(cacheHeader, result)
	setContentHeaders(w, blobContentType, rt.digest.String(), size)
	cw := countwriter.New(w)
	http.ServeContent(cw, r, "", time.Time{}, f)
	if result == ResultHit {
		m.stats.cacheBytes.Add(cw.N)
	}
	return true
}

// headBlob answers HEAD for a blob we do not hold from the download in flight or from
// upstream's HEAD, without fetching the body.
func (m *Mirror) headBlob(w http.ResponseWriter, r *http.Request, rt route) {
	m.mu.Lock()
	d := m.downloads[rt.digest.String()]
	m.mu.Unlock()
	if d != nil {
		select {
		case <-d.ready:
			if d.startErr == nil && d.size >= 0 {
				noteResult(r.Context(), ResultMiss)
				setContentHeaders(w, blobContentType, rt.digest.String(), d.size)
				w.WriteHeader(http.StatusOK)
				return
			}
		default:
		}
	}
	resp, err := rt.client.Do(r.Context(), upstream.Request{
		Method: http.MethodHead, Repo: rt.repo, Path: "blobs/" + rt.digest.String(),
	})
	if err != nil {
		m.fail(w, r, rt, err)
		return
	}
	resp.Body.Close()
	noteResult(r.Context(), ResultMiss)
	if resp.ContentLength < 0 {
		// No length to report; a client that needs one asks with GET.
		w.Header().Set("Docker-Content-Digest", rt.digest.String())
		w.Header().Set("Content-Type", blobContentType)
		w.WriteHeader(http.StatusOK)
		return
	}
	setContentHeaders(w, blobContentType, rt.digest.String(), resp.ContentLength)
	w.WriteHeader(http.StatusOK)
}

// followReader reads [pos, end) of a download in progress, waiting for bytes as they
// arrive. It never hands out the last byte of its window before the download has been
// verified and committed: a client can only see a complete response of verified bytes.
type followReader struct {
	d        *download
	ctx      context.Context
	flush    func()
	pos, end int64

	// fallback continues from pos when the download failed for want of disk space.
	fallback func(pos int64) (io.ReadCloser, error)
	alt      io.ReadCloser
}

func (f *followReader) close() {
	if f.alt != nil {
		f.alt.Close()
	}
}

func (f *followReader) Read(p []byte) (int, error) {
	d := f.d
	if f.pos >= f.end {
		return 0, io.EOF
	}
	if f.alt != nil {
		n, err := f.alt.Read(p)
		f.pos += int64(n)
		return n, err
	}
	for {
		d.mu.Lock()
		avail, done, err, ch := d.availableLocked(f.pos), d.done, d.err, d.changed
		d.mu.Unlock()
		if done && errors.Is(err, errNoSpace) && f.fallback != nil {
			alt, ferr := f.fallback(f.pos)
			if ferr != nil {
				return 0, fmt.Errorf("blob %s: %w (continuing from upstream: %w)", d.dgst, err, ferr)
			}
			f.alt = alt
			return f.Read(p)
		}
		if done && err != nil {
			return 0, fmt.Errorf("blob %s: %w", d.dgst, err)
		}
		limit := min(avail, f.end)
		if !done {
			limit = min(avail, f.end-1) // hold back the window's final byte until verified
		}
		if f.pos < limit {
			n := min(int64(len(p)), limit-f.pos)
			got, rerr := d.readAt(p[:n], f.pos)
			f.pos += int64(got)
			if got > 0 {
				return got, nil
			}
			if rerr != nil {
				return 0, rerr
			}
		}
		f.flush() // let the client have what it has before we sleep
		select {
		case <-ch:
		case <-f.ctx.Done():
			return 0, f.ctx.Err()
		}
	}
}
