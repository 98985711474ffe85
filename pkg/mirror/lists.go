package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// Memory bounds for tags/list and referrers answers, whose size upstream decides and
// whose keys clients choose: one answer, all answers kept, and fetches at once (each
// holds up to maxListBody while it reads).
const (
	maxListBody    = 4 << 20
	listBudget     = 4 << 20
	maxListFetches = 2
	maxLists       = 1024
)

// listAnswer is a passed-through tags/list or referrers answer, kept for a short while
// and served stale when upstream fails.
type listAnswer struct {
	body    []byte
	header  http.Header // Content-Type, OCI-Filters-Applied
	link    *url.URL    // upstream's pagination link, rewritten per client when served
	linkRel string      // the rest of the Link value after <...>
	fetched time.Time
}

func (a *listAnswer) cost() int64 { return int64(len(a.body)) + 512 }

// listQuery keeps the query parameters a list request may carry, in canonical form, so a
// client cannot make distinct cache entries out of one answer, nor send upstream
// anything but these.
func listQuery(rt route, in url.Values) url.Values {
	q := url.Values{}
	if v := in.Get("n"); v != "" {
		if n, err := strconv.ParseUint(v, 10, 31); err == nil {
			q.Set("n", strconv.FormatUint(n, 10))
		}
	}
	if v := in.Get("last"); v != "" && tagRe.MatchString(v) {
		q.Set("last", v)
	}
	if v := in.Get("artifactType"); v != "" && rt.kind == kindReferrers && len(v) <= 255 {
		if mt, params, err := mime.ParseMediaType(v); err == nil && len(params) == 0 {
			q.Set("artifactType", mt)
		}
	}
	return q
}

func (m *Mirror) serveList(w http.ResponseWriter, r *http.Request, rt route) {
	q := listQuery(rt, r.URL.Query())
	path := rt.kind + "/" + rt.ref
	key := rt.registry + "/" + rt.repo + "/" + path + "?" + q.Encode()

	m.mu.Lock()
	cached := m.lists.get(key)
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
			m.mu.Lock()
			m.lists.put(key, ans)
			m.mu.Unlock()
		case cached != nil && !errors.Is(err, upstream.ErrNotFound):
			result = ResultStale
			m.log.Warn("serving cached list, upstream failed", "registry", rt.registry, "repo", rt.repo, "kind", rt.kind, "err", err)
		default:
			m.fail(w, r, rt, err)
			return
		}
	}
	noteResult(r.Context(), result)
	m.count(result)
	for k, v := range ans.header {
		w.Header()[k] = v
	}
	if link := clientLink(rt, ans); link != "" {
		w.Header().Set("Link", link)
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
	select {
	case m.listSlots <- struct{}{}:
		defer func() { <-m.listSlots }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	resp, err := rt.client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: path, Query: q,
	})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := readBounded(resp, maxListBody)
	if err != nil {
		return nil, fmt.Errorf("reading %s from %s: %w", path, rt.registry, err)
	}
	a := &listAnswer{body: body, header: http.Header{}, fetched: time.Now()}
	for _, k := range []string{"Content-Type", "Oci-Filters-Applied"} {
		if v := resp.Header.Values(k); len(v) > 0 {
			a.header[k] = v
		}
	}
	a.link, a.linkRel = upstreamLink(rt, resp.Header.Get("Link"))
	return a, nil
}

// upstreamLink parses upstream's `<url>; rel="next"` pagination link. It is kept only if
// it names the same endpoint the client asked for (this repository's tags/list or
// referrers), so a hostile upstream cannot point clients anywhere else through us.
func upstreamLink(rt route, link string) (*url.URL, string) {
	start, end := strings.IndexByte(link, '<'), strings.IndexByte(link, '>')
	if start < 0 || end < start {
		return nil, ""
	}
	u, err := url.Parse(link[start+1 : end])
	if err != nil || u.Path != "/v2/"+rt.repo+"/"+rt.kind+"/"+rt.ref {
		return nil, ""
	}
	return &url.URL{RawQuery: listQuery(rt, u.Query()).Encode()}, link[end+1:]
}

// clientLink writes the pagination link back to the mirror, addressed the way the client
// addressed this request (ns parameter, path prefix, or the default registry), so the
// next page comes from the same registry.
func clientLink(rt route, a *listAnswer) string {
	if a.link == nil {
		return ""
	}
	p := "/v2/" + rt.repo + "/" + rt.kind + "/" + rt.ref
	q := a.link.Query()
	switch rt.via {
	case viaPrefix:
		p = "/v2/" + rt.registry + "/" + rt.repo + "/" + rt.kind + "/" + rt.ref
	case viaNS:
		q.Set("ns", rt.registry)
	}
	u := url.URL{Path: p, RawQuery: q.Encode()}
	return "<" + u.RequestURI() + ">" + a.linkRel
}

// listCache keeps list answers within a byte budget, dropping the oldest first. Guarded
// by Mirror.mu.
type listCache struct {
	entries map[string]*listAnswer
	bytes   int64
}

func (c *listCache) get(key string) *listAnswer { return c.entries[key] }

func (c *listCache) put(key string, a *listAnswer) {
	if a.cost() > listBudget {
		return
	}
	if old := c.entries[key]; old != nil {
		c.bytes -= old.cost()
		delete(c.entries, key)
	}
	for c.bytes+a.cost() > listBudget || len(c.entries) >= maxLists {
		var oldest string
		for k, e := range c.entries {
			if oldest == "" || e.fetched.Before(c.entries[oldest].fetched) {
				oldest = k
			}
		}
		c.bytes -= c.entries[oldest].cost()
		delete(c.entries, oldest)
	}
	if c.entries == nil {
		c.entries = map[string]*listAnswer{}
	}
	c.entries[key] = a
	c.bytes += a.cost()
}

// readBounded reads a body of at most limit bytes. A declared length is allocated once:
// growing a buffer by doubling would leave as much again behind as garbage.
func readBounded(resp *http.Response, limit int64) ([]byte, error) {
	if resp.ContentLength > limit {
		return nil, fmt.Errorf("%d bytes exceeds the %d-byte limit", resp.ContentLength, limit)
	}
	if resp.ContentLength >= 0 {
		b := make([]byte, resp.ContentLength)
		if _, err := io.ReadFull(resp.Body, b); err != nil {
			return nil, err
		}
		return b, nil
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("more than the %d-byte limit", limit)
	}
	return b, nil
}
