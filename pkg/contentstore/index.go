package contentstore

import (
	"encoding/json"
	"fmt"
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

// SetTag records where a tag points.
func (s *Store) SetTag(registry, repo, tag string, e TagEntry) error {
	v, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTags).Put(tagKey(registry, repo, tag), v)
	})
}

// DeleteTag forgets a tag (upstream said it no longer exists).
func (s *Store) DeleteTag(registry, repo, tag string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTags).Delete(tagKey(registry, repo, tag))
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
	return s.db.Update(func(tx *bolt.Tx) error {
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
	return s.db.Update(func(tx *bolt.Tx) error {
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
