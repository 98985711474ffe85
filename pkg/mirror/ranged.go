package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"time"

	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// Ranged fetch: a cold blob whose upstream answers ranges is fetched as chunks by several
// connections at once, since one TCP stream from a registry's CDN is far slower than the
// node's link. Each chunk goes into an anonymous file beside the store as it arrives; one
// assembler appends the chunks, in order, to the containerd ingest, so the ingest stays
// the contiguous, verified-at-commit prefix it is with one stream, and followers stream it
// as it grows. Disk, not memory, holds what arrives ahead of the prefix, and the chunks
// fetched ahead are bounded by a window so that costs at most a few chunks.

// Defaults for ranged fetches (issue 12; docs/BENCHMARKS.md has the sweep behind them).
const (
	DefaultFetchConcurrency = 4
	DefaultFetchChunkSize   = 16 << 20
	// DefaultUpstreamConnections caps, per registry, the connections ranged fetches open
	// beyond each download's first, so many cold blobs at once stay polite to a registry.
	DefaultUpstreamConnections = 16
	// chunkAttempts is how often a chunk is asked for (resuming where it broke off)
	// before the download fails.
	chunkAttempts = 3
)

// fetchPolicy is how blobs are fetched: connections per blob and chunk size.
type fetchPolicy struct {
	concurrency int
	chunkSize   int64
}

// fetchPolicy is the policy for a blob of registry: one stream while the registry is
// marked as not serving ranges properly.
func (m *Mirror) fetchPolicy(registry string) fetchPolicy {
	p := fetchPolicy{concurrency: m.opts.FetchConcurrency, chunkSize: m.opts.FetchChunkSize}
	m.mu.Lock()
	until, marked := m.rangeless[registry]
	if marked && time.Now().After(until) {
		delete(m.rangeless, registry)
		marked = false
	}
	m.mu.Unlock()
	if marked {
		p.concurrency = 1
	}
	return p
}

// rangelessFor is how long a registry that mishandled a range is fetched from as one
// stream before ranges are tried again.
const rangelessFor = 10 * time.Minute

// noRanges marks registry as not serving ranged fetches properly, for a while.
func (m *Mirror) noRanges(registry string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, marked := m.rangeless[registry]; !marked {
		m.log.Info("upstream mishandles ranges, fetching blobs as one stream", "registry", registry, "for", rangelessFor)
	}
	m.rangeless[registry] = time.Now().Add(rangelessFor)
}

// chunk is one part of a ranged fetch: [start, end) of the blob.
type chunk struct {
	start, end int64
	file       *os.File // the bytes received so far; nil before the first and once assembled and unread
	have       int64    // bytes in file
	assembled  bool     // appended to the ingest
	readers    int      // followers reading file right now
}

// closeIfDoneLocked closes the chunk's file once it is in the ingest and nobody reads it.
// Call with the download's mu held.
func (c *chunk) closeIfDoneLocked() {
	if c.assembled && c.readers == 0 && c.file != nil {
		c.file.Close()
		c.file = nil
	}
}

// chunkAtLocked returns the chunk holding off, or nil. Call with mu held.
func (d *download) chunkAtLocked(off int64) *chunk {
	lo, hi := 0, len(d.chunks)
	for lo < hi {
		mid := (lo + hi) / 2
		switch c := d.chunks[mid]; {
		case off < c.start:
			hi = mid
		case off >= c.end:
			lo = mid + 1
		default:
			return c
		}
	}
	return nil
}

func (d *download) closeChunks() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.chunks {
		if c.file != nil {
			c.file.Close()
			c.file = nil
		}
	}
}

// fetchRanged fills the ingest from first (the answer to the first range, which the caller
// has checked) and then from the chunks past it, fetched by up to the policy's number of
// connections: the first one, plus extras for which the registry's connection cap has room.
func (m *Mirror) fetchRanged(ctx context.Context, d *download, rt route, first *blobResponse) error {
	pol := m.fetchPolicy(rt.registry)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	d.mu.Lock()
	for s := first.end; s < d.size; s += pol.chunkSize {
		d.chunks = append(d.chunks, &chunk{start: s, end: min(s+pol.chunkSize, d.size)})
	}
	chunks := d.chunks
	d.mu.Unlock()

	// Chunks are handed out in order, and only within a window past the one the assembler
	// is on, so the anonymous files never hold more than window chunks.
	window := 2 * pol.concurrency
	next, assembling := 0, 0
	take := func() *chunk {
		d.mu.Lock()
		defer d.mu.Unlock()
		for {
			if next >= len(chunks) || ctx.Err() != nil {
				return nil
			}
			if next < assembling+window {
				c := chunks[next]
				next++
				return c
			}
			ch := d.changed
			d.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
			}
			d.mu.Lock()
		}
	}
	work := func(release func()) {
		defer release()
		for c := take(); c != nil; c = take() {
			if err := m.fetchChunk(ctx, d, rt, c); err != nil {
				cancel(err)
				return
			}
		}
	}

	done := make(chan struct{})
	extras := 0
	for range pol.concurrency - 1 {
		slot := m.connSlot(rt.registry)
		if slot == nil {
			break // the registry's cap is taken: fewer connections, not a wait
		}
		extras++
		connRelease := m.holdConn(d, rt.registry)
		go func() {
			defer func() { done <- struct{}{} }()
			work(func() { connRelease(); slot() })
		}()
	}
	// The first connection streams its range into the ingest, then takes chunks too.
	go func() {
		defer func() { done <- struct{}{} }()
		release := m.holdConn(d, rt.registry)
		err := m.copyFirst(ctx, d, rt, first)
		if err != nil {
			release()
			cancel(err)
			return
		}
		work(release)
	}()

	err := m.assemble(ctx, d, chunks, func(k int) {
		d.mu.Lock()
		assembling = k
		d.notifyLocked()
		d.mu.Unlock()
	}, first.end)
	if err != nil {
		cancel(err)
	}
	for range extras + 1 {
		<-done
	}
	if cause := context.Cause(ctx); err == nil && cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause
	}
	return err
}

// copyFirst streams the first range's body into the ingest, resuming it with range
// requests if it breaks off.
func (m *Mirror) copyFirst(ctx context.Context, d *download, rt route, first *blobResponse) error {
	buf := make([]byte, 256<<10)
	body := first.Body
	defer func() { body.Close() }()
	for attempt := 1; ; attempt++ {
		err := func() error {
			for {
				d.mu.Lock()
				left := first.end - d.written
				d.mu.Unlock()
				if left <= 0 {
					return nil
				}
				n, rerr := body.Read(buf[:min(int64(len(buf)), left)])
				if n > 0 {
					if err := d.appendIngest(buf[:n]); err != nil {
						return permanent(err)
					}
					m.opts.Metrics.Fetched(rt.registry, n)
				}
				if rerr == io.EOF {
					if left > int64(n) {
						return fmt.Errorf("first range of %s ended %d bytes short: %w", d.dgst, left-int64(n), io.ErrUnexpectedEOF)
					}
					return nil
				}
				if rerr != nil {
					return rerr
				}
			}
		}()
		if err == nil || attempt >= chunkAttempts || isPermanent(err) || ctx.Err() != nil {
			return err
		}
		m.opts.Metrics.ChunkRetried(rt.registry)
		m.log.Debug("resuming the first range", "digest", d.dgst, "attempt", attempt, "err", err)
		if err := sleepCtx(ctx, retryDelay(attempt)); err != nil {
			return err
		}
		d.mu.Lock()
		from := d.written
		d.mu.Unlock()
		resp, err := m.getRange(ctx, d, rt, from, first.end)
		if err != nil {
			return err
		}
		body.Close()
		body = resp.Body
	}
}

// fetchChunk fetches one chunk into its file, resuming where it broke off, up to
// chunkAttempts requests.
func (m *Mirror) fetchChunk(ctx context.Context, d *download, rt route, c *chunk) error {
	for attempt := 1; ; attempt++ {
		err := m.fetchChunkOnce(ctx, d, rt, c)
		if err == nil || attempt >= chunkAttempts || isPermanent(err) || ctx.Err() != nil {
			if err != nil {
				return fmt.Errorf("chunk %d-%d of %s: %w", c.start, c.end, d.dgst, err)
			}
			return nil
		}
		m.opts.Metrics.ChunkRetried(rt.registry)
		m.log.Debug("retrying a chunk", "digest", d.dgst, "start", c.start, "attempt", attempt, "err", err)
		if err := sleepCtx(ctx, retryDelay(attempt)); err != nil {
			return err
		}
	}
}

func (m *Mirror) fetchChunkOnce(ctx context.Context, d *download, rt route, c *chunk) error {
	d.mu.Lock()
	from := c.start + c.have
	if c.file == nil {
		f, err := anonymousFile(m.store.ScratchDir())
		if err != nil {
			d.mu.Unlock()
			if isDiskFull(err) {
				err = fmt.Errorf("%w: %w", errNoSpace, err)
			}
			return permanent(fmt.Errorf("chunk file: %w", err))
		}
		c.file = f
	}
	f := c.file
	d.mu.Unlock()
	if from >= c.end {
		return nil
	}
	resp, err := m.getRange(ctx, d, rt, from, c.end)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	buf := make([]byte, 256<<10)
	for from < c.end {
		n, rerr := resp.Body.Read(buf[:min(int64(len(buf)), c.end-from)])
		if n > 0 {
			if _, err := f.WriteAt(buf[:n], from-c.start); err != nil {
				if isDiskFull(err) {
					err = fmt.Errorf("%w: %w", errNoSpace, err)
				}
				return permanent(fmt.Errorf("writing chunk: %w", err))
			}
			from += int64(n)
			m.opts.Metrics.Fetched(rt.registry, n)
			d.mu.Lock()
			c.have = from - c.start
			d.notifyLocked()
			d.mu.Unlock()
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

// getRange asks upstream for [from, end) of the blob and accepts only a 206 for exactly
// that range of a blob of the download's size.
func (m *Mirror) getRange(ctx context.Context, d *download, rt route, from, end int64) (*http.Response, error) {
	resp, err := rt.client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + d.dgst.String(),
		Header: http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", from, end-1)}},
	})
	if err != nil {
		return nil, err
	}
	if total, got, ok := rangeAnswer(resp, from); !ok || total != d.size || got != end {
		resp.Body.Close()
		return nil, fmt.Errorf("upstream answered %d %q to a request for bytes %d-%d of %d", resp.StatusCode, resp.Header.Get("Content-Range"), from, end-1, d.size)
	}
	return resp, nil
}

// assemble appends the chunks to the ingest in order, each as its bytes arrive, once the
// ingest holds everything before it. onChunk reports the chunk it is on.
func (m *Mirror) assemble(ctx context.Context, d *download, chunks []*chunk, onChunk func(int), firstEnd int64) error {
	buf := make([]byte, 256<<10)
	// The first range goes straight into the ingest: wait until it is all there.
	if err := d.waitFor(ctx, func() bool { return d.written >= firstEnd }); err != nil {
		return err
	}
	for k, c := range chunks {
		onChunk(k)
		for copied := int64(0); copied < c.end-c.start; {
			var have int64
			var f *os.File
			if err := d.waitFor(ctx, func() bool { have, f = c.have, c.file; return have > copied }); err != nil {
				return err
			}
			n, err := f.ReadAt(buf[:min(int64(len(buf)), have-copied)], copied)
			if n == 0 && err != nil {
				return permanent(fmt.Errorf("reading chunk: %w", err))
			}
			if err := d.appendIngest(buf[:n]); err != nil {
				return permanent(err)
			}
			copied += int64(n)
		}
		d.mu.Lock()
		c.assembled = true
		c.closeIfDoneLocked()
		d.mu.Unlock()
	}
	onChunk(len(chunks))
	return nil
}

// waitFor blocks until cond, evaluated with mu held, is true.
func (d *download) waitFor(ctx context.Context, cond func() bool) error {
	for {
		d.mu.Lock()
		ok, ch := cond(), d.changed
		d.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// connSlot takes one of the registry's connections for a ranged fetch's extra connection
// and returns its release, or nil when the cap is taken.
func (m *Mirror) connSlot(registry string) func() {
	m.mu.Lock()
	slots := m.conns[registry]
	if slots == nil {
		slots = make(chan struct{}, m.opts.UpstreamConnections)
		m.conns[registry] = slots
	}
	m.mu.Unlock()
	select {
	case slots <- struct{}{}:
		return func() { <-slots }
	default:
		return nil
	}
}

// permanentError marks an error a retry cannot cure (a full disk, a broken store).
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

func permanent(err error) error { return permanentError{err} }

func isPermanent(err error) bool {
	var p permanentError
	return errors.As(err, &p) || isNoStore(err) || errors.Is(err, upstream.ErrNotFound)
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
