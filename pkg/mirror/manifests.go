package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// manifestAccept asks upstream for every current manifest type, so the cached answer
// does not depend on which client happened to ask first.
var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageIndex,
	ocispec.MediaTypeImageManifest,
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}, ", ")

type manifest struct {
	body      []byte
	mediaType string
	digest    digest.Digest
}

func (m *Mirror) serveManifest(w http.ResponseWriter, r *http.Request, rt route) {
	var (
		mf     *manifest
		result string
		err    error
	)
	if rt.digest != "" {
		mf, result, err = m.manifestByDigest(r.Context(), rt, rt.digest)
	} else {
		mf, result, err = m.manifestByTag(r.Context(), rt)
	}
	if err != nil {
		m.fail(w, r, rt, err)
		return
	}
	noteResult(r.Context(), result)
	m.count(result)
	if result != ResultMiss {
		m.store.Touch(mf.digest) // served from the store: an access, and a hit in its stats
	}
	setContentHeaders(w, mf.mediaType, mf.digest.String(), int64(len(mf.body)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(mf.body)
		if result != ResultMiss {
			m.stats.cacheBytes.Add(int64(len(mf.body)))
		}
		m.eagerFrom(rt, mf)
	}
}

// cachedManifest reads a manifest from the store. Only a blob the index records as a
// manifest, and no larger than the manifest limit, is one: anything else (a layer asked
// for under manifests/) is not found, and its size is checked before a byte is read, so
// no request can make the mirror hold more than the limit in memory.
func (m *Mirror) cachedManifest(dgst digest.Digest, limit int64) (*manifest, error) {
	meta, found, err := m.store.BlobMeta(dgst)
	if err != nil {
		return nil, err
	}
	if !found || meta.MediaType == "" || meta.Size > limit {
		return nil, fmt.Errorf("manifest %s: %w", dgst, contentstore.ErrNotFound)
	}
	m.store.Pin(dgst)
	defer m.store.Unpin(dgst)
	f, size, err := m.store.OpenBlob(dgst)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if size > limit {
		return nil, fmt.Errorf("manifest %s: %d bytes stored, over the %d-byte limit: %w", dgst, size, limit, contentstore.ErrNotFound)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(f, body); err != nil {
		return nil, fmt.Errorf("reading manifest %s: %w", dgst, err)
	}
	return &manifest{body: body, mediaType: meta.MediaType, digest: dgst}, nil
}

func (m *Mirror) manifestByDigest(ctx context.Context, rt route, dgst digest.Digest) (*manifest, string, error) {
	mf, err := m.cachedManifest(dgst, rt.policy.maxManifestSize)
	if err == nil || !contentstore.IsNotFound(err) {
		return mf, ResultHit, err
	}
	v, err, _ := m.flight.Do("manifest:"+rt.registry+"/"+rt.repo+"@"+dgst.String(), func() (any, error) {
		if mf, err := m.manifestFromFleet(m.ctx, rt, dgst, false); err == nil {
			return mf, nil
		}
		return m.fetchManifest(m.ctx, rt, dgst.String(), dgst, 0)
	})
	if err != nil {
		return nil, ResultMiss, err
	}
	return v.(*manifest), ResultMiss, nil
}

// fetchManifest GETs a manifest by tag or digest, verifies it against want (a digest
// reference, or the digest upstream declared for a tag) and stores it.
func (m *Mirror) fetchManifest(ctx context.Context, rt route, ref string, want digest.Digest, attempts int) (*manifest, error) {
	client := rt.client
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	resp, err := client.Do(ctx, upstream.Request{
		Method: http.MethodGet, Repo: rt.repo, Path: "manifests/" + ref,
		Header: http.Header{"Accept": {manifestAccept}}, Attempts: attempts,
	})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	limit := rt.policy.maxManifestSize
	if resp.ContentLength > limit {
		return nil, manifestTooLarge{limit}
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, fmt.Errorf("reading manifest %s from %s: %w", ref, rt.registry, err)
	}
	if int64(len(body)) > limit {
		return nil, manifestTooLarge{limit}
	}
	if want == "" {
		if h, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil && h.Algorithm().Available() {
			want = h
		}
	}
	var dgst digest.Digest
	if want != "" {
		dgst = want.Algorithm().FromBytes(body)
		if dgst != want {
			return nil, fmt.Errorf("manifest %s/%s:%s: got %s, want %s: %w", rt.registry, rt.repo, ref, dgst, want, errContentMismatch)
		}
	} else {
		dgst = digest.FromBytes(body)
	}
	return m.storeManifest(ctx, rt, dgst, body, mediaTypeOf(resp.Header.Get("Content-Type"), body)), nil
}

// storeManifest keeps a verified manifest. A store that cannot take it (disk full) costs
// the cache, not the pull.
func (m *Mirror) storeManifest(ctx context.Context, rt route, dgst digest.Digest, body []byte, mt string) *manifest {
	err := m.store.PutBlob(ctx, dgst, body)
	if err == nil {
		err = m.store.RecordBlob(dgst, mt, int64(len(body)), rt.registry+"/"+rt.repo)
	}
	if err != nil {
		if isDiskFull(err) {
			err = fmt.Errorf("%w: %w", errNoSpace, err)
		}
		m.notePassThrough(ctx, rt, err)
	}
	return &manifest{body: body, mediaType: mt, digest: dgst}
}

func tagKey(rt route) string { return rt.registry + "/" + rt.repo + ":" + rt.ref }

// maxChecked bounds the revalidation times kept in memory; clients choose the tags.
const maxChecked = 8192

// markChecked notes a successful revalidation. An entry is worth keeping only while it is
// fresh, so when the map is full the stale ones go, and if that is not enough, all do
// (the cost is one HEAD per tag on its next request).
func (m *Mirror) markChecked(key string, freshness time.Duration) {
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.checked) >= maxChecked {
		for k, t := range m.checked {
			if now.Sub(t) >= freshness {
				delete(m.checked, k)
			}
		}
		if len(m.checked) >= maxChecked {
			clear(m.checked)
		}
	}
	m.checked[key] = now
}

// manifestByTag serves a tag from cache while it is fresh, and otherwise revalidates it
// with a HEAD (coalesced across clients). When upstream is down, slow, rate-limiting or
// failing, the cached answer is served (stale-if-error); a 404 from upstream is a 404.
func (m *Mirror) manifestByTag(ctx context.Context, rt route) (*manifest, string, error) {
	key := tagKey(rt)
	entry, found, err := m.store.Tag(rt.registry, rt.repo, rt.ref)
	if err != nil {
		return nil, ResultError, err
	}
	var cached *manifest
	if found {
		cached, err = m.cachedManifest(entry.Digest, rt.policy.maxManifestSize)
		if err != nil && !contentstore.IsNotFound(err) {
			return nil, ResultError, err
		}
		m.mu.Lock()
		last := m.checked[key]
		m.mu.Unlock()
		if cached != nil && time.Since(last) < rt.policy.tagFreshness {
			return cached, ResultHit, nil
		}
	}
	ch := m.flight.DoChan("tag:"+key, func() (any, error) {
		return m.revalidateTag(rt, cached)
	})
	if m.tagWaitHook != nil {
		m.tagWaitHook()
	}
	var stale <-chan time.Time
	if cached != nil {
		t := time.NewTimer(m.opts.StaleAfter)
		defer t.Stop()
		stale = t.C
	}
	select {
	case res := <-ch:
		if res.Err != nil {
			if cached != nil && !errors.Is(res.Err, upstream.ErrNotFound) {
				m.log.Warn("serving cached tag, upstream failed", "registry", rt.registry, "repo", rt.repo, "tag", rt.ref, "err", res.Err)
				return cached, ResultStale, nil
			}
			return nil, ResultError, res.Err
		}
		mf := res.Val.(*manifest)
		if cached != nil && cached.digest == mf.digest {
			return mf, ResultHit, nil
		}
		return mf, ResultMiss, nil
	case <-stale:
		m.log.Warn("serving cached tag, upstream slow", "registry", rt.registry, "repo", rt.repo, "tag", rt.ref)
		return cached, ResultStale, nil
	case <-ctx.Done():
		return nil, ResultError, ctx.Err()
	}
}

// revalidateTag asks upstream where the tag points now. It runs detached from the
// request, so a slow answer still refreshes the cache for the next client.
func (m *Mirror) revalidateTag(rt route, cached *manifest) (*manifest, error) {
	rt.policy.hold() // may outlive the request that started it
	defer rt.policy.release()
	ctx, cancel := context.WithTimeout(m.ctx, 2*time.Minute)
	defer cancel()
	client := rt.client
	attempts := 0
	if cached != nil {
		attempts = 1 // a cached answer is ready; do not make the engine wait on retries
	}
	resp, err := client.Do(ctx, upstream.Request{
		Method: http.MethodHead, Repo: rt.repo, Path: "manifests/" + rt.ref,
		Header: http.Header{"Accept": {manifestAccept}}, Attempts: attempts,
	})
	if errors.Is(err, upstream.ErrNotFound) {
		if derr := m.store.DeleteTag(rt.registry, rt.repo, rt.ref); derr != nil {
			m.log.Warn("forgetting a deleted tag", "registry", rt.registry, "repo", rt.repo, "tag", rt.ref, "err", derr)
		}
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	resp.Body.Close()

	var mf *manifest
	if d, perr := digest.Parse(resp.Header.Get("Docker-Content-Digest")); perr == nil && d.Algorithm().Available() {
		if cached != nil && cached.digest == d {
			mf = cached
		} else if c, cerr := m.cachedManifest(d, rt.policy.maxManifestSize); cerr == nil {
			mf = c // the same manifest is already here under another name
		} else if m.opts.Fleet != nil {
			// In a fleet a manifest by digest comes from its owner: the cluster asks
			// upstream for it once (Docker Hub counts manifest GETs as pulls).
			byDigest := rt
			byDigest.ref, byDigest.digest = d.String(), d
			if c, _, ferr := m.manifestByDigest(ctx, byDigest, d); ferr == nil {
				mf = c
			}
		}
	}
	if mf == nil {
		// Changed, or the registry does not say the digest on HEAD: fetch by tag.
		mf, err = m.fetchManifest(ctx, rt, rt.ref, "", attempts)
		if err != nil {
			return nil, err
		}
	}
	if cached == nil || cached.digest != mf.digest {
		err := m.store.SetTag(rt.registry, rt.repo, rt.ref, contentstore.TagEntry{
			Digest: mf.digest, MediaType: mf.mediaType, Size: int64(len(mf.body)),
		})
		if err != nil {
			m.log.Warn("recording tag failed, serving it uncached", "registry", rt.registry, "repo", rt.repo, "tag", rt.ref, "err", err)
			return mf, nil // not marked fresh: the next request asks upstream again
		}
	}
	m.markChecked(tagKey(rt), rt.policy.tagFreshness)
	return mf, nil
}

// mediaTypeOf prefers the registry's Content-Type and falls back to the manifest's own
// mediaType field (registries behind plain file servers send text/plain).
func mediaTypeOf(contentType string, body []byte) string {
	if mt, _, err := mime.ParseMediaType(contentType); err == nil && (strings.Contains(mt, "manifest") || strings.Contains(mt, "image.index")) {
		return mt
	}
	return sniffMediaType(body)
}

func sniffMediaType(body []byte) string {
	if mt, ok := ownMediaType(body); ok {
		return mt
	}
	return ocispec.MediaTypeImageManifest
}

// ownMediaType is what a manifest says it is: its mediaType field, or an index when it
// lists manifests.
func ownMediaType(body []byte) (string, bool) {
	var v struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
	}
	if json.Unmarshal(body, &v) == nil {
		switch {
		case v.MediaType != "":
			return v.MediaType, true
		case v.Manifests != nil:
			return ocispec.MediaTypeImageIndex, true
		}
	}
	return "", false
}

// memberMediaType is the media type of a manifest a member sent. The digest covers the
// body, not the Content-Type beside it: what the body says of itself decides, and the
// member's word counts only where the body says nothing.
func memberMediaType(contentType string, body []byte) string {
	if mt, ok := ownMediaType(body); ok {
		return mt
	}
	return mediaTypeOf(contentType, body)
}
