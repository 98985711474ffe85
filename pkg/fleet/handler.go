package fleet

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ChunkSource serves chunks to peers. The mirror implements it.
type ChunkSource interface {
	// OpenChunk returns the bytes [Offset, Offset+Length) of the blob, blocking while they
	// arrive (from the store, the node's own in-flight download, or upstream). Errors it
	// knows before the first byte (ErrNotFound, ErrUnavailable, ErrTooManyRequests) become
	// statuses; once it returns a reader the status is 200, and a reader that fails or
	// ends early aborts the response.
	OpenChunk(ctx context.Context, req ChunkRequest) (io.ReadCloser, error)
}

// handlerConfig is what the peer API server needs besides the source.
type handlerConfig struct {
	sign     signer
	maxChunk int64
	// writeIdle bounds each write to a receiver: one that stops reading is cut off
	// instead of pinning the chunk's source forever.
	writeIdle time.Duration
	log       *slog.Logger
	// sent records bytes written to a peer (an authenticated name); nil ignores them.
	sent func(peer string) func(n int64)
	now  func() time.Time
}

type handler struct {
	src ChunkSource
	handlerConfig
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 128<<10); return &b }}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Authentication comes first: a request without the key is told nothing, not even
	// whether its path exists.
	peer, ok := h.sign.verify(r, h.now())
	if !ok {
		h.log.Debug("peer request refused: authentication", "remote", r.RemoteAddr)
		writeError(w, r, errUnauthorized, "")
		return
	}
	// Valid requests never need escaping; an escaped byte is a confused or hostile peer.
	dgst, ok := strings.CutPrefix(r.URL.Path, blobsPath)
	if !ok || r.URL.RawPath != "" || strings.Contains(r.URL.EscapedPath(), "%") || strings.Contains(dgst, "/") {
		writeError(w, r, errNotFound, "")
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, r, errMethod, "")
		return
	}
	req, err := parseChunkRequest(dgst, r.URL.RawQuery, h.maxChunk)
	if err != nil {
		writeError(w, r, errBadRequest, err.Error())
		return
	}
	rc, err := h.src.OpenChunk(r.Context(), req)
	if err != nil {
		if r.Context().Err() != nil {
			return // the peer left; nobody to answer
		}
		h.log.Debug("peer chunk refused", "peer", peer, "digest", req.Digest, "offset", req.Offset, "err", err)
		writeError(w, r, toWire(err), "")
		return
	}
	defer rc.Close()
	hd := w.Header()
	hd.Set("Content-Type", "application/octet-stream")
	hd.Set("Content-Length", strconv.FormatInt(req.Length, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	rc2 := http.NewResponseController(w)
	// Headers go out now: the receiver's header timeout measures whether we answer,
	// its idle timeout whether bytes flow.
	_ = rc2.Flush()
	var add func(int64)
	if h.sent != nil {
		add = h.sent(peer)
	}
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	n, err := copyExactly(w, rc2, rc, req.Length, *bp, h.writeIdle, add)
	if n != req.Length {
		if r.Context().Err() == nil {
			h.log.Warn("peer chunk cut short", "peer", peer, "digest", req.Digest, "offset", req.Offset,
				"length", req.Length, "sent", n, "err", err)
		}
		// A clean end would hand the receiver a short chunk with a 200; cut the
		// connection so it sees an error instead.
		panic(http.ErrAbortHandler)
	}
}

// copyExactly copies length bytes from src to w, extending w's write deadline before
// every write. It returns the bytes written and the error that stopped it short.
func copyExactly(w io.Writer, rc *http.ResponseController, src io.Reader, length int64, buf []byte,
	writeIdle time.Duration, add func(int64)) (int64, error) {
	var n int64
	for n < length {
		b := buf
		if rem := length - n; rem < int64(len(b)) {
			b = b[:rem]
		}
		nr, rerr := src.Read(b)
		if nr > 0 {
			if writeIdle > 0 {
				_ = rc.SetWriteDeadline(time.Now().Add(writeIdle))
			}
			nw, werr := w.Write(b[:nr])
			n += int64(nw)
			if add != nil && nw > 0 {
				add(int64(nw))
			}
			if werr != nil {
				return n, werr
			}
		}
		if rerr != nil {
			if n == length {
				break
			}
			if errors.Is(rerr, io.EOF) {
				rerr = io.ErrUnexpectedEOF
			}
			return n, rerr
		}
	}
	return n, nil
}
