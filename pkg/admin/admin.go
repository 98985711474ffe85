// Package admin is node-mirror's small operator API, served on the main port outside
// /v2/: GET /admin/status and POST /admin/gc[?dry_run=true]. It also holds the client the
// CLI uses for it and the renderings the CLI prints.
package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/mirror"
)

// TopRepos is how many repositories status ranks each way.
const TopRepos = 5

// Status is what `node-mirror status` shows.
type Status struct {
	// Source is "daemon" for a running mirror, "data-dir" when read offline.
	Source string             `json:"source"`
	Store  contentstore.Stats `json:"store"`
	// Mirror is nil offline: request counters live only in the running daemon.
	Mirror *mirror.Stats `json:"mirror,omitempty"`
}

// Handler serves the admin API for a running mirror.
func Handler(m *mirror.Mirror, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /admin/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := m.Store().Stats(r.Context(), TopRepos)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		ms := m.Stats()
		writeJSON(w, Status{Source: "daemon", Store: st, Mirror: &ms})
	})
	mux.HandleFunc("POST /admin/gc", func(w http.ResponseWriter, r *http.Request) {
		dry, _ := strconv.ParseBool(r.URL.Query().Get("dry_run"))
		rep, err := m.Store().Collect(r.Context(), dry)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if log != nil {
			log.Info("gc on request", "dry_run", dry, "evicted", len(rep.Evicted), "orphans", len(rep.Orphans), "freed_bytes", rep.FreedBytes)
		}
		writeJSON(w, rep)
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Client talks to a running mirror's admin API.
type Client struct {
	URL  string // the mirror, e.g. http://127.0.0.1:5000
	HTTP *http.Client
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 5 * time.Minute}
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.URL, "/")+path, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("reaching node-mirror at %s: %w", c.URL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("node-mirror at %s: %s: %s", c.URL, resp.Status, strings.TrimSpace(string(b)))
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Status reads a running mirror's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/admin/status", &st)
	return st, err
}

// GC runs a collection in a running mirror.
func (c *Client) GC(ctx context.Context, dryRun bool) (contentstore.GCReport, error) {
	var rep contentstore.GCReport
	err := c.do(ctx, http.MethodPost, "/admin/gc?dry_run="+strconv.FormatBool(dryRun), &rep)
	return rep, err
}

// WriteStatus prints st as a table for people.
func WriteStatus(w io.Writer, st Status) {
	s := st.Store
	fb := config.FormatBytes
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
}

// WriteGC prints what a collection freed (or would free).
func WriteGC(w io.Writer, rep contentstore.GCReport) {
	verb := "evicted"
	if rep.DryRun {
		verb = "would evict"
	}
	for _, e := range rep.Evicted {
		repo := ""
		if len(e.Repos) > 0 {
			repo = e.Repos[0]
		}
		fmt.Fprintf(w, "%s %s %10s  last used %s  %s\n", verb, e.Digest, config.FormatBytes(e.Size), e.LastAccess.Format(time.RFC3339), repo)
	}
	orphanVerb := "removed"
	if rep.DryRun {
		orphanVerb = "would remove"
	}
	for _, o := range rep.Orphans {
		fmt.Fprintf(w, "%s orphaned download %s %s (idle since %s)\n", orphanVerb, o.Ref, config.FormatBytes(o.Size), o.UpdatedAt.Format(time.RFC3339))
	}
	total := "freed"
	if rep.DryRun {
		total = "would free"
	}
	fmt.Fprintf(w, "%s %s (%d bytes): %d blobs, %d orphaned downloads, %d stale index entries; cache %s -> %s\n",
		total, config.FormatBytes(rep.FreedBytes), rep.FreedBytes, len(rep.Evicted), len(rep.Orphans), rep.StaleIndex,
		config.FormatBytes(rep.UsageBefore), config.FormatBytes(rep.UsageAfter))
}
