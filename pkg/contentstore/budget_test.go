package contentstore

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
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
