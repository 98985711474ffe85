package testenv

import (
	"crypto/sha256"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// SyntheticBlob is a large blob that exists nowhere: its bytes are computed from their
// offset (ChaCha8 seeded per 1 MiB block), so a test can serve gigabytes by range without
// holding them. Its digest is computed once, at creation.
type SyntheticBlob struct {
	Size   int64
	Digest digest.Digest
	seed   uint64

	mu    sync.Mutex
	cache map[int64][]byte // recently made blocks: readers read 32 KiB at a time
	order []int64
}

const synthBlock = 1 << 20

// NewSyntheticBlob makes a blob of size bytes; blobs with different seeds differ.
func NewSyntheticBlob(size int64, seed uint64) *SyntheticBlob {
	b := &SyntheticBlob{Size: size, seed: seed, cache: map[int64][]byte{}}
	h := sha256.New()
	io.Copy(h, io.NewSectionReader(b, 0, size))
	b.Digest = digest.NewDigest(digest.SHA256, h)
	return b
}

// ReadAt implements io.ReaderAt.
func (b *SyntheticBlob) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) && off < b.Size {
		idx := off / synthBlock
		block := b.block(idx)
		in := off - idx*synthBlock
		c := copy(p[n:], block[in:min(synthBlock, b.Size-idx*synthBlock)])
		n += c
		off += int64(c)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// block returns block idx, from the cache or made anew.
func (b *SyntheticBlob) block(idx int64) []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if blk, ok := b.cache[idx]; ok {
		return blk
	}
	blk := make([]byte, synthBlock)
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], b.seed)
	binary.LittleEndian.PutUint64(key[8:], uint64(idx))
	rand.NewChaCha8(key).Read(blk)
	if len(b.order) >= 32 {
		delete(b.cache, b.order[0])
		b.order = b.order[1:]
	}
	b.cache[idx] = blk
	b.order = append(b.order, idx)
	return blk
}

// Bytes returns [from, to) of the blob.
func (b *SyntheticBlob) Bytes(from, to int64) []byte {
	p := make([]byte, to-from)
	b.ReadAt(p, from)
	return p
}

// BlobServer is a registry that serves synthetic blobs only (GET and HEAD, with ranges as
// http.ServeContent answers them), at a bounded rate per connection, counting what it sends.
type BlobServer struct {
	blobs map[string]*SyntheticBlob
	// PerConnRate, when set, limits each response to about this many bytes a second.
	PerConnRate atomic.Int64

	sent atomic.Int64

	mu       sync.Mutex
	requests []string // the Range header of each blob GET, "" for none
	active   int
	peak     int
}

// NewBlobServer serves the given blobs under any repository.
func NewBlobServer(blobs ...*SyntheticBlob) *BlobServer {
	s := &BlobServer{blobs: map[string]*SyntheticBlob{}}
	for _, b := range blobs {
		s.blobs[b.Digest.String()] = b
	}
	return s
}

// Sent is the body bytes sent so far; Requests the Range of each blob GET; Peak the most
// responses at once.
func (s *BlobServer) Sent() int64 { return s.sent.Load() }

// Requests returns the Range header of each blob GET so far.
func (s *BlobServer) Requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.requests...)
}

// Peak is the most blob responses that were in flight at once.
func (s *BlobServer) Peak() int { s.mu.Lock(); defer s.mu.Unlock(); return s.peak }

func (s *BlobServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v2/" {
		w.WriteHeader(http.StatusOK)
		return
	}
	i := strings.LastIndex(r.URL.Path, "/blobs/")
	b := s.blobs[r.URL.Path[i+len("/blobs/"):]]
	if i < 0 || b == nil || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
		http.NotFound(w, r)
		return
	}
	s.mu.Lock()
	if r.Method == http.MethodGet {
		s.requests = append(s.requests, r.Header.Get("Range"))
	}
	s.active++
	s.peak = max(s.peak, s.active)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.active--
		s.mu.Unlock()
	}()
	w.Header().Set("Docker-Content-Digest", b.Digest.String())
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(&PacedWriter{ResponseWriter: w, Rate: s.PerConnRate.Load(), Sent: &s.sent}, r, "", time.Time{}, io.NewSectionReader(b, 0, b.Size))
}
