// Package contentstore keeps node-mirror's cache on disk: a containerd local content store
// under <data-dir>/content (so containerd tooling can inspect it) and a small bbolt index
// for what the blob store cannot hold: tags, media types, and where a blob was seen.
package contentstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// ErrNotFound is returned for content the store does not hold.
var ErrNotFound = errdefs.ErrNotFound

// Store is the on-disk cache. It is safe for concurrent use.
type Store struct {
	root string // <data-dir>/content
	cs   content.Store
	db   *bolt.DB
	lock *os.File

	mu      sync.Mutex
	touched map[digest.Digest]access    // accesses not yet flushed to the index
	lastUse map[digest.Digest]time.Time // every access and commit of this process, for LRU order
	pins    map[digest.Digest]int       // blobs being served or downloaded: never evicted
	active  map[string]bool             // ingest refs open in this process: never orphans

	// Running usage, so a commit never walks the store. Guarded by mu.
	used            int64 // bytes of committed blobs
	entries         int   // committed blobs
	reserved        int64 // bytes promised to downloads in flight
	reservedWritten int64 // of which already written to their ingests
	orphanBytes     int64 // bytes of ingests found at Open and not yet resumed or removed
	indexBytes      int64 // index.db beyond indexAllowance, noted after every write to it

	budget      Budget
	gcMu        sync.Mutex    // one collection at a time
	wake        chan struct{} // tells the janitor a commit went over budget
	evictedN    int64
	evictedSize int64
}

type access struct {
	at   time.Time
	hits int64
}

// Open opens (creating if needed) the store under dataDir. Only one process may own a
// data dir at a time: two writers on one ingest would corrupt it.
func Open(dataDir string) (*Store, error) {
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dataDir, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening data dir lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("data dir %s is in use by another node-mirror: %w", dataDir, err)
	}
	quietContainerdLog()
	root := filepath.Join(dataDir, "content")
	// containerd creates blobs/ on the first commit; walking it must work before that.
	if err := os.MkdirAll(filepath.Join(root, "blobs"), 0o755); err != nil {
		lock.Close()
		return nil, fmt.Errorf("creating content store: %w", err)
	}
	// Scratch holds the nameless files ranged fetches keep chunks in until they join the
	// ingest; the files are unlinked as they are made, so nothing here outlives a process.
	if err := os.MkdirAll(filepath.Join(dataDir, "scratch"), 0o700); err != nil {
		lock.Close()
		return nil, fmt.Errorf("creating scratch dir: %w", err)
	}
	cs, err := local.NewStore(root)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("opening content store: %w", err)
	}
	db, err := bolt.Open(filepath.Join(dataDir, "index.db"), 0o644, &bolt.Options{Timeout: time.Second})
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("opening index: %w", err)
	}
	s := &Store{
		root: root, cs: cs, db: db, lock: lock,
		touched: map[digest.Digest]access{}, lastUse: map[digest.Digest]time.Time{},
		pins: map[digest.Digest]int{}, active: map[string]bool{},
		wake: make(chan struct{}, 1),
	}
	if err := s.initIndex(); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.checkIngestLayout(); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.countUsage(); err != nil {
		s.Close()
		return nil, err
	}
	s.noteIndexSize()
	return s, nil
}

// Close flushes pending index updates and releases the data dir.
func (s *Store) Close() error {
	err := s.FlushAccess()
	if cerr := s.db.Close(); err == nil {
		err = cerr
	}
	s.lock.Close()
	return err
}

// Content exposes the containerd content store (for tests and tools).
func (s *Store) Content() content.Store { return s.cs }

// blobPath is containerd's documented on-disk layout for committed blobs.
func (s *Store) blobPath(dgst digest.Digest) string {
	return filepath.Join(s.root, "blobs", dgst.Algorithm().String(), dgst.Encoded())
}

// OpenBlob opens a committed blob for reading. Returning the *os.File (rather than
// containerd's ReaderAt) lets net/http send it with sendfile.
func (s *Store) OpenBlob(dgst digest.Digest) (*os.File, int64, error) {
	if err := dgst.Validate(); err != nil {
		return nil, 0, fmt.Errorf("blob %s: %w", dgst, errdefs.ErrInvalidArgument)
	}
	f, err := os.Open(s.blobPath(dgst))
	if err != nil {
		if os.IsNotExist(err) {
			return nil, 0, fmt.Errorf("blob %s: %w", dgst, ErrNotFound)
		}
		return nil, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, fi.Size(), nil
}

// Size reports a committed blob's size.
func (s *Store) Size(dgst digest.Digest) (int64, error) {
	if err := dgst.Validate(); err != nil {
		return 0, fmt.Errorf("blob %s: %w", dgst, errdefs.ErrInvalidArgument)
	}
	info, err := s.cs.Info(context.Background(), dgst)
	if err != nil {
		return 0, err
	}
	return info.Size, nil
}

// ReadBlob reads a small committed blob (a manifest) whole.
func (s *Store) ReadBlob(dgst digest.Digest) ([]byte, error) {
	f, size, err := s.OpenBlob(dgst)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("reading blob %s: %w", dgst, err)
	}
	return b, nil
}

// PutBlob stores small content already held in memory; the content store verifies the
// digest before the blob becomes visible. Content that is already there is not an error.
func (s *Store) PutBlob(ctx context.Context, dgst digest.Digest, b []byte) error {
	desc := ocispec.Descriptor{Digest: dgst, Size: int64(len(b))}
	ref := ingestRef(dgst)
	w, err := content.OpenWriter(ctx, s.cs, content.WithRef(ref), content.WithDescriptor(desc))
	if errdefs.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("storing %s: %w", dgst, err)
	}
	defer w.Close()
	if _, err := io.Copy(w, bytes.NewReader(b)); err != nil {
		s.cs.Abort(ctx, ref)
		return fmt.Errorf("storing %s: %w", dgst, err)
	}
	err = w.Commit(ctx, desc.Size, dgst)
	if errdefs.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		s.cs.Abort(ctx, ref)
		return fmt.Errorf("storing %s: %w", dgst, err)
	}
	s.committed(dgst, desc.Size)
	return nil
}

func ingestRef(dgst digest.Digest) string { return "node-mirror-" + dgst.String() }

// Ingest is one blob being written. The data file can be read while it grows, which is
// how waiting clients stream a download that is still in progress.
type Ingest struct {
	s      *Store
	dgst   digest.Digest
	ref    string
	w      content.Writer
	data   *os.File // read side of the ingest's data file
	Offset int64    // bytes already present when the ingest was resumed
}

// NewIngest starts, or resumes after a crash, the ingest of dgst. size may be unknown (<=0).
// It fails with errdefs.ErrAlreadyExists when the blob is already committed.
func (s *Store) NewIngest(ctx context.Context, dgst digest.Digest, size int64) (*Ingest, error) {
	ref := ingestRef(dgst)
	w, err := content.OpenWriter(ctx, s.cs, content.WithRef(ref),
		content.WithDescriptor(ocispec.Descriptor{Digest: dgst, Size: size}))
	if err != nil {
		return nil, fmt.Errorf("opening ingest for %s: %w", dgst, err)
	}
	st, err := w.Status()
	if err != nil {
		w.Close()
		return nil, err
	}
	data, err := os.Open(s.ingestDataPath(ref))
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("opening ingest data for %s: %w", dgst, err)
	}
	s.mu.Lock()
	s.active[ref] = true
	if st.Offset > 0 {
		// A crash's leftover, now owned by this download (and counted in its reservation).
		s.orphanBytes = max(0, s.orphanBytes-st.Offset)
	}
	s.mu.Unlock()
	return &Ingest{s: s, dgst: dgst, ref: ref, w: w, data: data, Offset: st.Offset}, nil
}

// Digest is the blob the ingest is for.
func (in *Ingest) Digest() digest.Digest { return in.dgst }

// Write appends to the ingest.
func (in *Ingest) Write(p []byte) (int, error) { return in.w.Write(p) }

// ReaderAt reads what has been written so far. It stays valid after Commit (the file is
// renamed into blobs/, not copied) until Close.
func (in *Ingest) ReaderAt() io.ReaderAt { return in.data }

// Commit verifies size and digest and makes the blob visible. On a mismatch nothing is
// committed and the ingest is discarded.
func (in *Ingest) Commit(ctx context.Context, size int64) error {
	err := in.w.Commit(ctx, size, in.dgst)
	if errdefs.IsAlreadyExists(err) {
		in.s.inactive(in.ref)
		return nil
	}
	if err != nil {
		in.Abort()
		return fmt.Errorf("committing %s: %w", in.dgst, err)
	}
	in.s.inactive(in.ref)
	in.s.committed(in.dgst, size)
	return nil
}

// Abort discards the ingest. Safe to call after a failed Commit.
func (in *Ingest) Abort() {
	defer in.s.inactive(in.ref)
	in.w.Close()
	if err := in.s.cs.Abort(context.Background(), in.ref); err != nil && !errdefs.IsNotFound(err) {
		// Leave it: the next NewIngest for this digest resumes or replaces it.
		return
	}
}

// Leave closes the writer and keeps what was written, for a later resume. Call Close too.
func (in *Ingest) Leave() {
	in.w.Close()
	in.s.mu.Lock()
	delete(in.s.active, in.ref)
	in.s.orphanBytes += in.Offset
	in.s.mu.Unlock()
}

// Close releases the read side; call when no reader needs the data any more.
func (in *Ingest) Close() error { return in.data.Close() }

// ingestDataPath follows containerd's local store layout (ingest/<sha256(ref)>/data).
// checkIngestLayout proves at Open that the layout still holds.
func (s *Store) ingestDataPath(ref string) string {
	return filepath.Join(s.root, "ingest", digest.FromString(ref).Encoded(), "data")
}

func (s *Store) checkIngestLayout() error {
	ctx := context.Background()
	ref := "node-mirror-layout-probe"
	w, err := s.cs.Writer(ctx, content.WithRef(ref))
	if err != nil {
		return fmt.Errorf("probing ingest layout: %w", err)
	}
	defer func() {
		w.Close()
		s.cs.Abort(ctx, ref)
	}()
	if _, err := os.Stat(s.ingestDataPath(ref)); err != nil {
		return fmt.Errorf("containerd ingest layout changed, cannot stream in-progress downloads: %w", err)
	}
	return nil
}

// Digests lists every committed blob.
func (s *Store) Digests(ctx context.Context) ([]digest.Digest, error) {
	var out []digest.Digest
	err := s.cs.Walk(ctx, func(info content.Info) error {
		out = append(out, info.Digest)
		return nil
	})
	return out, err
}

// ScratchDir is where downloads keep temporary files, on the store's filesystem.
func (s *Store) ScratchDir() string { return filepath.Join(filepath.Dir(s.root), "scratch") }

// Path returns the store's containerd content root.
func (s *Store) Path() string { return s.root }

// IsNotFound reports whether err means the content is absent.
func IsNotFound(err error) bool { return errors.Is(err, errdefs.ErrNotFound) }

var quietOnce sync.Once

// quietContainerdLog keeps containerd's package logger to errors: its store probes
// fsverity on open and warns on every filesystem without it, which is most of them.
func quietContainerdLog() {
	quietOnce.Do(func() { log.L.Logger.SetLevel(logrus.ErrorLevel) })
}

// Usage reports the bytes and number of committed blobs, as kept in memory since Open.
func (s *Store) Usage(ctx context.Context) (bytes int64, entries int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.used, s.entries, nil
}

// countUsage walks the store once at Open: the blob files, not the index, are the truth.
func (s *Store) countUsage() error {
	ctx := context.Background()
	var used int64
	var n int
	if err := s.cs.Walk(ctx, func(info content.Info) error {
		used += info.Size
		n++
		return nil
	}); err != nil {
		return fmt.Errorf("measuring the store: %w", err)
	}
	sts, err := s.cs.ListStatuses(ctx)
	if err != nil {
		return fmt.Errorf("listing ingests: %w", err)
	}
	var orphans int64
	for _, st := range sts {
		orphans += st.Offset
	}
	s.mu.Lock()
	s.used, s.entries, s.orphanBytes = used, n, orphans
	s.mu.Unlock()
	return nil
}
