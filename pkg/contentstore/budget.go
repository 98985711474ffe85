package contentstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Budget bounds the store on disk. Sizes are bytes, or a percentage of the filesystem
// holding the data dir when the Percent field is set; zero means no bound.
type Budget struct {
	MaxBytes       int64
	MaxPercent     float64
	MinFreeBytes   int64
	MinFreePercent float64
	// LowWater is the fraction of MaxSize (and the multiple of MinFree) a collection frees
	// down to, so that eviction runs in batches rather than on every commit. Default 0.9.
	LowWater float64
	// OrphanGrace is how long an ingest nobody writes to is kept for a resume before a
	// collection removes it. Default 1h.
	OrphanGrace time.Duration
}

// SetBudget replaces the budget; the next commit or collection applies it.
func (s *Store) SetBudget(b Budget) {
	if b.LowWater <= 0 || b.LowWater > 1 {
		b.LowWater = 0.9
	}
	if b.OrphanGrace <= 0 {
		b.OrphanGrace = time.Hour
	}
	s.mu.Lock()
	s.budget = b
	s.mu.Unlock()
	s.kick()
}

// fsStat reports the size of, and the space left on, the data dir's filesystem.
func (s *Store) fsStat() (total, free int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return 0, 0, err
	}
	return int64(st.Blocks) * int64(st.Bsize), int64(st.Bavail) * int64(st.Bsize), nil
}

// limits resolves the budget against the filesystem: maxSize 0 is unbounded, minFree 0 no
// floor. Call with mu held.
func (s *Store) limits(fsTotal int64) (maxSize, minFree int64) {
	b := s.budget
	maxSize, minFree = b.MaxBytes, b.MinFreeBytes
	if b.MaxPercent > 0 {
		maxSize = int64(float64(fsTotal) * b.MaxPercent / 100)
	}
	if b.MinFreePercent > 0 {
		minFree = int64(float64(fsTotal) * b.MinFreePercent / 100)
	}
	return maxSize, minFree
}

// overLocked reports whether adding extra bytes would break the budget; call with mu held.
// fs values come from fsStat. free already lacks what in-flight downloads wrote, so
// counting their whole reservation again is conservative, never optimistic.
func (s *Store) overLocked(extra, fsTotal, free int64, factor float64) bool {
	maxSize, minFree := s.limits(fsTotal)
	return overBudget(maxSize, minFree, s.holdingLocked()+extra, fsTotal, free-s.unwritten()-extra, factor)
}

// holdingLocked is what the cache holds on disk or has promised: committed blobs, room
// reserved by downloads, orphaned ingests, and the index itself (it grows with every tag
// and repository a client names, so it is part of the budget). Call with mu held.
func (s *Store) holdingLocked() int64 {
	return s.used + s.reserved + s.orphanBytes + s.indexBytes
}

// unwritten is what downloads in flight have reserved but not yet written: the part of
// their size the filesystem's free space does not show yet. Call with mu held.
func (s *Store) unwritten() int64 { return max(0, s.reserved-s.reservedWritten) }

// overBudget: would the store hold more than factor×maxSize bytes, or leave less than
// minFree/factor on the filesystem? factor below 1 is the low-water mark a collection
// frees down to.
func overBudget(maxSize, minFree, holding, fsTotal, free int64, factor float64) bool {
	if maxSize > 0 && float64(holding) > float64(maxSize)*factor {
		return true
	}
	if fsTotal <= 0 {
		return false
	}
	// With no floor configured the floor is the disk itself: a blob that does not fit.
	return free < 0 || (minFree > 0 && float64(free) < float64(minFree)/factor)
}

// Pin keeps dgst from eviction until the matching Unpin: the mirror pins what it is
// serving or downloading.
func (s *Store) Pin(dgst digest.Digest) {
	s.mu.Lock()
	s.pins[dgst]++
	s.mu.Unlock()
}

// Unpin releases one Pin.
func (s *Store) Unpin(dgst digest.Digest) {
	s.mu.Lock()
	if s.pins[dgst]--; s.pins[dgst] <= 0 {
		delete(s.pins, dgst)
	}
	s.mu.Unlock()
}

// Reservation is room promised to one download; Release it when the download ends.
// A committed blob's bytes move from the reservation to the usage in one step.
type Reservation struct {
	s       *Store
	size    int64
	written int64
	done    bool
}

// Wrote notes n more bytes of the reserved blob on disk.
func (r *Reservation) Wrote(n int64) {
	if r == nil {
		return
	}
	r.s.mu.Lock()
	if !r.done {
		n = min(n, r.size-r.written)
		r.written += n
		r.s.reservedWritten += n
	}
	r.s.mu.Unlock()
}

// Extend asks for n more bytes for a download whose length was not known up front (an
// upstream without Content-Length): the budget is kept as the bytes arrive, and the
// download is stopped, rather than the disk filled, once it would break it. It evicts like
// Reserve and fails with ErrNoRoom.
func (r *Reservation) Extend(ctx context.Context, n int64) error {
	if n <= 0 {
		return nil
	}
	s := r.s
	try := func() (bool, error) {
		total, free, err := s.fsStat()
		if err != nil {
			return false, err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if r.done {
			return false, errors.New("reservation released")
		}
		if s.overLocked(n, total, free, 1) {
			return false, nil
		}
		s.reserved += n
		r.size += n
		return true, nil
	}
	if ok, err := try(); ok || err != nil {
		return err
	}
	if _, err := s.collect(ctx, false, n); err != nil {
		return err
	}
	if ok, err := try(); ok || err != nil {
		return err
	}
	return fmt.Errorf("%w: %d more bytes wanted for a download of unknown length, %d reserved for it", ErrNoRoom, n, r.size)
}

// Size is the room the reservation holds.
func (r *Reservation) Size() int64 {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	return r.size
}

// Release returns what is left of the reservation. Safe to call more than once.
func (r *Reservation) Release() {
	if r == nil {
		return
	}
	r.s.mu.Lock()
	if !r.done {
		r.done = true
		r.s.reserved -= r.size
		r.s.reservedWritten -= r.written
	}
	r.s.mu.Unlock()
}

// ErrNoRoom means a blob cannot be stored within the budget, even after evicting all that
// may be evicted: what is left is in use. The caller passes the blob through instead.
var ErrNoRoom = errors.New("no room in the cache budget")

// Reserve makes room for size bytes, evicting least recently used blobs if it must.
// It fails with ErrNoRoom when the budget is taken by blobs in use and downloads in flight.
func (s *Store) Reserve(ctx context.Context, size int64) (*Reservation, error) {
	if size < 0 {
		size = 0
	}
	try := func() (*Reservation, bool, error) {
		total, free, err := s.fsStat()
		if err != nil {
			return nil, false, err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.overLocked(size, total, free, 1) {
			return nil, false, nil
		}
		s.reserved += size
		return &Reservation{s: s, size: size}, true, nil
	}
	if r, ok, err := try(); ok || err != nil {
		return r, err
	}
	if _, err := s.collect(ctx, false, size); err != nil {
		return nil, err
	}
	if r, ok, err := try(); ok || err != nil {
		return r, err
	}
	total, free, _ := s.fsStat()
	s.mu.Lock()
	defer s.mu.Unlock()
	maxSize, minFree := s.limits(total)
	return nil, fmt.Errorf("%w: %d bytes wanted; %d stored, %d reserved, %d pinned blobs; budget %d, %d free on disk (floor %d)",
		ErrNoRoom, size, s.used, s.reserved, len(s.pins), maxSize, free, minFree)
}

// committed accounts a newly committed blob and wakes the janitor when over budget.
func (s *Store) committed(dgst digest.Digest, size int64) {
	s.mu.Lock()
	s.used += size
	s.entries++
	s.lastUse[dgst] = time.Now()
	s.mu.Unlock()
	s.kick()
}

func (s *Store) inactive(ref string) {
	s.mu.Lock()
	delete(s.active, ref)
	s.mu.Unlock()
}

// kick asks the janitor to check the budget; it never blocks.
func (s *Store) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Evicted is one blob a collection removed (or, in a dry run, would remove).
type Evicted struct {
	Digest     digest.Digest `json:"digest"`
	Size       int64         `json:"size"`
	MediaType  string        `json:"mediaType,omitempty"`
	LastAccess time.Time     `json:"lastAccess"`
	Repos      []string      `json:"repos,omitempty"`
}

// Orphan is an ingest left by a crash.
type Orphan struct {
	Ref       string    `json:"ref"`
	Size      int64     `json:"size"`
	UpdatedAt time.Time `json:"updatedAt"`
}

// GCReport says what a collection freed or, with DryRun, would free.
type GCReport struct {
	DryRun      bool      `json:"dryRun"`
	Evicted     []Evicted `json:"evicted"`
	Orphans     []Orphan  `json:"orphans"`
	StaleIndex  int       `json:"staleIndexEntries"` // index entries whose blob is gone
	StaleTags   int       `json:"staleTags"`         // tags whose manifest is gone
	FreedBytes  int64     `json:"freedBytes"`
	UsageBefore int64     `json:"usageBefore"`
	UsageAfter  int64     `json:"usageAfter"`
}

// Collect runs one collection: evict least recently used blobs while over the budget
// (down to its low-water mark), remove orphaned ingests past their grace period, and drop
// index entries whose blob is gone. With dryRun nothing changes and the report says what
// would have.
func (s *Store) Collect(ctx context.Context, dryRun bool) (GCReport, error) {
	return s.collect(ctx, dryRun, 0)
}

type candidate struct {
	Evicted
	hasMeta bool
}

// collect frees room for extra more bytes beyond the low-water mark.
func (s *Store) collect(ctx context.Context, dryRun bool, extra int64) (GCReport, error) {
	s.gcMu.Lock()
	defer s.gcMu.Unlock()
	rep := GCReport{DryRun: dryRun, Evicted: []Evicted{}, Orphans: []Orphan{}}
	s.mu.Lock()
	rep.UsageBefore = s.used
	grace := s.budget.OrphanGrace
	lowWater := s.budget.LowWater
	s.mu.Unlock()
	if lowWater == 0 {
		lowWater = 0.9
	}
	if grace == 0 {
		grace = time.Hour
	}

	// Orphans first: they hold space no client can use.
	sts, err := s.cs.ListStatuses(ctx)
	if err != nil {
		return rep, fmt.Errorf("listing ingests: %w", err)
	}
	for _, st := range sts {
		s.mu.Lock()
		active := s.active[st.Ref]
		s.mu.Unlock()
		if active || !strings.HasPrefix(st.Ref, "node-mirror-") || time.Since(st.UpdatedAt) < grace {
			continue
		}
		rep.Orphans = append(rep.Orphans, Orphan{Ref: st.Ref, Size: st.Offset, UpdatedAt: st.UpdatedAt})
		rep.FreedBytes += st.Offset
		if dryRun {
			continue
		}
		if err := s.cs.Abort(ctx, st.Ref); err != nil && !IsNotFound(err) {
			return rep, fmt.Errorf("removing orphaned ingest %s: %w", st.Ref, err)
		}
		s.mu.Lock()
		s.orphanBytes = max(0, s.orphanBytes-st.Offset)
		s.mu.Unlock()
	}

	cands, stale, err := s.candidates(ctx)
	if err != nil {
		return rep, err
	}
	total, free, err := s.fsStat()
	if err != nil {
		return rep, err
	}
	// A dry run changes nothing, so it tracks what it would have freed itself.
	var orphanFreed, pretend int64
	for _, o := range rep.Orphans {
		orphanFreed += o.Size
	}
	var gone []digest.Digest
	for _, c := range cands {
		s.mu.Lock()
		used, orphans, fsFree := s.used, s.orphanBytes, free
		if dryRun {
			used -= pretend
			orphans = max(0, orphans-orphanFreed)
			fsFree += pretend + orphanFreed
		}
		maxSize, minFree := s.limits(total)
		over := overBudget(maxSize, minFree, used+s.reserved+orphans+s.indexBytes+extra, total, fsFree-s.unwritten()-extra, lowWater)
		if !over || s.pins[c.Digest] > 0 {
			s.mu.Unlock()
			if !over {
				break
			}
			continue
		}
		if dryRun {
			pretend += c.Size
			s.mu.Unlock()
		} else {
			// File first, then the index: a crash in between leaves an index entry without
			// a blob, which is never served (OpenBlob fails, the blob is fetched again) and
			// is dropped by the next collection.
			err := s.cs.Delete(ctx, c.Digest)
			if err != nil && !IsNotFound(err) {
				s.mu.Unlock()
				return rep, fmt.Errorf("evicting %s: %w", c.Digest, err)
			}
			if err == nil {
				s.used -= c.Size
				s.entries--
				s.evictedN++
				s.evictedSize += c.Size
				free += c.Size
			}
			delete(s.lastUse, c.Digest)
			delete(s.touched, c.Digest)
			s.mu.Unlock()
			if c.hasMeta {
				gone = append(gone, c.Digest)
			}
		}
		rep.Evicted = append(rep.Evicted, c.Evicted)
		rep.FreedBytes += c.Size
	}
	rep.StaleIndex = len(stale)
	if !dryRun {
		if err := s.dropMeta(append(gone, stale...)); err != nil {
			return rep, err
		}
	}
	// Tags whose manifest is gone point nowhere: the next pull of the tag asks upstream
	// anyway. Dropping them keeps the index bounded by what the store holds, whatever
	// names clients ask for.
	if rep.StaleTags, err = s.pruneTags(dryRun); err != nil {
		return rep, err
	}
	s.mu.Lock()
	rep.UsageAfter = s.used
	s.mu.Unlock()
	if dryRun {
		rep.UsageAfter = rep.UsageBefore - pretend
	}
	return rep, nil
}

// candidates lists committed blobs, least recently used first (ties by digest, so a dry
// run and the collection after it agree), and index entries whose blob is gone.
func (s *Store) candidates(ctx context.Context) ([]candidate, []digest.Digest, error) {
	metas := map[digest.Digest]BlobMeta{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketBlobs).ForEach(func(k, v []byte) error {
			var m BlobMeta
			if json.Unmarshal(v, &m) == nil {
				metas[digest.Digest(k)] = m
			}
			return nil
		})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("reading index: %w", err)
	}
	var cands []candidate
	err = s.cs.Walk(ctx, func(info content.Info) error {
		m, ok := metas[info.Digest]
		delete(metas, info.Digest)
		last := info.UpdatedAt
		if ok && m.LastAccess > 0 {
			last = time.Unix(m.LastAccess, 0)
		}
		s.mu.Lock()
		if t, ok := s.lastUse[info.Digest]; ok && t.After(last) {
			last = t
		}
		s.mu.Unlock()
		cands = append(cands, candidate{Evicted: Evicted{
			Digest: info.Digest, Size: info.Size, MediaType: m.MediaType, LastAccess: last, Repos: m.Repos,
		}, hasMeta: ok})
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("walking the store: %w", err)
	}
	slices.SortFunc(cands, func(a, b candidate) int {
		if c := a.LastAccess.Compare(b.LastAccess); c != 0 {
			return c
		}
		return strings.Compare(string(a.Digest), string(b.Digest))
	})
	var stale []digest.Digest
	for d := range metas {
		if _, err := os.Stat(s.blobPath(d)); os.IsNotExist(err) {
			stale = append(stale, d)
		}
	}
	slices.Sort(stale)
	return cands, stale, nil
}

func (s *Store) dropMeta(ds []digest.Digest) error {
	if len(ds) == 0 {
		return nil
	}
	return s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBlobs)
		for _, d := range ds {
			// Re-check: the blob may have been fetched again since it was evicted.
			if _, err := os.Stat(s.blobPath(d)); err == nil {
				continue
			}
			if err := b.Delete([]byte(d)); err != nil {
				return err
			}
		}
		return nil
	})
}

// Janitor keeps the store inside its budget until ctx ends: it collects when a commit
// went over the budget and every interval (other processes fill the disk too, and orphans
// age). report, when set, sees each collection that did something.
func (s *Store) Janitor(ctx context.Context, interval time.Duration, report func(GCReport, error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.wake:
			if !s.overBudget() {
				continue
			}
		}
		rep, err := s.Collect(ctx, false)
		if report != nil && (err != nil || rep.FreedBytes > 0 || rep.StaleIndex > 0 || rep.StaleTags > 0) {
			report(rep, err)
		}
	}
}

func (s *Store) overBudget() bool {
	total, free, err := s.fsStat()
	if err != nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.overLocked(0, total, free, 1)
}
