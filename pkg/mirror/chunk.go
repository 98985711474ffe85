package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/pkg/fleet"
	"github.com/node-mirror/node-mirror/pkg/upstream"
	"github.com/node-mirror/node-mirror/pkg/upstream/netguard"
)

// chunk is a range [start, end) of a blob being fetched: its bytes go into a nameless file
// beside the store as they arrive (so a crash leaves nothing), where the assembler of the
// node's download and, in a fleet, the members asking this node for it read them.
type chunk struct {
	dgst       digest.Digest
	start, end int64

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every change
	file    *os.File      // nil before the first byte and once closed
	have    int64         // bytes in file
	filling bool          // a fill runs
	viaPeer bool          // the running fill reads from a member, not upstream
	err     error         // why the last fill gave up, until a new one starts
	peers   []string      // members whose bytes are in file
	users   int           // the download holding it and readers; the file closes at zero
	closed  bool
	notify  func() // the holding download's wake-up, for its followers
}

func newChunk(dgst digest.Digest, start, end int64) *chunk {
	return &chunk{dgst: dgst, start: start, end: end, changed: make(chan struct{})}
}

func (c *chunk) size() int64 { return c.end - c.start }

// changedLocked wakes whoever waits on the chunk; call with mu held.
func (c *chunk) changedLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// wake tells the chunk's waiters and its download's followers. Call without mu.
func (c *chunk) wake() {
	c.mu.Lock()
	c.changedLocked()
	notify := c.notify
	c.mu.Unlock()
	if notify != nil {
		notify()
	}
}

// claim makes the caller the chunk's filler unless another fill runs or it is complete.
// Until the fill says where it reads from, the chunk counts as coming from a member: a
// member asking this node as the previous owner must not wait on it (it may be the very
// member this fill is about to ask, and the two would wait on each other).
func (c *chunk) claim() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.filling || c.have == c.size() || c.closed {
		return false
	}
	c.filling, c.viaPeer, c.err = true, true, nil
	return true
}

// unclaim ends a fill, with its error if it gave up.
func (c *chunk) unclaim(err error) {
	c.mu.Lock()
	c.filling, c.viaPeer, c.err = false, false, err
	c.mu.Unlock()
	c.wake()
}

// acquire and release count the chunk's users; the last one closes its file.
func (c *chunk) acquire() {
	c.mu.Lock()
	c.users++
	c.mu.Unlock()
}

func (c *chunk) release() {
	c.mu.Lock()
	c.users--
	if c.users <= 0 && c.file != nil {
		c.file.Close()
		c.file = nil
		c.closed = true
	}
	c.mu.Unlock()
}

// waitFor blocks until have > at (bytes to read there), the chunk is complete, or a fill
// gave up with none running; it returns what is there.
func (c *chunk) waitFor(ctx context.Context, at int64) (have int64, f *os.File, err error) {
	for {
		c.mu.Lock()
		have, f, ch := c.have, c.file, c.changed
		ferr, filling := c.err, c.filling
		c.mu.Unlock()
		if have > at {
			return have, f, nil
		}
		if have == c.size() {
			return have, f, nil
		}
		if ferr != nil && !filling {
			return have, f, ferr
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return have, f, context.Cause(ctx)
		}
	}
}

// reader follows the chunk's bytes [from, to) (blob offsets) as they arrive.
func (c *chunk) reader(ctx context.Context, from, to int64) io.ReadCloser {
	c.acquire()
	return &chunkReader{ctx: ctx, c: c, pos: from - c.start, end: to - c.start}
}

type chunkReader struct {
	ctx      context.Context
	c        *chunk
	pos, end int64
	once     sync.Once
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	have, f, err := r.c.waitFor(r.ctx, r.pos)
	if have <= r.pos {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	n, err := f.ReadAt(p[:min(int64(len(p)), min(have, r.end)-r.pos)], r.pos)
	r.pos += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

func (r *chunkReader) Close() error {
	r.once.Do(r.c.release)
	return nil
}

// rangeSource is where a chunk's bytes can come from: upstream, or a member of the fleet.
type rangeSource struct {
	peer     string // "" for upstream
	hop      int    // 1 when asking the previous owner: a miss there is no fallback
	attempts int
	// open returns [from, to) of the blob.
	open func(ctx context.Context, from, to int64) (io.ReadCloser, error)
}

// fill fetches the chunk's missing bytes from the first source that delivers them,
// resuming where a source broke off. The caller has claimed the chunk.
func (m *Mirror) fill(ctx context.Context, rt route, c *chunk, srcs []rangeSource) (err error) {
	defer func() { c.unclaim(err) }()
	for i, src := range srcs {
		for attempt := 1; ; attempt++ {
			err = m.fillFrom(ctx, c, src)
			if err == nil || ctx.Err() != nil || isPermanent(err) {
				return err
			}
			if src.peer != "" && i+1 < len(srcs) {
				if src.hop == 0 || !errors.Is(err, fleet.ErrNotFound) {
					m.peerFallback(err)
				}
				m.log.Debug("member failed a chunk, trying the next source", "digest", c.dgst, "start", c.start, "peer", src.peer, "err", err)
				break
			}
			if attempt >= src.attempts {
				return fmt.Errorf("chunk %d-%d of %s: %w", c.start, c.end, c.dgst, err)
			}
			m.opts.Metrics.ChunkRetried(rt.registry)
			m.log.Debug("retrying a chunk", "digest", c.dgst, "start", c.start, "attempt", attempt, "err", err)
			if err := sleepCtx(ctx, retryDelay(attempt)); err != nil {
				return err
			}
		}
	}
	return err
}

// fillFrom copies what src sends into the chunk's file, from where the file ends.
func (m *Mirror) fillFrom(ctx context.Context, c *chunk, src rangeSource) error {
	c.mu.Lock()
	if c.file == nil {
		if c.closed {
			c.mu.Unlock()
			return permanent(errors.New("chunk released"))
		}
		f, err := anonymousFile(m.store.ScratchDir())
		if err != nil {
			c.mu.Unlock()
			if isDiskFull(err) {
				err = fmt.Errorf("%w: %w", errNoSpace, err)
			}
			return permanent(fmt.Errorf("chunk file: %w", err))
		}
		c.file = f
	}
	f, from := c.file, c.start+c.have
	c.viaPeer = src.peer != ""
	c.mu.Unlock()
	if from >= c.end {
		return nil
	}
	body, err := src.open(ctx, from, c.end)
	if err != nil {
		return err
	}
	defer body.Close()
	if src.peer != "" {
		c.mu.Lock()
		if len(c.peers) == 0 || c.peers[len(c.peers)-1] != src.peer {
			c.peers = append(c.peers, src.peer)
		}
		c.mu.Unlock()
	}
	buf := make([]byte, 256<<10)
	for from < c.end {
		n, rerr := body.Read(buf[:min(int64(len(buf)), c.end-from)])
		if n > 0 {
			if _, err := f.WriteAt(buf[:n], from-c.start); err != nil {
				if isDiskFull(err) {
					err = fmt.Errorf("%w: %w", errNoSpace, err)
				}
				return permanent(fmt.Errorf("writing chunk: %w", err))
			}
			from += int64(n)
			c.mu.Lock()
			c.have = from - c.start
			c.mu.Unlock()
			c.wake()
		}
		if rerr == io.EOF && from < c.end {
			return fmt.Errorf("ended %d bytes short: %w", c.end-from, io.ErrUnexpectedEOF)
		}
		if rerr != nil && rerr != io.EOF {
			return rerr
		}
	}
	return nil
}

// upstreamSource fetches ranges of a blob from its registry, counting the connection
// (against d, when a download of this node holds the chunk).
func (m *Mirror) upstreamSource(dgst digest.Digest, size int64, rt route, d *download) rangeSource {
	return rangeSource{attempts: chunkAttempts, open: func(ctx context.Context, from, to int64) (io.ReadCloser, error) {
		resp, err := m.getRange(ctx, dgst, size, rt, from, to)
		if err != nil {
			return nil, err
		}
		release := m.holdConn(d, rt.registry)
		return &countedBody{ReadCloser: resp.Body, fetched: func(n int) { m.opts.Metrics.Fetched(rt.registry, n) }, done: release}, nil
	}}
}

// countedBody counts what is read from an upstream body and runs done on Close.
type countedBody struct {
	io.ReadCloser
	fetched func(int)
	done    func()
}

func (b *countedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.fetched(n)
	}
	return n, err
}

func (b *countedBody) Close() error {
	err := b.ReadCloser.Close()
	b.done()
	return err
}

// getRange asks upstream for [from, to) of a blob of size bytes and accepts only a 206 for
// exactly that range.
func (m *Mirror) getRange(ctx context.Context, dgst digest.Digest, size int64, rt route, from, to int64) (*http.Response, error) {
	resp, err := rt.client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + dgst.String(),
		Header: http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", from, to-1)}},
	})
	if err != nil {
		return nil, err
	}
	if total, got, ok := rangeAnswer(resp, from); !ok || total != size || got != to {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			m.noRanges(rt.registry)
		}
		return nil, fmt.Errorf("upstream answered %d %q to a request for bytes %d-%d of %d: %w",
			resp.StatusCode, resp.Header.Get("Content-Range"), from, to-1, size, errBadRange)
	}
	return resp, nil
}

// errBadRange: upstream answered a range request with something else.
var errBadRange = errors.New("wrong answer to a range request")

// permanentError marks an error a retry cannot cure (a full disk, a broken store).
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

func permanent(err error) error { return permanentError{err} }

func isPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p) || isNoStore(err) || errors.Is(err, upstream.ErrNotFound) || errors.Is(err, netguard.ErrDenied)
}

func retryDelay(attempt int) time.Duration {
	d := time.Duration(100<<attempt) * time.Millisecond
	return d/2 + rand.N(d/2+1)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// anonymousFile is a file in dir with no name: its blocks are freed when it is closed or
// the process dies, so a crash leaves nothing behind.
func anonymousFile(dir string) (*os.File, error) {
	f, err := os.CreateTemp(dir, "chunk-")
	if err != nil {
		return nil, err
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
