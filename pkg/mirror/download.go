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

	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// download is the one upstream fetch of a blob. Every client asking for the blob while it
// runs reads the ingest file as it grows, so the upstream is asked once, however many
// clients there are, and the fetch continues when the client that started it leaves.
type download struct {
	dgst     digest.Digest
	registry string
	repo     string
	started  time.Time
	ready    chan struct{} // closed when size and ingest are known, or startErr is set

	// Set before ready is closed, read-only after.
	size     int64
	startErr error
	ingest   *contentstore.Ingest

	res *contentstore.Reservation // room promised for the blob

	mu      sync.Mutex
	written int64 // contiguous bytes in the ingest
	done    bool
	err     error         // why the download failed; nil with done means committed
	changed chan struct{} // closed and replaced on every change, to wake readers
	refs    int           // the downloader and each reader; the ingest closes at zero
	asked   bool          // a client asked for it (not only eager fetching)
	store   *contentstore.Store
	// A ranged fetch's parts past the first response, in blob order; nil for one stream.
	// The download holds chunks[assembled:]; those before are in the ingest.
	chunks    []*chunk
	assembled int
	conns     int // upstream connections the download holds now
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
	d := &download{
		dgst: rt.digest, registry: rt.registry, repo: rt.repo, started: time.Now(),
		ready: make(chan struct{}), size: -1, changed: make(chan struct{}), refs: 2, store: m.store, asked: !eager,
	}
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
	if errors.Is(err, errPeersWrong) && m.ctx.Err() == nil {
		// The clients of this download were cut; fetch the blob again, from upstream alone,
		// so that their retries find it, and so that the members who lied are found out.
		m.log.Warn("blob from members failed verification, fetching it from upstream", "registry", rt.registry, "digest", d.dgst)
		if again := m.joinDownload(rt, true); again != nil {
			again.release()
		}
	}
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
	if size, ok := m.fleetFetchable(ctx, rt, d.dgst); ok {
		return m.fetchBlobFleet(ctx, d, rt, size, start)
	}
	in, resp, err := m.openBlob(ctx, rt, d.dgst)
	if err != nil {
		return start(err)
	}
	defer resp.Body.Close()
	size := resp.size
	// A blob of unknown length reserves nothing up front and asks for room as its bytes
	// arrive, so an endless or oversized body stops at the budget instead of filling the disk.
	res, err := m.store.Reserve(ctx, max(size, 0))
	if err != nil {
		// Over budget with everything left in use, or the disk cannot take it: this
		// blob goes to its clients without being stored.
		in.Abort()
		in.Close()
		return start(fmt.Errorf("%w: %w", errNoRoom, err))
	}
	d.res = res
	defer res.Release() // after the commit, which moved the bytes into the usage
	if size < 0 && in.Offset > 0 {
		if err := res.Extend(ctx, in.Offset); err != nil {
			in.Abort()
			in.Close()
			return start(fmt.Errorf("%w: %w", errNoRoom, err))
		}
	}
	res.Wrote(in.Offset)
	d.ingest = in
	d.mu.Lock() // status reads size before ready is closed
	d.size = size
	d.written = in.Offset // a resumed ingest already holds these bytes
	d.mu.Unlock()
	start(nil)

	if size >= 0 && resp.end < size {
		err = m.fetchRanged(ctx, d, rt, resp)
	} else {
		err = m.fetchStream(ctx, d, rt, resp)
	}
	return m.commit(ctx, d, rt, err)
}

// commit ends a download whose bytes are all in the ingest (err nil) or that failed: it
// verifies and commits the blob, or discards the ingest.
func (m *Mirror) commit(ctx context.Context, d *download, rt route, err error) error {
	in := d.ingest
	if err != nil {
		in.Abort()
		return err
	}
	d.mu.Lock()
	written := d.written
	d.mu.Unlock()
	if d.size >= 0 && written != d.size {
		in.Abort()
		return fmt.Errorf("blob %s: upstream sent %d of %d bytes: %w", d.dgst, written, d.size, errContentMismatch)
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
	if m.opts.Fleet != nil {
		m.judgePeers(d.dgst)
	}
	return nil
}

// fetchBlobFleet is fetchBlob for a blob that goes through the fleet.
func (m *Mirror) fetchBlobFleet(ctx context.Context, d *download, rt route, size int64, start func(error) error) error {
	in, err := m.store.NewIngest(ctx, d.dgst, size)
	if errdefs.IsAlreadyExists(err) {
		return start(errCommitted)
	}
	if err != nil {
		if isDiskFull(err) {
			err = fmt.Errorf("%w: %w", errNoSpace, err)
		}
		return start(err)
	}
	if in.Offset > size {
		if in, err = m.restartIngest(ctx, in); err != nil {
			return start(err)
		}
	}
	res, err := m.store.Reserve(ctx, size)
	if err != nil {
		in.Abort()
		in.Close()
		m.forgetSize(d.dgst) // a manifest may have named a size far beyond the blob's
		return start(fmt.Errorf("%w: %w", errNoRoom, err))
	}
	d.res = res
	defer res.Release()
	res.Wrote(in.Offset)
	d.ingest = in
	d.mu.Lock() // status reads size before ready is closed
	d.size = size
	d.written = in.Offset
	d.mu.Unlock()
	start(nil)

	chunks := (size + m.opts.FetchChunkSize - 1) / m.opts.FetchChunkSize
	err = m.commit(ctx, d, rt, m.fetchFleet(ctx, d, rt))
	switch {
	case err == nil:
		m.chunks.drop(d.dgst, size, chunks) // the store serves members from now on
	case errors.Is(err, errContentMismatch) && m.suspectPeers(d):
		err = fmt.Errorf("%w: %w", errPeersWrong, err)
	case errors.Is(err, errContentMismatch):
		// Upstream's bytes were wrong: serve them to no member, whose refetch would then
		// blame this node for them.
		m.chunks.drop(d.dgst, size, chunks)
	case errors.Is(err, errBadRange):
		// Upstream's size is not the one a manifest named (any manifest of any registry
		// may name a digest): the next try asks upstream.
		m.forgetSize(d.dgst)
		m.chunks.drop(d.dgst, size, chunks)
	default:
		m.chunks.expire(d.dgst, size, chunks) // what arrived still serves members for a while
	}
	return err
}

// errPeersWrong: a blob with bytes from members failed verification; it is fetched again
// from upstream alone.
var errPeersWrong = errors.New("bytes from members failed verification")

// fetchStream copies one upstream body into the ingest: the whole blob (or the rest of a
// resumed one) on one connection.
func (m *Mirror) fetchStream(ctx context.Context, d *download, rt route, resp *blobResponse) error {
	release := m.holdConn(d, rt.registry)
	defer release()
	buf := make([]byte, 256<<10)
	d.mu.Lock()
	written := d.written
	d.mu.Unlock()
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 && d.size < 0 && written+int64(n) > d.res.Size() {
			if err := d.res.Extend(ctx, max(int64(n), unknownLengthStep)); err != nil {
				return fmt.Errorf("%w: blob %s of unknown length after %d bytes: %w", errNoRoom, d.dgst, written, err)
			}
		}
		if n > 0 {
			if err := d.appendIngest(buf[:n]); err != nil {
				return err
			}
			written += int64(n)
			m.opts.Metrics.Fetched(rt.registry, n)
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return fmt.Errorf("reading blob from %s after %d bytes: %w", rt.registry, written, rerr)
		}
	}
}

// appendIngest writes the next bytes of the blob to the ingest and tells readers.
func (d *download) appendIngest(p []byte) error {
	if _, err := d.ingest.Write(p); err != nil {
		if isDiskFull(err) {
			err = fmt.Errorf("%w: %w", errNoSpace, err)
		}
		return fmt.Errorf("writing ingest: %w", err)
	}
	d.res.Wrote(int64(len(p)))
	d.mu.Lock()
	d.written += int64(len(p))
	d.notifyLocked()
	d.mu.Unlock()
	return nil
}

// holdConn counts an upstream connection, against the download d if there is one, for
// status and metrics.
func (m *Mirror) holdConn(d *download, registry string) (release func()) {
	if d != nil {
		d.mu.Lock()
		d.conns++
		d.mu.Unlock()
	}
	m.opts.Metrics.UpstreamConnections(registry, 1)
	var once sync.Once
	return func() {
		once.Do(func() {
			if d != nil {
				d.mu.Lock()
				d.conns--
				d.mu.Unlock()
			}
			m.opts.Metrics.UpstreamConnections(registry, -1)
		})
	}
}

// blobResponse is an upstream blob body, positioned where the ingest continues.
type blobResponse struct {
	Body io.ReadCloser
	size int64 // the whole blob's size, -1 if unknown
	end  int64 // where the body ends: size, unless it answered a ranged fetch's first range
}

// openBlob opens the ingest for a download and the upstream body to fill it.
//
// With ranged fetches on, the first request asks for the first two chunks: a 206 says the
// upstream serves ranges and how large the blob is (a blob that fits comes whole, in this
// one request); a 200 says it streams whole, and that body is used as it is.
//
// An ingest a crash left behind is resumed with a range request from where it ends; only
// a 206 whose Content-Range continues exactly there is accepted. A 200 restarts the ingest
// from zero with that body; anything else discards it and starts over. The bytes kept
// from before the crash are verified with the rest at commit, so a damaged leftover can
// fail a download, never pass as a blob.
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
	for {
		fetch := m.fetchPolicy(rt.registry)
		off := in.Offset
		var hdr http.Header
		switch {
		case fetch.concurrency > 1:
			hdr = http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, off+2*fetch.chunkSize-1)}}
		case off > 0:
			hdr = http.Header{"Range": {fmt.Sprintf("bytes=%d-", off)}}
		}
		resp, err := get(hdr)
		var se *upstream.StatusError
		switch {
		case err == nil:
		case fetch.concurrency > 1 && errors.As(err, &se) && se.Status == http.StatusRequestedRangeNotSatisfiable:
			// RFC 9110 clamps a range past the end; a server that refuses it instead is
			// fetched from as one stream for a while.
			m.noRanges(rt.registry)
			continue
		case off > 0 && errors.As(err, &se) && se.Status == http.StatusRequestedRangeNotSatisfiable:
			m.log.Info("upstream cannot resume, starting over", "digest", dgst, "offset", off)
			if in, err = m.restartIngest(ctx, in); err != nil {
				return nil, nil, err
			}
			continue
		case off > 0:
			in.Leave() // keep the leftover for a later resume
			in.Close()
			return nil, nil, err
		default:
			in.Abort()
			in.Close()
			return nil, nil, err
		}
		switch resp.StatusCode {
		case http.StatusPartialContent:
			if total, end, ok := rangeAnswer(resp, off); ok && (fetch.concurrency > 1 && end == min(off+2*fetch.chunkSize, total) || end == total) {
				if off > 0 {
					m.log.Info("resuming blob download", "digest", dgst, "offset", off, "size", total)
				}
				return in, &blobResponse{Body: resp.Body, size: total, end: end}, nil
			}
			resp.Body.Close()
			if fetch.concurrency > 1 {
				m.noRanges(rt.registry) // a range answer we cannot use: one stream instead
				continue
			}
			if off == 0 {
				in.Abort()
				in.Close()
				return nil, nil, fmt.Errorf("blob %s: upstream answered %q to %q: %w", dgst, resp.Header.Get("Content-Range"), hdr.Get("Range"), errContentMismatch)
			}
			m.log.Info("upstream cannot resume, starting over", "digest", dgst, "offset", off)
			if in, err = m.restartIngest(ctx, in); err != nil {
				return nil, nil, err
			}
		case http.StatusOK:
			if off > 0 {
				// The whole blob, although a range was asked for: start over with it.
				m.log.Info("upstream cannot resume, starting over", "digest", dgst, "offset", off)
				if in, err = m.restartIngest(ctx, in); err != nil {
					resp.Body.Close()
					return nil, nil, err
				}
			}
			return in, &blobResponse{Body: resp.Body, size: resp.ContentLength, end: resp.ContentLength}, nil
		default:
			resp.Body.Close()
			in.Abort()
			in.Close()
			return nil, nil, fmt.Errorf("blob %s: upstream answered %d: %w", dgst, resp.StatusCode, errUnexpectedStatus)
		}
	}
}

// errUnexpectedStatus: upstream answered a blob request with a success status that is
// not the one asked for (a 204, say).
var errUnexpectedStatus = errors.New("unexpected upstream status")

// restartIngest discards an ingest's leftover and opens it again, empty.
func (m *Mirror) restartIngest(ctx context.Context, in *contentstore.Ingest) (*contentstore.Ingest, error) {
	dgst := in.Digest()
	in.Abort()
	in.Close()
	in, err := m.store.NewIngest(ctx, dgst, 0)
	if err != nil {
		return nil, err
	}
	if in.Offset != 0 {
		in.Close()
		return nil, fmt.Errorf("ingest for %s not reset", dgst)
	}
	return in, nil
}

// rangeAnswer checks a 206: Content-Range "bytes <offset>-<last>/<total>" starting exactly
// at offset, with a Content-Length that agrees. It returns the total and the end (last+1).
func rangeAnswer(resp *http.Response, offset int64) (total, end int64, ok bool) {
	if resp.StatusCode != http.StatusPartialContent {
		return 0, 0, false
	}
	var first, last int64
	if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &first, &last, &total); err != nil {
		return 0, 0, false
	}
	if first != offset || last < first || last >= total {
		return 0, 0, false
	}
	if resp.ContentLength >= 0 && resp.ContentLength != last-first+1 {
		return 0, 0, false
	}
	return total, last + 1, true
}

// continuesAt checks a ranged answer: 206 with Content-Range "bytes <offset>-<total-1>/<total>".
func continuesAt(resp *http.Response, offset int64) (int64, bool) {
	total, end, ok := rangeAnswer(resp, offset)
	if !ok || end != total {
		return 0, false
	}
	return total, true
}

func (d *download) notifyLocked() {
	close(d.changed)
	d.changed = make(chan struct{})
}

func (d *download) finish(err error) {
	d.mu.Lock()
	d.done = true
	d.err = err
	d.notifyLocked()
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
	d.releaseChunks()
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

// availableLocked is where the bytes a reader can have from off end: the ingest's
// contiguous prefix, or, past it, what the chunk holding off has received. Call with mu held.
func (d *download) availableLocked(off int64) int64 {
	if off < d.written {
		return d.written
	}
	if c := d.chunkAtLocked(off); c != nil {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.file != nil && off < c.start+c.have {
			return c.start + c.have
		}
	}
	return off
}

// readAt reads downloaded bytes at off that availableLocked said are there; 0 bytes and no
// error means they moved (into the ingest) and the caller should look again.
func (d *download) readAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	if off < d.written {
		d.mu.Unlock()
		return d.ingest.ReaderAt().ReadAt(p, off)
	}
	c := d.chunkAtLocked(off)
	d.mu.Unlock()
	if c == nil {
		return 0, nil
	}
	c.mu.Lock()
	if c.file == nil || off >= c.start+c.have {
		c.mu.Unlock()
		return 0, nil
	}
	p = p[:min(int64(len(p)), c.start+c.have-off)]
	c.users++ // keeps the file open while we read it
	f := c.file
	c.mu.Unlock()
	defer c.release()
	n, err := f.ReadAt(p, off-c.start)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

// progress reports a download for status.
func (d *download) progress() DownloadProgress {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := DownloadProgress{
		Digest: d.dgst.String(), Registry: d.registry, Repo: d.repo, Size: d.size,
		Stored: d.written, Received: d.written, Connections: d.conns, Since: d.started,
	}
	for _, c := range d.chunks[d.assembled:] {
		c.mu.Lock()
		if got := c.start + c.have - max(c.start, d.written); got > 0 {
			p.Received += got
		}
		c.mu.Unlock()
	}
	return p
}

// DownloadProgress is one blob download in flight, for status.
type DownloadProgress struct {
	Digest   string `json:"digest"`
	Registry string `json:"registry"`
	Repo     string `json:"repo"`
	Size     int64  `json:"size"` // -1 if upstream did not say
	// Stored is the contiguous prefix in the ingest; Received counts chunks fetched ahead too.
	Stored      int64     `json:"stored"`
	Received    int64     `json:"received"`
	Connections int       `json:"connections"`
	Since       time.Time `json:"since"`
}
