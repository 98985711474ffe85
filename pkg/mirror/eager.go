package mirror

import (
	"encoding/json"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/node-mirror/node-mirror/internal/platformpick"
)

// eagerJob is one piece of an image to fetch before the engine asks for it.
type eagerJob struct {
	rt       route // the manifest request it came from
	dgst     digest.Digest
	manifest bool // a child manifest of an index, whose layers follow
}

// eagerFrom queues the blobs an image manifest names, or the manifest an index holds for
// this node's platform. Engines fetch a few layers at a time (CRI: by default 3), so
// starting them all now shortens a cold pull; each goes through the one download per
// digest, so a request arriving later joins it.
func (m *Mirror) eagerFrom(rt route, mf *manifest) {
	m.noteSizes(mf.body, mf.mediaType)
	if !m.eagerOn.Load() {
		return
	}
	var doc struct {
		MediaType string               `json:"mediaType"`
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
		Manifests []ocispec.Descriptor `json:"manifests"`
	}
	if json.Unmarshal(mf.body, &doc) != nil {
		return
	}
	var jobs []eagerJob
	if len(doc.Manifests) > 0 {
		if best, ok := platformpick.Best(m.platform, doc.Manifests); ok {
			jobs = append(jobs, eagerJob{dgst: best.Digest, manifest: true})
		}
	}
	if doc.Config != nil {
		jobs = append(jobs, eagerJob{dgst: doc.Config.Digest})
	}
	for _, l := range doc.Layers {
		jobs = append(jobs, eagerJob{dgst: l.Digest})
	}
	for _, j := range jobs {
		if j.dgst.Validate() != nil {
			continue
		}
		if !j.manifest {
			if _, err := m.store.Size(j.dgst); err == nil {
				continue
			}
		}
		j.rt = rt
		select {
		case m.eager <- j:
		default: // queue full: the engine's own requests fetch these
			return
		}
	}
}

// setEagerWorkers starts or stops workers until n run (none for n <= 0); a reload
// changes the number.
func (m *Mirror) setEagerWorkers(n int) {
	m.eagerMu.Lock()
	defer m.eagerMu.Unlock()
	for len(m.eagerStops) < n {
		stop := make(chan struct{})
		m.eagerStops = append(m.eagerStops, stop)
		m.wg.Add(1)
		go m.eagerWorker(stop)
	}
	for len(m.eagerStops) > max(n, 0) {
		last := len(m.eagerStops) - 1
		close(m.eagerStops[last]) // a worker busy with a job finishes it first
		m.eagerStops = m.eagerStops[:last]
	}
	m.eagerOn.Store(n > 0)
	if n <= 0 {
		for { // turned off: what was queued would otherwise run when it is turned on again
			select {
			case <-m.eager:
				continue
			default:
			}
			break
		}
	}
}

func (m *Mirror) eagerWorker(stop <-chan struct{}) {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-stop:
			return
		case j := <-m.eager:
			m.eagerFetch(j)
		}
	}
}

func (m *Mirror) eagerFetch(j eagerJob) {
	// Queued work runs with the registries configured now: a reload in between must not
	// keep the old ones in use.
	pol := m.policy.Load()
	rt := j.rt
	if rt.client, rt.policy = pol.registries[rt.registry], pol; rt.client == nil {
		return // the registry was configured away
	}
	pol.hold()
	defer pol.release()
	rt.ref, rt.digest = j.dgst.String(), j.dgst
	if j.manifest {
		rt.kind = kindManifests
		mf, _, err := m.manifestByDigest(m.ctx, rt, j.dgst)
		if err != nil {
			m.log.Debug("eager manifest fetch failed", "registry", rt.registry, "repo", rt.repo, "digest", j.dgst, "err", err)
			return
		}
		m.eagerFrom(rt, mf)
		return
	}
	rt.kind = kindBlobs
	d := m.joinDownload(rt, true)
	if d == nil {
		return // already stored
	}
	defer d.release()
	if err := d.wait(m.ctx); err != nil {
		m.log.Debug("eager blob fetch failed", "registry", rt.registry, "repo", rt.repo, "digest", j.dgst, "err", err)
	}
}

// noteEagerLocked remembers a blob only eager fetching asked for; call with m.mu held,
// before the download leaves the map, so no request can see the blob unmarked.
func (m *Mirror) noteEagerLocked(dgst digest.Digest) {
	if len(m.eagerDone) >= 4096 { // never asked for: forget rather than grow
		clear(m.eagerDone)
	}
	m.eagerDone[dgst] = true
}

// takeEager reports, once, whether dgst was fetched ahead of the engine and not yet
// served: its first request is then a miss (upstream was needed for this pull), not a
// hit, so hit ratios and saved bytes stay honest.
func (m *Mirror) takeEager(dgst digest.Digest) bool {
	if !m.eagerOn.Load() {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.eagerDone[dgst] {
		delete(m.eagerDone, dgst)
		return true
	}
	// Committed, but its download has not left the map yet.
	if d := m.downloads[dgst.String()]; d != nil {
		d.mu.Lock()
		defer d.mu.Unlock()
		if !d.asked {
			d.asked = true
			return true
		}
	}
	return false
}

// descriptorsOf lists the config and layers an image manifest names.
func descriptorsOf(body []byte) []ocispec.Descriptor {
	var doc struct {
		Config *ocispec.Descriptor  `json:"config"`
		Layers []ocispec.Descriptor `json:"layers"`
	}
	if json.Unmarshal(body, &doc) != nil {
		return nil
	}
	if doc.Config != nil {
		return append(doc.Layers, *doc.Config)
	}
	return doc.Layers
}
