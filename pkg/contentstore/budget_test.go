package contentstore

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// put stores n random bytes as a blob and records it, as the mirror does.
func put(t *testing.T, s *Store, n int) digest.Digest {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	d := digest.FromBytes(b)
	if err := s.PutBlob(context.Background(), d, b); err != nil {
		t.Fatal(err)
	}
	if err := s.RecordBlob(d, "", int64(n), "docker.io/library/app"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Millisecond) // distinct access times
	return d
}

func digests(t *testing.T, s *Store) []digest.Digest {
	t.Helper()
	ds, err := s.Digests(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(ds)
	return ds
}

func TestUsageIsKeptInMemory(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	a := put(t, s, 1000)
	put(t, s, 2000)
	s.PutBlob(context.Background(), a, nil) // already there: not counted twice
	if b, n, _ := s.Usage(context.Background()); b != 3000 || n != 2 {
		t.Fatalf("usage %d bytes %d entries, want 3000 and 2", b, n)
	}
	s.Close()
	s = open(t, dir) // recounted from the blob files at Open
	defer s.Close()
	if b, n, _ := s.Usage(context.Background()); b != 3000 || n != 2 {
		t.Fatalf("usage after reopen %d bytes %d entries", b, n)
	}
}

// TestCollectEvictsLeastRecentlyUsed: over the budget, the oldest accesses go first,
// down to the low-water mark; pinned blobs stay; a dry run reports exactly what the real
// collection then frees, and changes nothing.
func TestCollectEvictsLeastRecentlyUsed(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	var ds []digest.Digest
	for range 10 {
		ds = append(ds, put(t, s, 1000))
	}
	s.Touch(ds[0]) // used again: now the most recent
	s.Pin(ds[1])   // being served: never evicted
	s.SetBudget(Budget{MaxBytes: 6000, LowWater: 0.5})

	before := digests(t, s)
	dry, err := s.Collect(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(before, digests(t, s)) {
		t.Fatal("dry run changed the store")
	}
	if u, _, _ := s.Usage(ctx); u != 10000 {
		t.Fatalf("dry run changed the usage to %d", u)
	}
	want := ds[2:9] // down to 3000 bytes: ds[0], ds[1] and one more stay
	var got []digest.Digest
	for _, e := range dry.Evicted {
		got = append(got, e.Digest)
	}
	if !slices.Equal(got, want) || dry.FreedBytes != 7000 || dry.UsageAfter != 3000 {
		t.Fatalf("dry run would evict %v (%d bytes, %d after), want %v", got, dry.FreedBytes, dry.UsageAfter, want)
	}

	real, err := s.Collect(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	real.DryRun = true
	if !slices.EqualFunc(real.Evicted, dry.Evicted, func(a, b Evicted) bool { return a.Digest == b.Digest }) ||
		real.FreedBytes != dry.FreedBytes || real.UsageAfter != dry.UsageAfter {
		t.Fatalf("collection %+v differs from its dry run %+v", real, dry)
	}
	if u, n, _ := s.Usage(ctx); u != 3000 || n != 3 {
		t.Fatalf("usage after collection %d bytes %d entries", u, n)
	}
	left := digests(t, s)
	for _, d := range []digest.Digest{ds[0], ds[1], ds[9]} {
		if !slices.Contains(left, d) {
			t.Errorf("%s was evicted", d)
		}
	}
	for _, d := range want {
		if _, found, _ := s.BlobMeta(d); found {
			t.Errorf("index entry of evicted %s kept", d)
		}
		if _, _, err := s.OpenBlob(d); !IsNotFound(err) {
			t.Errorf("evicted %s still opens: %v", d, err)
		}
	}
}

func TestReserveEvictsOrRefuses(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	a := put(t, s, 4000)
	b := put(t, s, 4000)
	s.SetBudget(Budget{MaxBytes: 10000})
	r, err := s.Reserve(ctx, 2000) // fits
	if err != nil {
		t.Fatal(err)
	}
	if ds := digests(t, s); len(ds) != 2 {
		t.Fatalf("a fitting reservation evicted: %v", ds)
	}
	// 10000 in use or promised: the next one evicts the least recently used blob.
	r2, err := s.Reserve(ctx, 3000)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.OpenBlob(a); !IsNotFound(err) {
		t.Fatal("the least recently used blob was not evicted to make room")
	}
	// Everything else pinned or promised: no room, nothing more evicted.
	s.Pin(b)
	if _, err := s.Reserve(ctx, 5000); !errors.Is(err, ErrNoRoom) {
		t.Fatalf("reserve with the budget in use: %v, want ErrNoRoom", err)
	}
	if _, _, err := s.OpenBlob(b); err != nil {
		t.Fatal("a pinned blob was evicted")
	}
	r.Release()
	r2.Release()
	r2.Release() // idempotent
	if _, err := s.Reserve(ctx, 5000); err != nil {
		t.Fatalf("released room not reusable: %v", err)
	}
}

// TestCollectAfterCrashMidEviction: a blob file removed without its index entry (a crash
// between the two steps) is never served and its entry is dropped by the next collection.
func TestCollectAfterCrashMidEviction(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	d := put(t, s, 100)
	if err := os.Remove(s.blobPath(d)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.OpenBlob(d); !IsNotFound(err) {
		t.Fatalf("blob without file opens: %v", err)
	}
	rep, err := s.Collect(ctx, false)
	if err != nil || rep.StaleIndex != 1 {
		t.Fatalf("collect: %+v %v", rep, err)
	}
	if _, found, _ := s.BlobMeta(d); found {
		t.Fatal("stale index entry kept")
	}
}

func TestOrphanedIngestsRemovedAfterGrace(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := open(t, dir)
	d := digest.FromString("never finished")
	in, err := s.NewIngest(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	in.Write(make([]byte, 500))
	in.Close()
	s.Close() // a crash: the ingest stays

	s = open(t, dir)
	defer s.Close()
	s.SetBudget(Budget{OrphanGrace: time.Hour})
	if rep, _ := s.Collect(ctx, false); len(rep.Orphans) != 0 {
		t.Fatalf("a young orphan was removed: %+v", rep.Orphans)
	}
	s.SetBudget(Budget{OrphanGrace: time.Nanosecond})
	dry, _ := s.Collect(ctx, true)
	if len(dry.Orphans) != 1 || dry.Orphans[0].Size != 500 {
		t.Fatalf("dry run orphans %+v", dry.Orphans)
	}
	if sts, _ := s.Content().ListStatuses(ctx); len(sts) != 1 {
		t.Fatal("dry run removed the orphan")
	}
	rep, err := s.Collect(ctx, false)
	if err != nil || len(rep.Orphans) != 1 || rep.FreedBytes != 500 {
		t.Fatalf("collect %+v %v", rep, err)
	}
	if sts, _ := s.Content().ListStatuses(ctx); len(sts) != 0 {
		t.Fatalf("orphan left: %v", sts)
	}
}

// TestUnknownLengthKeepsTheBudget: a download without a length asks for room as its
// bytes arrive and is refused once it would break the budget.
func TestUnknownLengthKeepsTheBudget(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	s.SetBudget(Budget{MaxBytes: 10000})
	r, err := s.Reserve(ctx, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Release()
	grown := int64(0)
	for range 100 {
		if err := r.Extend(ctx, 1000); err != nil {
			if !errors.Is(err, ErrNoRoom) {
				t.Fatalf("extend: %v, want ErrNoRoom", err)
			}
			break
		}
		grown += 1000
	}
	if grown != 10000 || r.Size() != 10000 {
		t.Fatalf("grew to %d (reservation %d), want exactly the 10000-byte budget", grown, r.Size())
	}
	// The refused growth left nothing behind: released, the room is whole again.
	r.Release()
	if _, err := s.Reserve(ctx, 10000); err != nil {
		t.Fatalf("room not returned: %v", err)
	}
}

// TestIndexCountsInTheBudget: tags a client makes the mirror record grow index.db; past
// its allowance the index takes budget like content.
func TestIndexCountsInTheBudget(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	const budget = 4 << 20
	s.SetBudget(Budget{MaxBytes: budget})
	d := digest.FromString("manifest")
	v, _ := json.Marshal(TagEntry{Digest: d, Size: 1})
	// What SetTag does for each tag a client names, in a few big transactions for speed.
	for batch := 0; ; batch++ {
		err := s.update(func(tx *bolt.Tx) error {
			for i := range 2000 {
				k := tagKey("docker.io", "library/app", fmt.Sprintf("tag-%03d-%04d-%s", batch, i, strings.Repeat("x", 100)))
				if err := tx.Bucket(bucketTags).Put(k, v); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		s.mu.Lock()
		counted := s.indexBytes
		s.mu.Unlock()
		if counted >= 3<<20 {
			break
		}
		if batch > 100 {
			t.Fatalf("index at %d bytes over its allowance after %d tags", counted, batch*2000)
		}
	}
	s.mu.Lock()
	counted := s.indexBytes
	s.mu.Unlock()
	if counted < 2<<20 {
		t.Fatalf("index counted as %d bytes against the budget, want its size beyond the allowance", counted)
	}
	if s.used != 0 || !s.wouldBreak(2<<20) {
		t.Fatal("2 MiB more next to an index 3 MiB past its allowance fits a 4 MiB budget: the index is not counted")
	}
	r, err := s.Reserve(ctx, 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	r.Release()
	// The reservation had to collect to fit: the tags point at a manifest the store does
	// not hold, so the collection dropped them, and the index's freed pages stopped counting.
	if _, found, _ := s.Tag("docker.io", "library/app", fmt.Sprintf("tag-%03d-%04d-%s", 0, 0, strings.Repeat("x", 100))); found {
		t.Fatal("a tag without its manifest survived the collection")
	}
	s.mu.Lock()
	counted = s.indexBytes
	s.mu.Unlock()
	if counted != 0 {
		t.Fatalf("emptied index still counted as %d bytes", counted)
	}
}

// wouldBreak: would n more bytes break the budget right now?
func (s *Store) wouldBreak(n int64) bool {
	total, free, _ := s.fsStat()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.overLocked(n, total, free, 1)
}

// TestStaleTagsPruned: a tag whose manifest was evicted is dropped by the collection;
// a tag whose manifest is stored stays; a dry run counts without dropping.
func TestStaleTagsPruned(t *testing.T) {
	ctx := context.Background()
	s := open(t, t.TempDir())
	defer s.Close()
	kept := put(t, s, 100)
	evicted := put(t, s, 100)
	for tag, d := range map[string]digest.Digest{"kept": kept, "evicted": evicted, "never": digest.FromString("x")} {
		if err := s.SetTag("docker.io", "library/app", tag, TagEntry{Digest: d, Size: 100}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Content().Delete(ctx, evicted); err != nil {
		t.Fatal(err)
	}
	dry, err := s.Collect(ctx, true)
	if err != nil || dry.StaleTags != 2 {
		t.Fatalf("dry run: %d stale tags, %v; want 2", dry.StaleTags, err)
	}
	if _, found, _ := s.Tag("docker.io", "library/app", "never"); !found {
		t.Fatal("dry run dropped a tag")
	}
	rep, err := s.Collect(ctx, false)
	if err != nil || rep.StaleTags != 2 {
		t.Fatalf("collect: %d stale tags, %v; want 2", rep.StaleTags, err)
	}
	for tag, want := range map[string]bool{"kept": true, "evicted": false, "never": false} {
		if _, found, _ := s.Tag("docker.io", "library/app", tag); found != want {
			t.Errorf("tag %s present %v after collection, want %v", tag, found, want)
		}
	}
}

// TestReposPerBlobBounded: asking for a blob under ever new repository names does not
// grow its index entry without bound.
func TestReposPerBlobBounded(t *testing.T) {
	s := open(t, t.TempDir())
	defer s.Close()
	d := put(t, s, 10)
	for i := range 1000 {
		if err := s.RecordBlob(d, "", 10, fmt.Sprintf("docker.io/x/r%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	m, _, err := s.BlobMeta(d)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Repos) != maxRepos || m.Repos[len(m.Repos)-1] != "docker.io/x/r999" {
		t.Fatalf("%d repos kept (last %q), want the %d most recent", len(m.Repos), m.Repos[len(m.Repos)-1], maxRepos)
	}
}
