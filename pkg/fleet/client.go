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
	resp, cancel, err := f.get(ctx, m, req.target())
	if err != nil {
		return nil, err
	}
	if resp.ContentLength != req.Length {
		return nil, f.broken(m, resp, cancel, fmt.Errorf("Content-Length %d, want %d", resp.ContentLength, req.Length))
	}
	f.fetchOK(m.Name)
	return f.newPeerBody(ctx, m.Name, resp.Body, cancel, req.Length), nil
}

// FetchManifest asks member m for a manifest by digest and returns its body and media
// type (as a bare "type/subtype", lower-cased). Timeouts, backoff and errors are as for
// Fetch. The response must declare its Content-Length: one over Config.MaxManifestSize
// is refused before a byte of the body is read, a body shorter than declared fails, and
// nothing beyond the declared length is read, so at most MaxManifestSize bytes ever are.
//
// FetchManifest does not verify the body against req.Digest, and the media type is the
// peer's word, covered by no digest: the caller verifies the body (and calls ReportFault
// when it is wrong) and checks the media type against it as it does upstream's
// Content-Type.
func (f *Fleet) FetchManifest(ctx context.Context, m Member, req ManifestRequest) (body []byte, mediaType string, err error) {
	if err := req.validate(); err != nil {
		return nil, "", &FetchError{Peer: m.Name, Reason: FallbackError, Err: fmt.Errorf("invalid manifest request: %w", err)}
	}
	resp, cancel, err := f.get(ctx, m, req.target())
	if err != nil {
		return nil, "", err
	}
	size, limit := resp.ContentLength, f.cfg.MaxManifestSize
	switch {
	case size < 0:
		return nil, "", f.broken(m, resp, cancel, errors.New("no Content-Length"))
	case size > limit:
		return nil, "", f.broken(m, resp, cancel, fmt.Errorf("manifest of %d bytes, over the %d-byte limit", size, limit))
	}
	ct := resp.Header.Values("Content-Type")
	if len(ct) != 1 {
		return nil, "", f.broken(m, resp, cancel, fmt.Errorf("%d Content-Type headers, want 1", len(ct)))
	}
	if mediaType, err = parseMediaType(ct[0]); err != nil {
		return nil, "", f.broken(m, resp, cancel, err)
	}
	b := f.newPeerBody(ctx, m.Name, resp.Body, cancel, size)
	defer b.Close()
	body = make([]byte, size)
	// The body fails (a *FetchError, with the backoff applied) rather than end short.
	if _, err := io.ReadFull(b, body); err != nil {
		return nil, "", err
	}
	f.fetchOK(m.Name)
	return body, mediaType, nil
}

// get sends a signed GET for target to m and returns the response if it is a 200, with
// the function that ends the request. Otherwise it returns a *FetchError, and m is in
// backoff if the failure was m's.
func (f *Fleet) get(ctx context.Context, m Member, target string) (*http.Response, context.CancelFunc, error) {
	if m.PeerAddr == "" {
		return nil, nil, &FetchError{Peer: m.Name, Reason: FallbackDown, Err: errors.New("no peer address")}
	}
	fctx, cancel := context.WithCancel(ctx)
	hreq, err := http.NewRequestWithContext(fctx, http.MethodGet, f.scheme+"://"+m.PeerAddr+target, nil)
	if err != nil {
		cancel()
		return nil, nil, &FetchError{Peer: m.Name, Reason: FallbackError, Err: err}
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
		return nil, nil, fe
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
		return nil, nil, &FetchError{Peer: m.Name, Reason: reason, Status: resp.StatusCode, Err: sentinel}
	}
	return resp, cancel, nil
}

// broken drops a 200 response whose headers are wrong, puts m in backoff and returns the
// error.
func (f *Fleet) broken(m Member, resp *http.Response, cancel context.CancelFunc, err error) error {
	resp.Body.Close()
	cancel()
	f.softFailure(m.Name)
	return &FetchError{Peer: m.Name, Reason: FallbackError, Status: resp.StatusCode, Err: err}
}

// newPeerBody wraps a 200 response's body of length bytes from the named member.
func (f *Fleet) newPeerBody(ctx context.Context, name string, body io.ReadCloser, cancel context.CancelFunc, length int64) *peerBody {
	b := &peerBody{
		f:         f,
		ctx:       ctx,
		name:      name,
		rec:       f.peerRecord(name),
		body:      body,
		cancel:    cancel,
		idle:      f.cfg.IdleTimeout,
		remaining: length,
	}
	// The idle timer runs only while a Read waits for the peer: a caller that pauses
	// between reads is not a stalled peer.
	b.timer = time.AfterFunc(b.idle, func() {
		b.timedOut.Store(true)
		cancel()
	})
	b.timer.Stop()
	return b
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

// peerBody is a chunk or manifest body from a peer: exactly its length, or an error.
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
	// waited is how long Reads have waited for the peer, got what they received: a peer
	// that keeps the idle timer from firing with a byte now and then is still too slow.
	waited time.Duration
	got    int64
}

// minPeerRate is the slowest a peer may deliver, averaged over the time Reads wait for it
// once they have waited the idle timeout: far below a LAN, and below any upstream a test
// or a real owner relays from (an owner streams a chunk as its own download brings it), but
// enough that a member trickling bytes cannot hold a chunk, and the pull behind it, for
// good.
const minPeerRate = 64 << 10

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
	began := time.Now()
	n, err := b.body.Read(p)
	b.timer.Stop()
	b.waited += time.Since(began)
	b.got += int64(n)
	slow := err == nil && b.waited > b.idle && float64(b.got) < minPeerRate*b.waited.Seconds()
	if slow {
		err = fmt.Errorf("%d bytes in %v, below %d bytes a second", b.got, b.waited.Round(time.Millisecond), minPeerRate)
	}
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
	case slow:
		fe.Reason = FallbackTimeout
		b.cancel()
		b.f.softFailure(b.name)
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
