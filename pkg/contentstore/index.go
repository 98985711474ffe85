package contentstore

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

var (
	bucketTags  = []byte("tags")  // "<registry>/<repo>:<tag>" -> TagEntry
	bucketBlobs = []byte("blobs") // "<digest>" -> BlobMeta
)

// TagEntry is what a tag pointed to when it was last fetched from upstream.
type TagEntry struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
}

// BlobMeta is what the blob store cannot record about a blob.
type BlobMeta struct {
	MediaType  string   `json:"mediaType,omitempty"`
	Size       int64    `json:"size"`
	Repos      []string `json:"repos,omitempty"` // "<registry>/<repo>" it was seen in
	LastAccess int64    `json:"lastAccess"`      // unix seconds
	Hits       int64    `json:"hits,omitempty"`  // requests answered from the store
}

func (s *Store) initIndex() error {
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketTags, bucketBlobs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("creating index bucket %s: %w", b, err)
			}
		}
		return nil
	})
}

func tagKey(registry, repo, tag string) []byte {
	return []byte(registry + "/" + repo + ":" + tag)
}

// Tag returns the cached entry for a tag.
func (s *Store) Tag(registry, repo, tag string) (TagEntry, bool, error) {
	var e TagEntry
	var found bool
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketTags).Get(tagKey(registry, repo, tag))
		if v == nil {
			return nil
		}
		found = true
		return json.Unmarshal(v, &e)
	})
	if err != nil {
		return TagEntry{}, false, fmt.Errorf("reading tag %s/%s:%s: %w", registry, repo, tag, err)
	}
	return e, found, nil
}

// maxRepos bounds the repositories remembered per blob: a client can ask for a blob
// under any name, and the list is for status reports, not for serving.
const maxRepos = 16

// update is db.Update that then notes the index's new size for the budget.
func (s *Store) update(fn func(tx *bolt.Tx) error) error {
	err := s.db.Update(fn)
	s.noteIndexSize()
	return err
}

// indexAllowance is the part of index.db the budget treats as the store's fixed
// overhead (an empty index is 32 KiB, a busy node's a few hundred); beyond it, the index
// counts like cached content, since it grows with every name clients ask for.
const indexAllowance = 1 << 20

// noteIndexSize records the part of index.db in use, for the budget. bbolt never shrinks
// its file but reuses freed pages, so pages on its free list do not count: the free
// space on disk already tells the min_free floor about them.
func (s *Store) noteIndexSize() {
	var highWater int64 // bbolt grows its file ahead; pages past this were never used
	if s.db.View(func(tx *bolt.Tx) error { highWater = tx.Size(); return nil }) != nil {
		return
	}
	inUse := highWater - int64(s.db.Stats().FreeAlloc)
	s.mu.Lock()
	s.indexBytes = max(0, inUse-indexAllowance)
	s.mu.Unlock()
}

// SetTag records where a tag points.
func (s *Store) SetTag(registry, repo, tag string, e TagEntry) error {
	v, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return s.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTags).Put(tagKey(registry, repo, tag), v)
	})
}

// DeleteTag forgets a tag (upstream said it no longer exists).
func (s *Store) DeleteTag(registry, repo, tag string) error {
	return s.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTags).Delete(tagKey(registry, repo, tag))
	})
}

// pruneTags drops tags whose manifest is no longer in the store and reports how many
// there were (with dryRun, how many there are).
func (s *Store) pruneTags(dryRun bool) (int, error) {
	var stale [][]byte
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTags).ForEach(func(k, v []byte) error {
			var e TagEntry
			if json.Unmarshal(v, &e) != nil || e.Digest.Validate() != nil {
				stale = append(stale, slices.Clone(k))
				return nil
			}
			if _, err := os.Stat(s.blobPath(e.Digest)); os.IsNotExist(err) {
				stale = append(stale, slices.Clone(k))
			}
			return nil
		})
	})
	if err != nil || dryRun || len(stale) == 0 {
		return len(stale), err
	}
	return len(stale), s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTags)
		for _, k := range stale {
			// Re-check: the tag may have been fetched again since the scan.
			var e TagEntry
			if v := b.Get(k); v != nil && json.Unmarshal(v, &e) == nil && e.Digest.Validate() == nil {
				if _, err := os.Stat(s.blobPath(e.Digest)); err == nil {
					continue
				}
			}
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}

// BlobMeta returns what the index knows of a blob.
func (s *Store) BlobMeta(dgst digest.Digest) (BlobMeta, bool, error) {
	var m BlobMeta
	var found bool
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketBlobs).Get([]byte(dgst))
		if v == nil {
			return nil
		}
		found = true
		return json.Unmarshal(v, &m)
	})
	return m, found, err
}

// RecordBlob notes a blob's media type and a repository it was seen in. It writes only
// when something is new, so the hot path of repeated hits stays read-only.
func (s *Store) RecordBlob(dgst digest.Digest, mediaType string, size int64, repo string) error {
	s.mu.Lock()
	if _, ok := s.lastUse[dgst]; !ok {
		s.lastUse[dgst] = time.Now()
	}
	s.mu.Unlock()
	m, found, err := s.BlobMeta(dgst)
	if err != nil {
		return err
	}
	if found && (mediaType == "" || m.MediaType == mediaType) && slices.Contains(m.Repos, repo) {
		return nil
	}
	return s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBlobs)
		var m BlobMeta
		if v := b.Get([]byte(dgst)); v != nil {
			if err := json.Unmarshal(v, &m); err != nil {
				return err
			}
		}
		if mediaType != "" {
			m.MediaType = mediaType
		}
		if size > 0 {
			m.Size = size
		}
		if repo != "" && !slices.Contains(m.Repos, repo) {
			m.Repos = append(m.Repos, repo)
			if len(m.Repos) > maxRepos {
				m.Repos = slices.Delete(m.Repos, 0, len(m.Repos)-maxRepos)
			}
		}
		if m.LastAccess == 0 {
			m.LastAccess = time.Now().Unix()
		}
		v, err := json.Marshal(m)
		if err != nil {
			return err
		}
		return b.Put([]byte(dgst), v)
	})
}

// Touch notes an access (a hit) in memory; FlushAccess writes them in one transaction, so
// serving a hit never waits for an fsync.
func (s *Store) Touch(dgst digest.Digest) {
	now := time.Now()
	s.mu.Lock()
	a := s.touched[dgst]
	s.touched[dgst] = access{at: now, hits: a.hits + 1}
	s.lastUse[dgst] = now
	s.mu.Unlock()
}

// FlushAccess writes pending access times to the index.
func (s *Store) FlushAccess() error {
	s.mu.Lock()
	pending := s.touched
	s.touched = map[digest.Digest]access{}
	s.mu.Unlock()
	if len(pending) == 0 {
		return nil
	}
	return s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBlobs)
		for d, t := range pending {
			var m BlobMeta
			v := b.Get([]byte(d))
			if v == nil {
				continue // evicted since: a meta without a blob would only be noise
			}
			if err := json.Unmarshal(v, &m); err != nil {
				return err
			}
			m.LastAccess = t.at.Unix()
			m.Hits += t.hits
			v, err := json.Marshal(m)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(d), v); err != nil {
				return err
			}
		}
		return nil
	})
}
