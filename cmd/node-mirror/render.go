package main

import (
	"fmt"
	"io"
	"time"

	"github.com/node-mirror/node-mirror/internal/humanize"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
)

// The renderings status and gc print for people; --json prints the admin API's answers.

// writeStatus prints st as a table for people.
func writeStatus(w io.Writer, st admin.Status) {
	s := st.Store
	fb := humanize.Bytes
	budget := "none"
	if s.MaxBytes > 0 {
		budget = fmt.Sprintf("%s (%.0f%% used)", fb(s.MaxBytes), 100*float64(s.Bytes)/float64(s.MaxBytes))
	}
	minFree := "none"
	if s.MinFreeBytes > 0 {
		minFree = fb(s.MinFreeBytes)
	}
	fmt.Fprintf(w, "source          %s\n", st.Source)
	fmt.Fprintf(w, "size            %s in %d blobs\n", fb(s.Bytes), s.Entries)
	fmt.Fprintf(w, "budget          %s\n", budget)
	fmt.Fprintf(w, "min free        %s (filesystem: %s free of %s)\n", minFree, fb(s.FSFreeBytes), fb(s.FSBytes))
	fmt.Fprintf(w, "in flight       %s reserved, %d ingests (%s)\n", fb(s.InFlight), s.Ingests, fb(s.IngestBytes))
	fmt.Fprintf(w, "evicted         %d blobs, %s (since start)\n", s.EvictedBlobs, fb(s.EvictedBytes))
	if m := st.Mirror; m != nil {
		served := m.Hits + m.Stale + m.Misses + m.PassThrough
		ratio := "n/a"
		if served > 0 {
			ratio = fmt.Sprintf("%.1f%%", 100*float64(m.Hits+m.Stale)/float64(served))
		}
		fmt.Fprintf(w, "hit ratio       %s (%d hits, %d stale, %d misses, %d passed through, %d errors since %s)\n",
			ratio, m.Hits, m.Stale, m.Misses, m.PassThrough, m.Errors, m.Since.Format(time.RFC3339))
		fmt.Fprintf(w, "bytes saved     %s served from cache\n", fb(m.BytesSaved))
	} else {
		fmt.Fprintf(w, "hit ratio       n/a (no daemon: read from the data dir)\n")
	}
	table := func(title string, rows []contentstore.RepoStats) {
		fmt.Fprintf(w, "\n%-48s %12s %7s %8s\n", title, "SIZE", "BLOBS", "HITS")
		if len(rows) == 0 {
			fmt.Fprintln(w, "(none)")
		}
		for _, r := range rows {
			fmt.Fprintf(w, "%-48s %12s %7d %8d\n", r.Repo, fb(r.Bytes), r.Blobs, r.Hits)
		}
	}
	table("TOP REPOSITORIES BY SIZE", s.TopBySize)
	table("TOP REPOSITORIES BY HITS", s.TopByHits)
	if m := st.Mirror; m != nil && len(m.Active) > 0 {
		fmt.Fprintf(w, "\n%-24s %-40s %16s %18s %5s\n", "DOWNLOADING", "REPOSITORY", "STORED", "RECEIVED", "CONNS")
		for _, d := range m.Active {
			size := "?"
			if d.Size >= 0 {
				size = fb(d.Size)
			}
			fmt.Fprintf(w, "%-24s %-40s %16s %18s %5d\n", short(d.Digest), d.Registry+"/"+d.Repo,
				fb(d.Stored)+" / "+size, percent(d.Received, d.Size), d.Connections)
		}
	}
	if len(st.Fleet) > 0 {
		fmt.Fprintf(w, "\n%-20s %-8s %-22s %-22s %12s %12s %6s\n", "FLEET MEMBER", "STATE", "PEER API", "GOSSIP", "BYTES IN", "BYTES OUT", "FAULTS")
		for _, p := range st.Fleet {
			name := p.Name
			if p.Self {
				name += " (self)"
			}
			state := string(p.State)
			if !p.QuarantinedUntil.IsZero() && p.QuarantinedUntil.After(time.Now()) {
				state = "quarantined"
			}
			fmt.Fprintf(w, "%-20s %-8s %-22s %-22s %12s %12s %6d\n", name, state, p.PeerAddr, p.GossipAddr,
				fb(p.BytesIn), fb(p.BytesOut), p.Faults)
		}
	}
}

// short cuts a digest to its algorithm and first 12 hex digits.
func short(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

// percent says how much of size has arrived; size -1 is unknown.
func percent(n, size int64) string {
	if size <= 0 {
		return humanize.Bytes(n)
	}
	return fmt.Sprintf("%s (%.0f%%)", humanize.Bytes(n), 100*float64(n)/float64(size))
}

// writeGC prints what a collection freed (or would free).
func writeGC(w io.Writer, rep contentstore.GCReport) {
	verb := "evicted"
	if rep.DryRun {
		verb = "would evict"
	}
	for _, e := range rep.Evicted {
		repo := ""
		if len(e.Repos) > 0 {
			repo = e.Repos[0]
		}
		fmt.Fprintf(w, "%s %s %10s  last used %s  %s\n", verb, e.Digest, humanize.Bytes(e.Size), e.LastAccess.Format(time.RFC3339), repo)
	}
	orphanVerb := "removed"
	if rep.DryRun {
		orphanVerb = "would remove"
	}
	for _, o := range rep.Orphans {
		fmt.Fprintf(w, "%s orphaned download %s %s (idle since %s)\n", orphanVerb, o.Ref, humanize.Bytes(o.Size), o.UpdatedAt.Format(time.RFC3339))
	}
	total := "freed"
	if rep.DryRun {
		total = "would free"
	}
	fmt.Fprintf(w, "%s %s (%d bytes): %d blobs, %d orphaned downloads, %d stale index entries; cache %s -> %s\n",
		total, humanize.Bytes(rep.FreedBytes), rep.FreedBytes, len(rep.Evicted), len(rep.Orphans), rep.StaleIndex,
		humanize.Bytes(rep.UsageBefore), humanize.Bytes(rep.UsageAfter))
}
