package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"
)

// Ranged fetch: a cold blob whose upstream answers ranges is fetched as chunks by several
// connections at once, since one TCP stream from a registry's CDN is far slower than the
// node's link. Each chunk goes into a nameless file beside the store as it arrives; one
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
	if m.isRangeless(registry) {
		p.concurrency = 1
	}
	return p
}

func (m *Mirror) isRangeless(registry string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	until, marked := m.rangeless[registry]
	if marked && time.Now().After(until) {
		delete(m.rangeless, registry)
		marked = false
	}
	return marked
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

// releaseChunks lets go of the chunks the download still holds (all of them once it
// ended, whether or not they were assembled).
func (d *download) releaseChunks() {
	d.mu.Lock()
	held := d.chunks[d.assembled:]
	d.assembled = len(d.chunks)
	d.mu.Unlock()
	for _, c := range held {
		c.release()
	}
}

// notify wakes the download's followers.
func (d *download) notify() {
	d.mu.Lock()
	d.notifyLocked()
	d.mu.Unlock()
}

// fetchRanged fills the ingest from first (the answer to the first range, which the caller
// has checked) and then from the chunks past it, all from upstream.
func (m *Mirror) fetchRanged(ctx context.Context, d *download, rt route, first *blobResponse) error {
	pol := m.fetchPolicy(rt.registry)
	var chunks []*chunk
	for s := first.end; s < d.size; s += pol.chunkSize {
		c := newChunk(d.dgst, s, min(s+pol.chunkSize, d.size))
		c.acquire()
		c.notify = d.notify
		chunks = append(chunks, c)
	}
	src := []rangeSource{m.upstreamSource(d.dgst, d.size, rt, d)}
	head := func(ctx context.Context) error {
		release := m.holdConn(d, rt.registry)
		defer release()
		return m.copyFirst(ctx, d, rt, first)
	}
	return m.runChunks(ctx, d, rt, chunks, func(*chunk) []rangeSource { return src }, pol.concurrency, head, first.end)
}

// runChunks fetches chunks with up to concurrency workers (the first always, the others
// as the registry's connection cap allows), while head, if any, fills the ingest up to
// headEnd, and assembles them into the ingest in order.
func (m *Mirror) runChunks(ctx context.Context, d *download, rt route, chunks []*chunk,
	sources func(*chunk) []rangeSource, concurrency int, head func(context.Context) error, headEnd int64) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	d.mu.Lock()
	d.chunks, d.assembled = chunks, 0
	d.mu.Unlock()

	// Chunks are handed out in order, and only within a window past the one the assembler
	// is on, so the chunk files never hold more than window chunks.
	window := 2 * concurrency
	next := 0
	take := func() *chunk {
		d.mu.Lock()
		defer d.mu.Unlock()
		for {
			if next >= len(chunks) || ctx.Err() != nil {
				return nil
			}
			if next < d.assembled+window {
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
	work := func() {
		for c := take(); c != nil; c = take() {
			if !c.claim() {
				continue // complete, or another fill runs (a member asked for it first)
			}
			if err := m.fill(ctx, rt, c, sources(c)); err != nil {
				cancel(err)
				return
			}
		}
	}

	done := make(chan struct{})
	workers := 1
	go func() {
		defer func() { done <- struct{}{} }()
		if head != nil {
			if err := head(ctx); err != nil {
				cancel(err)
				return
			}
		}
		work()
	}()
	for range concurrency - 1 {
		slot := m.connSlot(rt.registry)
		if slot == nil {
			break // the registry's cap is taken: fewer connections, not a wait
		}
		workers++
		go func() {
			defer func() { done <- struct{}{} }()
			defer slot()
			work()
		}()
	}

	err := m.assemble(ctx, d, rt, chunks, sources, headEnd)
	if err != nil {
		cancel(err)
	}
	for range workers {
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
		resp, err := m.getRange(ctx, d.dgst, d.size, rt, from, first.end)
		if err != nil {
			return err
		}
		body.Close()
		body = resp.Body
	}
}

// assemble appends the chunks to the ingest in order, each as its bytes arrive, once the
// ingest holds everything before it; a chunk is let go as soon as it is in. A chunk whose
// fill gave up (one a member's request started, say) is filled once more from here.
func (m *Mirror) assemble(ctx context.Context, d *download, rt route, chunks []*chunk, sources func(*chunk) []rangeSource, headEnd int64) error {
	buf := make([]byte, 256<<10)
	if err := d.waitFor(ctx, func() bool { return d.written >= headEnd }); err != nil {
		return err
	}
	for k, c := range chunks {
		d.mu.Lock()
		copied := max(0, d.written-c.start) // a resumed ingest may already hold its start
		d.mu.Unlock()
		refilled := false
		for copied < c.size() {
			have, f, err := c.waitFor(ctx, copied)
			if have <= copied {
				if err == nil || ctx.Err() != nil || refilled {
					if err == nil {
						err = context.Cause(ctx)
					}
					return err
				}
				refilled = true
				if !c.claim() {
					// A member's request took the fill up since, or it ended: wait on
					// that one (once) rather than give up.
					continue
				}
				if err := m.fill(ctx, rt, c, sources(c)); err != nil {
					return err
				}
				continue
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
		d.assembled = k + 1
		d.notifyLocked()
		d.mu.Unlock()
		c.release()
	}
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
