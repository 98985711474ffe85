package mirror

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"syscall"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/cachehdr"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// Why a blob went to a client without being stored.
var (
	errNoRoom    = errors.New("cache budget taken by content in use")
	errNoSpace   = errors.New("disk full")
	errCommitted = errors.New("blob committed meanwhile")
)

// isNoStore: the blob cannot be stored, so it is passed through instead.
func isNoStore(err error) bool {
	return errors.Is(err, errNoRoom) || errors.Is(err, errNoSpace) || errors.Is(err, contentstore.ErrNoRoom)
}

func isDiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

func passThroughReason(err error) string {
	if errors.Is(err, errNoSpace) {
		return "disk_full"
	}
	if isNoStore(err) {
		return "budget"
	}
	return "store_error"
}

func (m *Mirror) notePassThrough(ctx context.Context, rt route, why error) {
	reason := passThroughReason(why)
	m.opts.Metrics.PassThrough(reason)
	m.stats.passThrough.Add(1)
	m.log.Warn("passing content through uncached", "reason", reason, "registry", rt.registry,
		"repo", rt.repo, "kind", rt.kind, "ref", rt.ref, "err", why)
}

// passThrough streams a blob from upstream to the client without storing it: the disk
// is full or the budget is taken by content in use, and a pull must not fail for that.
//
// Upstream is always asked for the whole blob, which is hashed as it streams; the final
// byte of the response is held back until size and digest match, so a client never sees
// a complete response of wrong bytes. A Range request gets its range from that stream (the
// rest is read and hashed, not sent), so even a short range is verified, at the cost of
// reading the blob to its end.
func (m *Mirror) passThrough(w http.ResponseWriter, r *http.Request, rt route, why error) {
	m.notePassThrough(r.Context(), rt, why)
	resp, err := rt.client.Do(r.Context(), upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + rt.digest.String(),
	})
	if err != nil {
		m.fail(w, r, rt, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		// A 206 (or any other 2xx) to a request for the whole blob cannot be verified.
		m.fail(w, r, rt, fmt.Errorf("pass-through of %s: upstream answered %d to a request for the whole blob: %w",
			rt.digest, resp.StatusCode, errContentMismatch))
		return
	}
	size := resp.ContentLength
	if size == 0 && rt.digest != digest.FromBytes(nil) {
		// An empty response would be complete before anything could be verified.
		m.fail(w, r, rt, fmt.Errorf("pass-through of %s: upstream sent an empty body: %w", rt.digest, errContentMismatch))
		return
	}
	win, ok := requestedWindow(r, size, `"`+rt.digest.String()+`"`)
	if !ok || size < 0 {
		win = window{start: 0, end: size} // RFC 9110 lets a server ignore Range
	}
	noteResult(r.Context(), ResultPassThrough)
	m.count(ResultPassThrough)
	w.Header().Set(cacheHeader, cachehdr.PassThrough)
	if size >= 0 {
		setWindowHeaders(w, rt.digest.String(), size, win)
	} else {
		w.Header().Set("Content-Type", blobContentType)
		w.Header().Set("Docker-Content-Digest", rt.digest.String())
	}
	w.WriteHeader(win.status())
	vr := newVerifyReader(resp.Body, rt.digest, size, win.start, win.end)
	if _, err := io.Copy(w, vr); err != nil {
		m.log.Warn("pass-through blob failed", "registry", rt.registry, "repo", rt.repo, "digest", rt.digest, "err", err)
		panic(http.ErrAbortHandler) // a short body, never a clean end
	}
}

// continueUpstream serves the rest of a response, [pos, end), after the blob's download
// failed for want of disk space. The client has bytes of the download's ingest (still
// readable: the reader keeps the file open); those bytes, ingest[0:pos], are hashed first
// and upstream continues from pos, so the digest checked before the final byte goes out
// covers exactly what the client received. An upstream that ignores the Range request
// sends the blob from 0: its first pos bytes are skipped unhashed.
func (m *Mirror) continueUpstream(ctx context.Context, rt route, d *download, pos, end int64) (io.ReadCloser, error) {
	resp, err := rt.client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + d.dgst.String(),
		Header: http.Header{"Range": {fmt.Sprintf("bytes=%d-", pos)}},
	})
	if err != nil {
		return nil, err
	}
	vr := newVerifyReader(resp.Body, d.dgst, d.size, pos, end)
	if _, err := io.Copy(vr.hash, io.NewSectionReader(readerAtFunc(d.readAt), 0, pos)); err != nil {
		resp.Body.Close()
		return nil, err
	}
	vr.n = pos
	if total, ok := continuesAt(resp, pos); !ok || total != d.size {
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return nil, fmt.Errorf("upstream answered %d (%q) to a range request from %d", resp.StatusCode, resp.Header.Get("Content-Range"), pos)
		}
		if _, err := io.CopyN(io.Discard, resp.Body, pos); err != nil {
			resp.Body.Close()
			return nil, err
		}
	}
	return struct {
		io.Reader
		io.Closer
	}{vr, resp.Body}, nil
}

// verifyReader reads a blob from r, hashing every byte, and returns the part of it in
// [from, to) (to < 0: to the end). The last byte it returns is held back until the whole
// blob has been read and its size and digest match, so what it returns is never complete
// unless verified. n says how much of the blob was hashed before r (a continuation).
type verifyReader struct {
	r        io.Reader
	want     digest.Digest
	size     int64 // -1 if unknown
	from, to int64
	digester digest.Digester
	hash     hash.Hash
	n        int64  // bytes of the blob hashed so far
	buf      []byte // read buffer
	pend     []byte // window bytes read and not yet returned; its last one waits
	spare    []byte // backing store for pend
	verified bool
	err      error
}

func newVerifyReader(r io.Reader, want digest.Digest, size, from, to int64) *verifyReader {
	dg := want.Algorithm().Digester()
	return &verifyReader{r: r, want: want, size: size, from: from, to: to, digester: dg, hash: dg.Hash(),
		buf: make([]byte, 64<<10), spare: make([]byte, 0, 64<<10+1)}
}

func (v *verifyReader) Read(p []byte) (int, error) {
	for {
		if v.err != nil {
			return 0, v.err
		}
		if k := len(v.pend); k > 1 || (v.verified && k > 0) {
			if !v.verified {
				k-- // this might be the final byte
			}
			n := copy(p, v.pend[:k])
			v.pend = v.pend[n:]
			return n, nil
		}
		if v.verified {
			return 0, io.EOF
		}
		v.pend = append(v.spare[:0], v.pend...) // at most the one held byte
		n, err := v.r.Read(v.buf)
		chunk := v.buf[:n]
		v.hash.Write(chunk)
		lo, hi := max(v.from, v.n), v.n+int64(n)
		if v.to >= 0 {
			hi = min(hi, v.to)
		}
		if lo < hi {
			v.pend = append(v.pend, chunk[lo-v.n:hi-v.n]...)
		}
		v.n += int64(n)
		if v.size >= 0 && v.n > v.size {
			v.err = fmt.Errorf("upstream sent more than %d bytes: %w", v.size, errContentMismatch)
			continue
		}
		switch {
		case err == io.EOF:
			if got := v.digester.Digest(); got != v.want || (v.size >= 0 && v.n != v.size) {
				v.err = fmt.Errorf("blob from upstream: %d bytes with digest %s, want %s: %w", v.n, got, v.want, errContentMismatch)
				continue
			}
			v.verified = true
		case err != nil:
			v.err = err
		}
	}
}

// readerAtFunc is a function as an io.ReaderAt.
type readerAtFunc func(p []byte, off int64) (int, error)

func (f readerAtFunc) ReadAt(p []byte, off int64) (int, error) {
	n, err := f(p, off)
	if n < len(p) && err == nil {
		err = io.ErrUnexpectedEOF // only bytes the client already had are read this way
	}
	return n, err
}
