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
// A whole-blob response is verified as it streams and its final byte is held back until
// size and digest match, as for stored blobs: a client never sees a complete response of
// wrong bytes. A Range request is forwarded as is and cannot be verified (nor can it be
// from the store: a client checks a digest over the whole blob only).
func (m *Mirror) passThrough(w http.ResponseWriter, r *http.Request, rt route, why error) {
	m.notePassThrough(r.Context(), rt, why)
	hdr := http.Header{}
	if rg := r.Header.Get("Range"); rg != "" {
		hdr.Set("Range", rg)
	}
	resp, err := rt.client.Do(r.Context(), upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + rt.digest.String(), Header: hdr,
	})
	if err != nil {
		m.fail(w, r, rt, err)
		return
	}
	defer resp.Body.Close()
	noteResult(r.Context(), ResultPassThrough)
	w.Header().Set(cacheHeader, cachehdr.PassThrough)
	if resp.StatusCode == http.StatusPartialContent {
		for _, k := range []string{"Content-Range", "Content-Length"} {
			if v := resp.Header.Get(k); v != "" {
				w.Header().Set(k, v)
			}
		}
		w.Header().Set("Content-Type", blobContentType)
		w.Header().Set("Docker-Content-Digest", rt.digest.String())
		w.WriteHeader(http.StatusPartialContent)
		io.Copy(w, resp.Body)
		return
	}
	if resp.ContentLength >= 0 {
		setContentHeaders(w, blobContentType, rt.digest.String(), resp.ContentLength)
	} else {
		w.Header().Set("Content-Type", blobContentType)
		w.Header().Set("Docker-Content-Digest", rt.digest.String())
	}
	w.WriteHeader(http.StatusOK)
	vr := newVerifyReader(resp.Body, rt.digest, resp.ContentLength)
	if _, err := io.Copy(w, vr); err != nil {
		m.log.Warn("pass-through blob failed", "registry", rt.registry, "repo", rt.repo, "digest", rt.digest, "err", err)
		panic(http.ErrAbortHandler) // a short body, never a clean end
	}
}

// continueUpstream serves the rest of a blob, from pos, after its download failed for want
// of disk space. The bytes the ingest holds (still readable: the reader keeps the file
// open) are hashed first, so the whole blob is verified before the final byte goes out.
func (m *Mirror) continueUpstream(ctx context.Context, rt route, d *download, pos int64) (io.ReadCloser, error) {
	d.mu.Lock()
	have := min(pos, d.written)
	d.mu.Unlock()
	resp, err := rt.client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "blobs/" + d.dgst.String(),
		Header: http.Header{"Range": {fmt.Sprintf("bytes=%d-", have)}},
	})
	if err != nil {
		return nil, err
	}
	vr := newVerifyReader(resp.Body, d.dgst, d.size)
	skip := pos
	if total, ok := continuesAt(resp, have); ok && total == d.size {
		if _, err := io.Copy(vr.digester.Hash(), io.NewSectionReader(d.ingest.ReaderAt(), 0, have)); err != nil {
			resp.Body.Close()
			return nil, err
		}
		vr.n = have
		skip = pos - have
	} else if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("upstream answered %d to a range request", resp.StatusCode)
	}
	if _, err := io.CopyN(io.Discard, vr, skip); err != nil {
		resp.Body.Close()
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{vr, resp.Body}, nil
}

// verifyReader passes a blob through and holds back its final byte until the size and
// digest of everything read are known to match.
type verifyReader struct {
	r        io.Reader
	want     digest.Digest
	size     int64 // -1 if unknown
	digester digest.Digester
	hash     hash.Hash
	n        int64 // bytes hashed so far
	buf      []byte
	start    int
	end      int
	eof      bool
	err      error
}

func newVerifyReader(r io.Reader, want digest.Digest, size int64) *verifyReader {
	dg := want.Algorithm().Digester()
	return &verifyReader{r: r, want: want, size: size, digester: dg, hash: dg.Hash(), buf: make([]byte, 64<<10)}
}

func (v *verifyReader) Read(p []byte) (int, error) {
	for {
		if v.err != nil {
			return 0, v.err
		}
		avail := v.end - v.start
		if !v.eof {
			avail-- // the last byte seen so far might be the final one
		}
		if avail > 0 {
			n := copy(p, v.buf[v.start:v.start+avail])
			v.start += n
			return n, nil
		}
		if v.eof {
			return 0, io.EOF
		}
		copy(v.buf, v.buf[v.start:v.end])
		v.end -= v.start
		v.start = 0
		n, err := v.r.Read(v.buf[v.end:])
		v.hash.Write(v.buf[v.end : v.end+n])
		v.end += n
		v.n += int64(n)
		if v.size >= 0 && v.n > v.size {
			v.err = fmt.Errorf("upstream sent more than %d bytes: %w", v.size, errContentMismatch)
			continue
		}
		switch {
		case err == io.EOF:
			if got := v.digester.Digest(); got != v.want || (v.size >= 0 && v.n != v.size) {
				v.err = fmt.Errorf("passed-through blob: %d bytes with digest %s, want %s: %w", v.n, got, v.want, errContentMismatch)
				continue
			}
			v.eof = true
		case err != nil:
			v.err = err
		}
	}
}
