package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// Fetch asks member m for a chunk. It returns a body of exactly req.Length bytes: reads
// fail (with a *FetchError) rather than end early, and a body that delivers nothing for
// IdleTimeout is aborted. Connecting takes at most DialTimeout and the response headers
// HeaderTimeout. Failures to reach m, timeouts, refusals and broken responses make Owners
// skip m for a short, growing while; a 404, 429 or 503 is an answer, not a failure.
// The caller verifies the bytes (and calls ReportFault when they are wrong).
func (f *Fleet) Fetch(ctx context.Context, m Member, req ChunkRequest) (io.ReadCloser, error) {
	if err := req.validate(f.cfg.MaxChunkSize); err != nil {
		return nil, &FetchError{Peer: m.Name, Reason: FallbackError, Err: fmt.Errorf("invalid chunk request: %w", err)}
	}
	if m.PeerAddr == "" {
		return nil, &FetchError{Peer: m.Name, Reason: FallbackDown, Err: errors.New("no peer address")}
	}
	fctx, cancel := context.WithCancel(ctx)
	hreq, err := http.NewRequestWithContext(fctx, http.MethodGet, f.scheme+"://"+m.PeerAddr+req.target(), nil)
	if err != nil {
		cancel()
		return nil, &FetchError{Peer: m.Name, Reason: FallbackError, Err: err}
	}
	f.sign.sign(hreq, f.name, time.Now())
	resp, err := f.client.Do(hreq)
	if err != nil {
		cancel()
		fe := &FetchError{Peer: m.Name, Reason: classify(err), Err: err}
		if ctx.Err() == nil {
			f.softFailure(m.Name)
		} else {
			fe.Reason, fe.Err = FallbackError, ctx.Err()
		}
		return nil, fe
	}
	if resp.StatusCode != http.StatusOK {
		// The error body is a small envelope; read a little so the connection can be
		// reused, never more.
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		cancel()
		reason, sentinel := fromStatus(resp.StatusCode)
		switch resp.StatusCode {
		case http.StatusNotFound, http.StatusServiceUnavailable, http.StatusTooManyRequests:
		default:
			f.softFailure(m.Name)
		}
		return nil, &FetchError{Peer: m.Name, Reason: reason, Status: resp.StatusCode, Err: sentinel}
	}
	if resp.ContentLength != req.Length {
		resp.Body.Close()
		cancel()
		f.softFailure(m.Name)
		return nil, &FetchError{Peer: m.Name, Reason: FallbackError, Status: resp.StatusCode,
			Err: fmt.Errorf("Content-Length %d, want %d", resp.ContentLength, req.Length)}
	}
	f.fetchOK(m.Name)
	b := &peerBody{
		f:         f,
		ctx:       ctx,
		name:      m.Name,
		rec:       f.peerRecord(m.Name),
		body:      resp.Body,
		cancel:    cancel,
		idle:      f.cfg.IdleTimeout,
		remaining: req.Length,
	}
	// The idle timer runs only while a Read waits for the peer: a caller that pauses
	// between reads is not a stalled peer.
	b.timer = time.AfterFunc(b.idle, func() {
		b.timedOut.Store(true)
		cancel()
	})
	b.timer.Stop()
	return b, nil
}

// classify names the fallback reason for an error from the HTTP client.
func classify(err error) string {
	if oe, ok := errors.AsType[*net.OpError](err); ok && oe.Op == "dial" {
		return FallbackDown
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return FallbackTimeout
	}
	return FallbackError
}

// peerBody is a chunk body from a peer: exactly its length, or an error.
type peerBody struct {
	f         *Fleet
	ctx       context.Context // the caller's: its cancellation is not the peer's failure
	name      string
	rec       *peer // nil if the member is not (or no longer) known
	body      io.ReadCloser
	cancel    context.CancelFunc
	timer     *time.Timer
	idle      time.Duration
	timedOut  atomic.Bool
	remaining int64
	err       error
}

func (b *peerBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.remaining == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.remaining {
		p = p[:b.remaining]
	}
	b.timer.Reset(b.idle)
	n, err := b.body.Read(p)
	b.timer.Stop()
	if n > 0 {
		b.remaining -= int64(n)
		b.f.metrics.bytesIn.Add(float64(n))
		if b.rec != nil {
			b.rec.bytesIn.Add(int64(n))
		}
	}
	switch {
	case err == nil:
		return n, nil
	case errors.Is(err, io.EOF) && b.remaining == 0:
		return n, io.EOF
	case errors.Is(err, io.EOF):
		err = io.ErrUnexpectedEOF // never a clean short read
	}
	fe := &FetchError{Peer: b.name, Reason: FallbackError, Status: http.StatusOK, Err: err}
	switch {
	case b.timedOut.Load():
		fe.Reason, fe.Err = FallbackTimeout, fmt.Errorf("no bytes for %v: %w", b.idle, err)
		b.f.softFailure(b.name)
	case b.ctx.Err() != nil:
		fe.Err = b.ctx.Err()
	default:
		b.f.softFailure(b.name)
	}
	b.err = fe
	return n, fe
}

func (b *peerBody) Close() error {
	b.timer.Stop()
	if b.remaining == 0 && b.err == nil {
		// Reading the end of the body lets the connection go back to the pool.
		io.Copy(io.Discard, io.LimitReader(b.body, 1))
	}
	err := b.body.Close()
	b.cancel()
	return err
}
