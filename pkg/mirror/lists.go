package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// maxListBody bounds a tag list or referrers answer held in memory.
const maxListBody = 8 << 20

// maxLists bounds how many answers are kept; they are cheap to fetch again.
const maxLists = 1024

// listAnswer is a passed-through tags/list or referrers answer, kept for a short while
// and served stale when upstream fails.
type listAnswer struct {
	body    []byte
	header  http.Header // Content-Type, Link (pagination), OCI-Filters-Applied
	fetched time.Time
}

func (m *Mirror) serveList(w http.ResponseWriter, r *http.Request, rt route) {
	q := url.Values{}
	for _, k := range []string{"n", "last", "artifactType"} {
		if v := r.URL.Query().Get(k); v != "" {
			q.Set(k, v)
		}
	}
	path := rt.kind + "/" + rt.ref
	key := rt.registry + "/" + rt.repo + "/" + path + "?" + q.Encode()

	m.mu.Lock()
	cached := m.lists[key]
	m.mu.Unlock()
	ans := cached
	result := ResultHit
	if cached == nil || time.Since(cached.fetched) >= rt.policy.listTTL {
		v, err, _ := m.flight.Do("list:"+key, func() (any, error) {
			return m.fetchList(rt, path, q)
		})
		switch {
		case err == nil:
			ans = v.(*listAnswer)
			result = ResultMiss
			m.storeList(key, ans)
		case cached != nil && !errors.Is(err, upstream.ErrNotFound):
			result = ResultStale
			m.log.Warn("serving cached list, upstream failed", "registry", rt.registry, "repo", rt.repo, "kind", rt.kind, "err", err)
		default:
			m.fail(w, r, rt, err)
			return
		}
	}
	noteResult(r.Context(), result)
	for k, v := range ans.header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(ans.body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(ans.body)
	}
}

func (m *Mirror) fetchList(rt route, path string, q url.Values) (*listAnswer, error) {
	ctx, cancel := context.WithTimeout(m.ctx, time.Minute)
	defer cancel()
	resp, err := rt.client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: path, Query: q,
	})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxListBody+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s from %s: %w", path, rt.registry, err)
	}
	if len(body) > maxListBody {
		return nil, fmt.Errorf("%s from %s exceeds %d bytes", path, rt.registry, maxListBody)
	}
	h := http.Header{}
	for _, k := range []string{"Content-Type", "Link", "Oci-Filters-Applied"} {
		if v := resp.Header.Values(k); len(v) > 0 {
			h[k] = v
		}
	}
	if link := h.Get("Link"); link != "" {
		// Pagination links name upstream's path; ours is the same below /v2/ but the
		// client must come back to us, so keep only the path and query.
		h.Set("Link", relativeLink(link))
	}
	return &listAnswer{body: body, header: h, fetched: time.Now()}, nil
}

func (m *Mirror) storeList(key string, a *listAnswer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.lists) >= maxLists {
		for k := range m.lists { // drop an arbitrary entry; any one is cheap to refetch
			delete(m.lists, k)
			break
		}
	}
	m.lists[key] = a
}

// relativeLink turns <https://host/v2/x/tags/list?n=1&last=a>; rel="next" into a link
// with only path and query.
func relativeLink(link string) string {
	start, end := -1, -1
	for i, c := range link {
		if c == '<' && start < 0 {
			start = i
		}
		if c == '>' && start >= 0 {
			end = i
			break
		}
	}
	if start < 0 || end < 0 {
		return link
	}
	u, err := url.Parse(link[start+1 : end])
	if err != nil {
		return link
	}
	return "<" + u.RequestURI() + ">" + link[end+1:]
}
