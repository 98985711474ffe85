package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/countwriter"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

const blobContentType = "application/octet-stream"

func (m *Mirror) serveBlob(w http.ResponseWriter, r *http.Request, rt route) {
	if m.serveStoredBlob(w, r, rt) {
		return
	}
	if r.Method == http.MethodHead {
		m.headBlob(w, r, rt)
		return
	}
	d := m.joinDownload(rt, false)
	if d == nil { // committed between our look and the join
		if !m.serveStoredBlob(w, r, rt) {
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
		if !m.serveStoredBlob(w, r, rt) {
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
	if d.size < 0 {
		// Without a length there is no honest Content-Length to promise while streaming;
		// wait for the verified blob instead.
		err := d.wait(r.Context())
		if isNoStore(err) {
			m.passThrough(w, r, rt, err) // nothing was sent yet
			return
		}
		if err != nil {
			m.fail(w, r, rt, err)
			return
		}
		if !m.serveStoredBlob(w, r, rt) {
			m.fail(w, r, rt, contentstore.ErrNotFound)
			return
		}
		noteResult(r.Context(), ResultMiss)
		return
	}
	noteResult(r.Context(), ResultMiss)
	m.count(ResultMiss)
	w.Header().Set(cacheHeader, ResultMiss)
	fr := &followReader{d: d, ctx: r.Context(), flush: func() { http.NewResponseController(w).Flush() }}
	fr.fallback = func(pos int64) (io.ReadCloser, error) {
		// The disk filled up under the download: finish this response from upstream.
		m.notePassThrough(r.Context(), rt, errNoSpace)
		return m.continueUpstream(r.Context(), rt, d, pos)
	}
	setContentHeaders(w, blobContentType, rt.digest.String(), d.size)
	http.ServeContent(w, r, "", time.Time{}, fr)
	fr.close()
	if fr.failed {
		// The bytes so far may be wrong. Abort the connection so the client sees a short
		// body rather than a clean end.
		panic(http.ErrAbortHandler)
	}
}

// serveStoredBlob answers from the store when the blob is there. ServeContent of an
// *os.File handles Range and HEAD and lets the kernel send the bytes (sendfile).
func (m *Mirror) serveStoredBlob(w http.ResponseWriter, r *http.Request, rt route) bool {
	// Pinned before it is opened, so eviction cannot take it between the two.
	m.store.Pin(rt.digest)
	defer m.store.Unpin(rt.digest)
	f, size, err := m.store.OpenBlob(rt.digest)
	if err != nil {
		return false
	}
	defer f.Close()
	result := ResultHit
	if m.takeEager(rt.digest) {
		result = ResultMiss // fetched from upstream for this very pull, just ahead of it
	}
	noteResult(r.Context(), result)
	m.count(result)
	m.store.Touch(rt.digest)
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

// download is the one upstream fetch of a blob. Every client asking for the blob while it
// runs reads the ingest file as it grows, so the upstream is asked once, however many
// clients there are, and the fetch continues when the client that started it leaves.
type download struct {
	dgst  digest.Digest
	ready chan struct{} // closed when size and ingest are known, or startErr is set

	// Set before ready is closed, read-only after.
	size     int64
	startErr error
	ingest   *contentstore.Ingest

	res *contentstore.Reservation // room promised for the blob; nil when size is unknown

	mu      sync.Mutex
	written int64
	done    bool
	err     error         // why the download failed; nil with done means committed
	changed chan struct{} // closed and replaced on every change, to wake readers
	refs    int           // the downloader and each reader; the ingest closes at zero
	asked   bool          // a client asked for it (not only eager fetching)
	store   *contentstore.Store
}

// joinDownload returns the download of rt.digest, starting it if none runs, with a
// reference the caller must release. It returns nil if the blob is already committed.
func (m *Mirror) joinDownload(rt route, eager bool) *download {
	key := rt.digest.String()
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.downloads[key]; d != nil {
		d.mu.Lock()
		d.refs++
		d.asked = d.asked || !eager
		d.mu.Unlock()
		return d
	}
	// A download that finished after the caller's store lookup has left the map.
	if _, err := m.store.Size(rt.digest); err == nil {
		return nil
	}
	d := &download{dgst: rt.digest, ready: make(chan struct{}), size: -1, changed: make(chan struct{}), refs: 2, store: m.store, asked: !eager}
	m.store.Pin(rt.digest) // until the last reader is gone; see release
	m.downloads[key] = d
	m.opts.Metrics.DownloadStarted()
	m.wg.Add(1)
	rt.policy.hold() // the download outlives the request, and keeps using rt.client
	go m.runDownload(d, rt)
	return d
}

func (m *Mirror) runDownload(d *download, rt route) {
	defer m.wg.Done()
	defer rt.policy.release()
	err := m.fetchBlob(d, rt)
	if isNoStore(err) {
		m.log.Debug("blob not stored", "registry", rt.registry, "repo", rt.repo, "digest", d.dgst, "err", err)
	} else if err != nil {
		m.log.Warn("blob download failed", "registry", rt.registry, "repo", rt.repo, "digest", d.dgst, "err", err)
	}
	// Leave the map first: from here on new clients find the blob in the store.
	m.mu.Lock()
	delete(m.downloads, d.dgst.String())
	d.mu.Lock()
	if err == nil && !d.asked {
		m.noteEagerLocked(d.dgst)
	}
	d.mu.Unlock()
	m.mu.Unlock()
	d.finish(err)
	d.release()
	m.opts.Metrics.DownloadDone()
}

func (m *Mirror) fetchBlob(d *download, rt route) error {
	ctx := m.ctx
	started := false
	start := func(err error) error {
		if !started {
			started = true
			d.startErr = err
			close(d.ready)
		}
		return err
	}
	in, resp, err := m.openBlob(ctx, rt, d.dgst)
	if err != nil {
		return start(err)
	}
	defer resp.Body.Close()
	size := resp.size
	if size >= 0 {
		res, err := m.store.Reserve(ctx, size)
		if err != nil {
			// Over budget with everything left in use, or the disk cannot take it: this
			// blob goes to its clients without being stored.
			in.Abort()
			in.Close()
			return start(fmt.Errorf("%w: %w", errNoRoom, err))
		}
		d.res = res
		defer res.Release() // after the commit, which moved the bytes into the usage
		res.Wrote(in.Offset)
	}
	d.size = size
	d.ingest = in
	d.mu.Lock()
	d.written = in.Offset // a resumed ingest already holds these bytes
	d.mu.Unlock()
	start(nil)

	buf := make([]byte, 256<<10)
	written := in.Offset
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := in.Write(buf[:n]); werr != nil {
				in.Abort()
				if isDiskFull(werr) {
					werr = fmt.Errorf("%w: %w", errNoSpace, werr)
				}
				return fmt.Errorf("writing ingest: %w", werr)
			}
			written += int64(n)
			d.res.Wrote(int64(n))
			m.opts.Metrics.Fetched(rt.registry, n)
			d.progress(written)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			in.Abort()
			return fmt.Errorf("reading blob from %s after %d bytes: %w", rt.registry, written, rerr)
		}
	}
	if size >= 0 && written != size {
		in.Abort()
		return fmt.Errorf("blob %s: upstream sent %d of %d bytes: %w", d.dgst, written, size, errContentMismatch)
	}
	if err := in.Commit(ctx, written); err != nil {
		if errdefs.IsFailedPrecondition(err) {
			err = fmt.Errorf("%w: %w", errContentMismatch, err)
		} else if isDiskFull(err) {
			err = fmt.Errorf("%w: %w", errNoSpace, err)
		}
		return err
	}
	if err := m.store.RecordBlob(d.dgst, "", written, rt.registry+"/"+rt.repo); err != nil {
		// The blob is committed and verified; only its metadata is missing.
		m.log.Warn("recording blob metadata", "digest", d.dgst, "err", err)
	}
	return nil
}

// blobResponse is an upstream blob body, positioned where the ingest continues.
type blobResponse struct {
	Body io.ReadCloser
	size int64 // the whole blob's size, -1 if unknown
}

// openBlob opens the ingest for a download and the upstream body to fill it. An ingest a
// crash left behind is resumed with a range request; only a 206 whose Content-Range
// continues exactly where the ingest ends is accepted. Anything else discards the
// ingest and starts from zero. The bytes kept from before the crash are verified with
// the rest at commit, so a damaged leftover can fail a download, never pass as a blob.
func (m *Mirror) openBlob(ctx context.Context, rt route, dgst digest.Digest) (*contentstore.Ingest, *blobResponse, error) {
	in, err := m.store.NewIngest(ctx, dgst, 0)
	if errdefs.IsAlreadyExists(err) {
		return nil, nil, errCommitted
	}
	if err != nil {
		if isDiskFull(err) {
			err = fmt.Errorf("%w: %w", errNoSpace, err)
		}
		return nil, nil, err
	}
	get := func(hdr http.Header) (*http.Response, error) {
		return rt.client.Do(ctx, upstream.Request{
			Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + dgst.String(), Header: hdr,
		})
	}
	if in.Offset > 0 {
		resp, err := get(http.Header{"Range": {fmt.Sprintf("bytes=%d-", in.Offset)}})
		var se *upstream.StatusError
		switch {
		case err == nil:
			if total, ok := continuesAt(resp, in.Offset); ok {
				m.log.Info("resuming blob download", "digest", dgst, "offset", in.Offset, "size", total)
				return in, &blobResponse{Body: resp.Body, size: total}, nil
			}
			resp.Body.Close()
		case errors.As(err, &se) && se.Status == http.StatusRequestedRangeNotSatisfiable:
		default:
			in.Leave() // keep the leftover for a later resume
			in.Close()
			return nil, nil, err
		}
		m.log.Info("upstream cannot resume, starting over", "digest", dgst, "offset", in.Offset)
		in.Abort()
		in.Close()
		if in, err = m.store.NewIngest(ctx, dgst, 0); err != nil {
			return nil, nil, err
		}
		if in.Offset != 0 {
			in.Close()
			return nil, nil, fmt.Errorf("ingest for %s not reset", dgst)
		}
	}
	resp, err := get(nil)
	if err != nil {
		in.Abort()
		in.Close()
		return nil, nil, err
	}
	return in, &blobResponse{Body: resp.Body, size: resp.ContentLength}, nil
}

// continuesAt checks a ranged answer: 206 with Content-Range "bytes <offset>-<total-1>/<total>".
func continuesAt(resp *http.Response, offset int64) (int64, bool) {
	if resp.StatusCode != http.StatusPartialContent {
		return 0, false
	}
	var first, last, total int64
	if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &first, &last, &total); err != nil {
		return 0, false
	}
	if first != offset || last != total-1 || total <= offset {
		return 0, false
	}
	if resp.ContentLength >= 0 && resp.ContentLength != total-offset {
		return 0, false
	}
	return total, true
}

func (d *download) progress(written int64) {
	d.mu.Lock()
	d.written = written
	close(d.changed)
	d.changed = make(chan struct{})
	d.mu.Unlock()
}

func (d *download) finish(err error) {
	d.mu.Lock()
	d.done = true
	d.err = err
	close(d.changed)
	d.changed = make(chan struct{})
	d.mu.Unlock()
}

func (d *download) release() {
	d.mu.Lock()
	d.refs--
	last := d.refs == 0
	d.mu.Unlock()
	if !last {
		return
	}
	if d.ingest != nil {
		d.ingest.Close()
	}
	d.store.Unpin(d.dgst)
}

// wait blocks until the download is over and returns why it failed, if it did.
func (d *download) wait(ctx context.Context) error {
	for {
		d.mu.Lock()
		done, err, ch := d.done, d.err, d.changed
		d.mu.Unlock()
		if done {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// followReader is an io.ReadSeeker over a download in progress, so http.ServeContent can
// answer Range and HEAD on it. It never hands out the last byte before the digest has
// been verified: a client can only see a complete response of verified bytes.
type followReader struct {
	d      *download
	ctx    context.Context
	flush  func()
	pos    int64
	failed bool

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
	if f.pos >= d.size {
		return 0, io.EOF
	}
	if f.alt != nil {
		n, err := f.alt.Read(p)
		f.pos += int64(n)
		if err != nil && err != io.EOF {
			f.failed = true
		}
		return n, err
	}
	for {
		d.mu.Lock()
		written, done, err, ch := d.written, d.done, d.err, d.changed
		d.mu.Unlock()
		if done && errors.Is(err, errNoSpace) && f.fallback != nil {
			alt, ferr := f.fallback(f.pos)
			if ferr != nil {
				f.failed = true
				return 0, fmt.Errorf("blob %s: %w (continuing from upstream: %w)", d.dgst, err, ferr)
			}
			f.alt = alt
			return f.Read(p)
		}
		if done && err != nil {
			f.failed = true
			return 0, fmt.Errorf("blob %s: %w", d.dgst, err)
		}
		limit := written
		if !done {
			limit = min(written, d.size-1) // hold back the final byte until verified
		}
		if f.pos < limit {
			n := int64(len(p))
			if n > limit-f.pos {
				n = limit - f.pos
			}
			got, rerr := d.ingest.ReaderAt().ReadAt(p[:n], f.pos)
			f.pos += int64(got)
			if got > 0 {
				return got, nil
			}
			if rerr != nil {
				f.failed = true
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

func (f *followReader) Seek(offset int64, whence int) (int64, error) {
	if f.alt != nil {
		return 0, errors.New("seek after switching to upstream")
	}
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += f.pos
	case io.SeekEnd:
		offset += f.d.size
	}
	if offset < 0 {
		return 0, errors.New("seek before start")
	}
	f.pos = offset
	return offset, nil
}
