package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/node-mirror/node-mirror/internal/wire"
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

// ManifestSource serves manifests by digest to peers. A ChunkSource passed to Handler or
// Serve may implement it too (the mirror does); if it does not, manifests are not found.
type ManifestSource interface {
	// OpenManifest returns the manifest's body, verified against req.Digest, and its media
	// type, from the store or from upstream. Errors as for OpenChunk (ErrNotFound,
	// ErrUnavailable, ErrTooManyRequests). A body over the manifest bound, or a media type
	// that is not one, is answered 503: the receiver would refuse it.
	OpenManifest(ctx context.Context, req ManifestRequest) (body []byte, mediaType string, err error)
}

// handlerConfig is what the peer API server needs besides the source.
type handlerConfig struct {
	sign        signer
	maxChunk    int64
	maxManifest int64
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
		wire.Write(w, r, wire.Unauthorized)
		return
	}
	// Valid requests never need escaping; an escaped byte is a confused or hostile peer.
	if r.URL.RawPath != "" || strings.Contains(r.URL.EscapedPath(), "%") {
		wire.Write(w, r, wire.NotFound)
		return
	}
	var serve func(w http.ResponseWriter, r *http.Request, peer, dgst string)
	dgst, ok := strings.CutPrefix(r.URL.Path, blobsPath)
	if ok {
		serve = h.serveChunk
	} else if dgst, ok = strings.CutPrefix(r.URL.Path, manifestsPath); ok {
		if ms, is := h.src.(ManifestSource); is {
			serve = func(w http.ResponseWriter, r *http.Request, peer, dgst string) {
				h.serveManifest(w, r, ms, peer, dgst)
			}
		}
	}
	if serve == nil || strings.Contains(dgst, "/") {
		wire.Write(w, r, wire.NotFound)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		wire.Write(w, r, errMethod)
		return
	}
	serve(w, r, peer, dgst)
}

func (h *handler) serveChunk(w http.ResponseWriter, r *http.Request, peer, dgst string) {
	req, err := parseChunkRequest(dgst, r.URL.RawQuery, h.maxChunk)
	if err != nil {
		wire.Write(w, r, errBadRequest.With("invalid peer request: "+err.Error()))
		return
	}
	rc, err := h.src.OpenChunk(r.Context(), req)
	if err != nil {
		if r.Context().Err() != nil {
			return // the peer left; nobody to answer
		}
		h.log.Debug("peer chunk refused", "peer", peer, "digest", req.Digest, "offset", req.Offset, "err", err)
		wire.Write(w, r, toWire(err, wire.BlobUnknown.With("blob unknown to this member")))
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

func (h *handler) serveManifest(w http.ResponseWriter, r *http.Request, src ManifestSource, peer, dgst string) {
	req, err := parseManifestRequest(dgst, r.URL.RawQuery)
	if err != nil {
		wire.Write(w, r, errBadRequest.With("invalid peer request: "+err.Error()))
		return
	}
	body, mediaType, err := src.OpenManifest(r.Context(), req)
	if err != nil {
		if r.Context().Err() != nil {
			return
		}
		h.log.Debug("peer manifest refused", "peer", peer, "digest", req.Digest, "err", err)
		wire.Write(w, r, toWire(err, wire.ManifestUnknown.With("manifest unknown to this member")))
		return
	}
	// The source is our own mirror, but what it hands over is checked against the same
	// rules the receiver applies: better a 503 here than bytes the receiver must refuse.
	mt, err := parseMediaType(mediaType)
	if err == nil && int64(len(body)) > h.maxManifest {
		err = fmt.Errorf("%d bytes, over the %d-byte limit", len(body), h.maxManifest)
	}
	if err != nil {
		h.log.Warn("peer manifest not served", "peer", peer, "digest", req.Digest, "err", err)
		wire.Write(w, r, wire.Unavailable.With("content unavailable"))
		return
	}
	hd := w.Header()
	hd.Set("Content-Type", mt)
	hd.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	if h.writeIdle > 0 {
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(h.writeIdle))
	}
	n, err := w.Write(body)
	if h.sent != nil && n > 0 {
		h.sent(peer)(int64(n))
	}
	if err != nil && r.Context().Err() == nil {
		// Content-Length was declared: the server cannot end this response clean.
		h.log.Warn("peer manifest cut short", "peer", peer, "digest", req.Digest, "sent", n, "err", err)
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
