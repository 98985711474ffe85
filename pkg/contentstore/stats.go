package contentstore

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// Stats describe the store for status reports.
type Stats struct {
	Bytes        int64       `json:"bytes"`
	Entries      int         `json:"entries"`
	MaxBytes     int64       `json:"maxBytes"`     // resolved budget; 0 is none
	MinFreeBytes int64       `json:"minFreeBytes"` // resolved floor; 0 is none
	FSBytes      int64       `json:"fsBytes"`
	FSFreeBytes  int64       `json:"fsFreeBytes"`
	InFlight     int64       `json:"inFlightBytes"` // reserved by downloads in progress
	Ingests      int         `json:"ingests"`
	IngestBytes  int64       `json:"ingestBytes"`
	EvictedBlobs int64       `json:"evictedBlobs"` // since Open
	EvictedBytes int64       `json:"evictedBytes"`
	TopBySize    []RepoStats `json:"topBySize"`
	TopByHits    []RepoStats `json:"topByHits"`
}

// RepoStats is what the store holds for one repository. A blob shared by repositories
// counts in each.
type RepoStats struct {
	Repo  string `json:"repo"`
	Bytes int64  `json:"bytes"`
	Blobs int    `json:"blobs"`
	Hits  int64  `json:"hits"`
}

// CacheCounters reports the resolved size budget and evictions since Open, for metrics.
func (s *Store) CacheCounters() (budget, evictedBlobs, evictedBytes int64) {
	total, _, _ := s.fsStat()
	s.mu.Lock()
	defer s.mu.Unlock()
	budget, _ = s.limits(total)
	return budget, s.evictedN, s.evictedSize
}

// Stats reports usage, budget and the top repositories (top entries each way).
func (s *Store) Stats(ctx context.Context, top int) (Stats, error) {
	total, free, err := s.fsStat()
	if err != nil {
		return Stats{}, err
	}
	st := Stats{FSBytes: total, FSFreeBytes: free}
	s.mu.Lock()
	st.Bytes, st.Entries, st.InFlight = s.used, s.entries, s.reserved
	st.MaxBytes, st.MinFreeBytes = s.limits(total)
	st.EvictedBlobs, st.EvictedBytes = s.evictedN, s.evictedSize
	pending := map[digest.Digest]int64{}
	for d, a := range s.touched {
		pending[d] = a.hits
	}
	s.mu.Unlock()
	sts, err := s.cs.ListStatuses(ctx)
	if err != nil {
		return st, fmt.Errorf("listing ingests: %w", err)
	}
	for _, i := range sts {
		st.Ingests++
		st.IngestBytes += i.Offset
	}
	repos := map[string]*RepoStats{}
	err = s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketBlobs).ForEach(func(k, v []byte) error {
			var m BlobMeta
			if json.Unmarshal(v, &m) != nil {
				return nil
			}
			hits := m.Hits + pending[digest.Digest(k)]
			for _, r := range m.Repos {
				rs := repos[r]
				if rs == nil {
					rs = &RepoStats{Repo: r}
					repos[r] = rs
				}
				rs.Bytes += m.Size
				rs.Blobs++
				rs.Hits += hits
			}
			return nil
		})
	})
	if err != nil {
		return st, fmt.Errorf("reading index: %w", err)
	}
	all := make([]RepoStats, 0, len(repos))
	for _, r := range repos {
		all = append(all, *r)
	}
	rank := func(key func(RepoStats) int64) []RepoStats {
		out := slices.Clone(all)
		slices.SortFunc(out, func(a, b RepoStats) int {
			if ka, kb := key(a), key(b); ka != kb {
				if ka > kb {
					return -1
				}
				return 1
			}
			return strings.Compare(a.Repo, b.Repo)
		})
		return out[:min(top, len(out))]
	}
	st.TopBySize = rank(func(r RepoStats) int64 { return r.Bytes })
	st.TopByHits = rank(func(r RepoStats) int64 { return r.Hits })
	return st, nil
}
