// Package admin is node-mirror's small operator API, served on the main port outside
// /v2/: GET /admin/status and POST /admin/gc[?dry_run=true], and the client the CLI uses
// for it. Answers are JSON; errors are OCI error envelopes like the rest of the daemon's.
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

	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/fleet"
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
	// Fleet lists the members, with the bytes exchanged with each; nil without a fleet.
	Fleet []fleet.PeerStats `json:"fleet,omitempty"`
}

// Handler serves the admin API for a running mirror; f is its fleet, or nil.
func Handler(m *mirror.Mirror, f *fleet.Fleet, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /admin/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := m.Store().Stats(r.Context(), TopRepos)
		if err != nil {
			fail(w, r, log, "reading cache statistics", err)
			return
		}
		ms := m.Stats()
		status := Status{Source: "daemon", Store: st, Mirror: &ms}
		if f != nil {
			status.Fleet = f.Stats()
		}
		wire.JSON(w, r, http.StatusOK, status)
	})
	mux.HandleFunc("POST /admin/gc", func(w http.ResponseWriter, r *http.Request) {
		dry, _ := strconv.ParseBool(r.URL.Query().Get("dry_run"))
		rep, err := m.Store().Collect(r.Context(), dry)
		if err != nil {
			fail(w, r, log, "collecting the cache", err)
			return
		}
		if log != nil {
			log.Info("gc on request", "dry_run", dry, "evicted", len(rep.Evicted), "orphans", len(rep.Orphans), "freed_bytes", rep.FreedBytes)
		}
		wire.JSON(w, r, http.StatusOK, rep)
	})
	// Anything else under /admin/ gets an envelope too, not the mux's plain text.
	allow := map[string]string{"/admin/status": http.MethodGet, "/admin/gc": http.MethodPost}
	mux.HandleFunc("/admin/", func(w http.ResponseWriter, r *http.Request) {
		if m, ok := allow[r.URL.Path]; ok {
			wire.Write(w, r, wire.Unsupported.With("use "+m+" "+r.URL.Path).WithHeader("Allow", m))
			return
		}
		wire.Write(w, r, wire.NotFound)
	})
	return mux
}

// fail logs a failed admin request once, here, and answers UNKNOWN with what failed: the
// admin API is the operator's, behind the same auth as pulls.
func fail(w http.ResponseWriter, r *http.Request, log *slog.Logger, what string, err error) {
	if log != nil {
		log.Error("admin request failed", "path", r.URL.Path, "err", err)
	}
	wire.Write(w, r, wire.Unknown.With(what+": "+err.Error()))
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
		msg := strings.TrimSpace(string(b))
		var env wire.Envelope
		if json.Unmarshal(b, &env) == nil && len(env.Errors) > 0 {
			msg = env.Errors[0].Code + ": " + env.Errors[0].Message
		}
		return fmt.Errorf("node-mirror at %s: %s: %s", c.URL, resp.Status, msg)
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
