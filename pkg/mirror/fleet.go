package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/fleet"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// In a fleet, each chunk of each blob (fetch_chunk_size apart, from the blob's start) has
// one owner among the members, by rendezvous hashing. A node fetches the chunks it owns
// from upstream (after asking the member that owned them before the ring last changed) and
// every other chunk from its owner, falling back to upstream when the owner is down, slow
// or refuses. A member asking this node for a chunk gets it from the store, from a chunk
// this node has or is fetching, or, if this node owns it and has nothing, from upstream
// once: the chunk is kept for a while for the members that ask next. So a cluster pulling
// one image everywhere at once fetches each byte from the internet once.
//
// Bytes from members are as untrusted as upstream's: the whole blob is verified before the
// final byte of any response leaves, and a blob that fails verification after members
// contributed is fetched again from upstream alone; the chunks each member sent are then
// compared with the verified blob and the members whose bytes differed are reported.

// chunkTTL is how long a chunk fetched for members, or left by a download that failed,
// stays to serve the members that ask next.
const chunkTTL = 2 * time.Minute

// chunkKey names a chunk by its blob's digest and size: a member's request states the
// size, and a wrong one must not shape the chunks this node's own download of the blob
// uses (their bounds come from it).
type chunkKey struct {
	dgst  digest.Digest
	size  int64
	index int64
}

// tableEntry is a chunk the node keeps for members.
type tableEntry struct {
	c       *chunk
	expires time.Time                 // zero while a download of this node holds it
	res     *contentstore.Reservation // room for chunks fetched for members only
}

// chunkTable is the fleet's chunks this node has or fetches, by blob and index.
type chunkTable struct {
	mu      sync.Mutex
	entries map[chunkKey]*tableEntry
}

// chunk returns the table's chunk (dgst, index) of a blob of size bytes with chunks of
// chunkSize, making it if create; the caller holds it (release when done).
func (t *chunkTable) chunk(dgst digest.Digest, index, size, chunkSize int64, create bool) (*chunk, *tableEntry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k := chunkKey{dgst, size, index}
	if e := t.entries[k]; e != nil {
		e.c.acquire()
		return e.c, e
	}
	if !create {
		return nil, nil
	}
	start := index * chunkSize
	c := newChunk(dgst, start, min(start+chunkSize, size))
	c.users = 2 // the table and the caller
	e := &tableEntry{c: c}
	t.entries[k] = e
	return c, e
}

// drop removes the n chunks of the blob dgst of size bytes from the table (it is stored,
// or their bytes are suspect).
func (t *chunkTable) drop(dgst digest.Digest, size, n int64) {
	t.mu.Lock()
	var gone []*tableEntry
	for i := range n {
		if e := t.entries[chunkKey{dgst, size, i}]; e != nil {
			gone = append(gone, e)
			delete(t.entries, chunkKey{dgst, size, i})
		}
	}
	t.mu.Unlock()
	for _, e := range gone {
		e.release()
	}
}

// expire lets go of dgst's chunks after chunkTTL, for members still assembling the blob.
func (t *chunkTable) expire(dgst digest.Digest, size, n int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := range n {
		if e := t.entries[chunkKey{dgst, size, i}]; e != nil && e.expires.IsZero() {
			e.expires = time.Now().Add(chunkTTL)
		}
	}
}

// sweep removes expired entries, and entries whose fill gave up with nobody on them.
func (t *chunkTable) sweep(now time.Time) {
	t.mu.Lock()
	var gone []*tableEntry
	for k, e := range t.entries {
		e.c.mu.Lock()
		dead := !e.c.filling && e.c.have < e.c.size() && e.c.users <= 1
		e.c.mu.Unlock()
		if (!e.expires.IsZero() && now.After(e.expires)) || dead {
			gone = append(gone, e)
			delete(t.entries, k)
		}
	}
	t.mu.Unlock()
	for _, e := range gone {
		e.release()
	}
}

func (e *tableEntry) release() {
	e.c.release()
	e.res.Release()
}

// janitorFleet sweeps the chunk table until the mirror closes.
func (m *Mirror) janitorFleet() {
	defer m.wg.Done()
	t := time.NewTicker(chunkTTL / 4)
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			m.chunks.sweep(time.Now().Add(100 * chunkTTL))
			return
		case now := <-t.C:
			m.chunks.sweep(now)
		}
	}
}

// fleetFetchable reports whether a blob goes through the fleet: fleet on, the size known,
// the registry answering ranges, and no recent verification failure with members' bytes.
func (m *Mirror) fleetFetchable(ctx context.Context, rt route, dgst digest.Digest) (int64, bool) {
	if m.opts.Fleet == nil || m.isRangeless(rt.registry) || m.peersSuspect(dgst) {
		return 0, false
	}
	size, ok := m.knownSize(dgst)
	if !ok {
		resp, err := rt.client.Do(ctx, upstream.Request{Method: http.MethodHead, Repo: rt.repo, Path: "blobs/" + dgst.String(), Attempts: 1})
		if err != nil {
			return 0, false
		}
		resp.Body.Close()
		if size = resp.ContentLength; size < 0 {
			return 0, false
		}
	}
	return size, size > 0
}

// fetchFleet fills the ingest from the fleet: every chunk from its owner or, owned here,
// from upstream.
func (m *Mirror) fetchFleet(ctx context.Context, d *download, rt route) error {
	cs := m.opts.FetchChunkSize
	var chunks []*chunk
	for k := d.written / cs; k*cs < d.size; k++ {
		c, _ := m.chunks.chunk(d.dgst, k, d.size, cs, true)
		c.mu.Lock()
		c.notify = d.notify
		c.mu.Unlock()
		chunks = append(chunks, c)
	}
	sources := func(c *chunk) []rangeSource { return m.fleetSources(rt, d.dgst, d.size, c, d) }
	return m.runChunks(ctx, d, rt, chunks, sources, m.fetchPolicy(rt.registry).concurrency, nil, d.written)
}

// fleetSources is where a chunk comes from: its owner, or, when this node owns it, the
// member that owned it before the ring changed; then upstream.
func (m *Mirror) fleetSources(rt route, dgst digest.Digest, size int64, c *chunk, d *download) []rangeSource {
	f := m.opts.Fleet
	owners := f.Owners(dgst, c.start/m.opts.FetchChunkSize)
	var srcs []rangeSource
	switch {
	case len(owners) > 0 && owners[0].Name != f.Name():
		srcs = append(srcs, m.peerSource(owners[0], rt, dgst, size, 0))
	case len(owners) > 1:
		srcs = append(srcs, m.peerSource(owners[1], rt, dgst, size, 1))
	}
	return append(srcs, m.upstreamSource(dgst, size, rt, d))
}

func (m *Mirror) peerSource(member fleet.Member, rt route, dgst digest.Digest, size int64, hop int) rangeSource {
	return rangeSource{peer: member.Name, hop: hop, attempts: 1, open: func(ctx context.Context, from, to int64) (io.ReadCloser, error) {
		return m.opts.Fleet.Fetch(ctx, member, fleet.ChunkRequest{
			Registry: rt.registry, Repo: rt.repo, Digest: dgst, Size: size, Offset: from, Length: to - from, Hop: hop,
		})
	}}
}

// peerFallback counts a fallback from a member to the next source.
func (m *Mirror) peerFallback(err error) {
	if m.opts.Fleet != nil {
		m.opts.Fleet.NoteFallback(fleet.FallbackReason(err))
	}
}

// OpenChunk serves a member's request for bytes of a blob (fleet.ChunkSource): from the
// store, from a chunk this node has or is fetching, or, asked as the owner (hop 0) and
// having nothing, by fetching the chunk from upstream (or from where the ring had it).
func (m *Mirror) OpenChunk(ctx context.Context, req fleet.ChunkRequest) (io.ReadCloser, error) {
	pol := m.policy.Load()
	client := pol.registries[req.Registry]
	if client == nil {
		return nil, fmt.Errorf("registry %s is not mirrored here: %w", req.Registry, fleet.ErrNotFound)
	}
	m.store.Pin(req.Digest)
	if f, size, err := m.store.OpenBlob(req.Digest); err == nil {
		if size != req.Size {
			f.Close()
			m.store.Unpin(req.Digest)
			return nil, fmt.Errorf("blob %s is %d bytes, not %d: %w", req.Digest, size, req.Size, fleet.ErrNotFound)
		}
		m.store.Touch(req.Digest)
		return &sectionFile{SectionReader: io.NewSectionReader(f, req.Offset, req.Length), f: f, done: func() { m.store.Unpin(req.Digest) }}, nil
	}
	m.store.Unpin(req.Digest)

	cs := m.opts.FetchChunkSize
	k := req.Offset / cs
	if (req.Offset+req.Length-1)/cs != k {
		return nil, fmt.Errorf("bytes %d-%d span chunks of %d bytes: %w", req.Offset, req.Offset+req.Length-1, cs, fleet.ErrNotFound)
	}
	rt := route{registry: req.Registry, repo: req.Repo, kind: kindBlobs, ref: req.Digest.String(), digest: req.Digest, client: client, policy: pol}
	if c, _ := m.chunks.chunk(req.Digest, k, req.Size, cs, false); c != nil {
		c.mu.Lock()
		// Asked as the previous owner, serve only bytes that do not wait on a member: that
		// member may be the one asking.
		servable := req.Hop == 0 || c.have == c.size() || (c.filling && !c.viaPeer)
		c.mu.Unlock()
		if !servable {
			c.release()
			return nil, fmt.Errorf("chunk %d of %s is on its way from a member: %w", k, req.Digest, fleet.ErrNotFound)
		}
		if c.claim() { // its last fill gave up: try again
			m.fillForMembers(rt, c, req)
		}
		r := c.reader(ctx, req.Offset, req.Offset+req.Length)
		c.release()
		return r, nil
	}
	if req.Hop != 0 {
		return nil, fmt.Errorf("chunk %d of %s is not here: %w", k, req.Digest, fleet.ErrNotFound)
	}
	res, err := m.store.Reserve(ctx, min(cs, req.Size-k*cs))
	if err != nil {
		return nil, fmt.Errorf("no room for chunk %d of %s: %w: %w", k, req.Digest, err, fleet.ErrUnavailable)
	}
	c, e := m.chunks.chunk(req.Digest, k, req.Size, cs, true)
	m.chunks.mu.Lock()
	if e.res == nil && e.expires.IsZero() {
		e.res, e.expires = res, time.Now().Add(chunkTTL)
		res = nil
	}
	m.chunks.mu.Unlock()
	res.Release() // another request made the entry first
	if c.claim() {
		m.fillForMembers(rt, c, req)
	}
	r := c.reader(ctx, req.Offset, req.Offset+req.Length)
	c.release()
	return r, nil
}

// fillForMembers fills a chunk members asked for, in the background: it outlives the
// request (the next members to ask read it too).
func (m *Mirror) fillForMembers(rt route, c *chunk, req fleet.ChunkRequest) {
	m.wg.Add(1)
	rt.policy.hold()
	go func() {
		defer m.wg.Done()
		defer rt.policy.release()
		if err := m.fill(m.ctx, rt, c, m.fleetSources(rt, req.Digest, req.Size, c, nil)); err != nil {
			m.log.Debug("chunk for members failed", "digest", req.Digest, "start", c.start, "err", err)
		}
	}()
}

// sectionFile reads part of a stored blob and closes it after.
type sectionFile struct {
	*io.SectionReader
	f    *os.File
	done func()
	once sync.Once
}

func (s *sectionFile) Close() error {
	s.once.Do(func() {
		s.f.Close()
		s.done()
	})
	return nil
}

// Sizes of blobs named by manifests this node served, so a fleet download knows how a
// blob divides into chunks without asking upstream.
const maxKnownSizes = 16384

func (m *Mirror) noteSizes(body []byte, mediaType string) {
	if m.opts.Fleet == nil {
		return
	}
	descs := descriptorsOf(body)
	if len(descs) == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.sizes)+len(descs) > maxKnownSizes {
		clear(m.sizes)
	}
	for _, d := range descs {
		if d.Size > 0 && d.Digest.Validate() == nil {
			m.sizes[d.Digest] = d.Size
		}
	}
}

// forgetSize drops dgst's size: it proved wrong, or may have.
func (m *Mirror) forgetSize(dgst digest.Digest) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.sizes, dgst)
}

func (m *Mirror) knownSize(dgst digest.Digest) (int64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.sizes[dgst]
	return s, ok
}

// After members' bytes failed verification, a blob is fetched from upstream alone for a
// while, and the chunks they sent are kept to find out who sent wrong bytes.
const suspectFor = 10 * time.Minute

type suspicion struct {
	until  time.Time
	chunks []*chunk // held; compared with the verified blob, then released
}

func (m *Mirror) peersSuspect(dgst digest.Digest) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.suspects[dgst]
	return s != nil && time.Now().Before(s.until)
}

// suspectPeers is called when a blob with members' bytes failed verification: its chunks
// leave the table, those with members' bytes are kept for comparison, and the blob is
// fetched from upstream alone until suspectFor passes.
func (m *Mirror) suspectPeers(d *download) bool {
	d.mu.Lock()
	chunks := d.chunks
	d.mu.Unlock()
	var kept []*chunk
	for _, c := range chunks {
		c.mu.Lock()
		fromPeers := len(c.peers) > 0 && c.file != nil
		c.mu.Unlock()
		if fromPeers {
			c.acquire()
			kept = append(kept, c)
		}
	}
	if len(kept) == 0 {
		return false
	}
	m.chunks.drop(d.dgst, d.size, (d.size+m.opts.FetchChunkSize-1)/m.opts.FetchChunkSize)
	m.mu.Lock()
	if len(m.suspects) >= 256 {
		for dg, s := range m.suspects {
			delete(m.suspects, dg)
			for _, c := range s.chunks {
				c.release()
			}
		}
	}
	if old := m.suspects[d.dgst]; old != nil {
		for _, c := range old.chunks {
			c.release()
		}
	}
	m.suspects[d.dgst] = &suspicion{until: time.Now().Add(suspectFor), chunks: kept}
	m.mu.Unlock()
	return true
}

// judgePeers compares the chunks members sent for dgst with the blob as stored (verified)
// and reports each member whose bytes differed.
func (m *Mirror) judgePeers(dgst digest.Digest) {
	m.mu.Lock()
	s := m.suspects[dgst]
	var chunks []*chunk
	if s != nil {
		chunks, s.chunks = s.chunks, nil
	}
	m.mu.Unlock()
	if len(chunks) == 0 {
		return
	}
	defer func() {
		for _, c := range chunks {
			c.release()
		}
	}()
	f, _, err := m.store.OpenBlob(dgst)
	if err != nil {
		return
	}
	defer f.Close()
	a, b := make([]byte, 256<<10), make([]byte, 256<<10)
	liars := map[string]bool{}
	for _, c := range chunks {
		c.mu.Lock()
		cf, have, peers := c.file, c.have, c.peers
		c.mu.Unlock()
		if cf == nil {
			continue
		}
		if !sameBytes(io.NewSectionReader(cf, 0, have), io.NewSectionReader(f, c.start, have), a, b) {
			for _, p := range peers {
				m.log.Warn("member sent wrong bytes", "peer", p, "digest", dgst, "start", c.start)
				liars[p] = true
			}
		}
	}
	for p := range liars { // one fault per member per blob
		m.opts.Fleet.ReportFault(p)
		m.peerFallback(&fleet.FetchError{Peer: p, Reason: fleet.FallbackFault})
	}
}

func sameBytes(x, y io.Reader, a, b []byte) bool {
	for {
		n, errA := io.ReadFull(x, a)
		m, errB := io.ReadFull(y, b[:n])
		if m != n || string(a[:n]) != string(b[:m]) {
			return false
		}
		if errA != nil || errB != nil {
			return errors.Is(errA, io.ErrUnexpectedEOF) || errors.Is(errA, io.EOF)
		}
	}
}

// manifestFromFleet gets a manifest by digest from the member that owns it (as chunk 0 of
// a blob of that digest), or, owned here, from the member that owned it before the ring
// changed; asOwner says this node is answering a member that asked it as the owner, so
// only the previous owner is asked. The body is verified against the digest; a member
// that sent something else is reported.
func (m *Mirror) manifestFromFleet(ctx context.Context, rt route, dgst digest.Digest, asOwner bool) (*manifest, error) {
	f := m.opts.Fleet
	if f == nil {
		return nil, fleet.ErrNotFound
	}
	owners := f.Owners(dgst, 0)
	var who fleet.Member
	hop := 0
	switch {
	case len(owners) > 0 && owners[0].Name != f.Name() && !asOwner:
		who = owners[0]
	case len(owners) > 1 && (owners[0].Name == f.Name() || asOwner) && owners[1].Name != f.Name():
		who, hop = owners[1], 1
	default:
		return nil, fleet.ErrNotFound
	}
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	body, mt, err := f.FetchManifest(fctx, who, fleet.ManifestRequest{Registry: rt.registry, Repo: rt.repo, Digest: dgst, Hop: hop})
	if err != nil {
		if !errors.Is(err, fleet.ErrNotFound) || hop == 0 {
			m.peerFallback(err)
		}
		return nil, err
	}
	if got := dgst.Algorithm().FromBytes(body); got != dgst || int64(len(body)) > rt.policy.maxManifestSize {
		m.log.Warn("member sent a wrong manifest", "peer", who.Name, "digest", dgst, "got", got)
		f.ReportFault(who.Name)
		m.peerFallback(&fleet.FetchError{Peer: who.Name, Reason: fleet.FallbackFault})
		return nil, fmt.Errorf("manifest %s from member %s: got %s: %w", dgst, who.Name, got, errContentMismatch)
	}
	return m.storeManifest(ctx, rt, dgst, body, memberMediaType(mt, body)), nil
}

// OpenManifest serves a member's request for a manifest by digest (fleet.ManifestSource):
// from the store, or, asked as the owner (hop 0), from the previous owner or upstream,
// once however many members ask.
func (m *Mirror) OpenManifest(ctx context.Context, req fleet.ManifestRequest) ([]byte, string, error) {
	pol := m.policy.Load()
	client := pol.registries[req.Registry]
	if client == nil {
		return nil, "", fmt.Errorf("registry %s is not mirrored here: %w", req.Registry, fleet.ErrNotFound)
	}
	if mf, err := m.cachedManifest(req.Digest, pol.maxManifestSize); err == nil {
		m.store.Touch(req.Digest)
		return mf.body, mf.mediaType, nil
	}
	if req.Hop != 0 {
		return nil, "", fmt.Errorf("manifest %s is not here: %w", req.Digest, fleet.ErrNotFound)
	}
	rt := route{registry: req.Registry, repo: req.Repo, kind: kindManifests, ref: req.Digest.String(), digest: req.Digest, client: client, policy: pol}
	pol.hold()
	defer pol.release()
	v, err, _ := m.flight.Do("manifest:"+rt.registry+"/"+rt.repo+"@"+req.Digest.String(), func() (any, error) {
		if mf, err := m.manifestFromFleet(m.ctx, rt, req.Digest, true); err == nil {
			return mf, nil
		}
		return m.fetchManifest(m.ctx, rt, req.Digest.String(), req.Digest, 0)
	})
	if err != nil {
		var se *upstream.StatusError
		switch {
		case errors.Is(err, upstream.ErrNotFound):
			return nil, "", fmt.Errorf("%w: %w", fleet.ErrNotFound, err)
		case errors.As(err, &se) && se.Status == http.StatusTooManyRequests:
			return nil, "", fmt.Errorf("%w: %w", fleet.ErrTooManyRequests, err)
		}
		return nil, "", fmt.Errorf("%w: %w", fleet.ErrUnavailable, err)
	}
	mf := v.(*manifest)
	return mf.body, mf.mediaType, nil
}
