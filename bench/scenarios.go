package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// bench holds the running servers, the seeded images and the measurements.
type bench struct {
	o         *options
	work      string
	upstream  *server // the registry process
	front     *front  // its address for clients: registry and token service (through throttles)
	nm, ref   *server
	nginx     *server
	directTh  *throttle
	ctrd      *containerd
	debugAddr string

	hot, fresh  pushed
	herd        map[string][]pushed // contender -> one cold image per run
	pull        map[string][]pushed
	cold        pushed    // the 1-layer image of the cold scenarios; each run's cache is new instead
	coldTh      *throttle // between the cold scenarios' caches (each run's own) and the upstream
	fleetImgs   []pushed  // one fresh image per fleet run
	coldRuns    int       // cold caches started so far: each gets a directory of its own
	containerd2 string    // the label of containerd 2.x in scenario 9, if it ran

	mu       sync.Mutex
	results  map[string]map[string]sample // metric -> contender -> runs
	notes    []string
	profiles []profileSummary
	elapsed  time.Duration
	previous *previousReport // the report this run replaces, for the comparison
	closers  []func()        // in-process servers: token service, throttles
}

// close stops the in-process servers (after the processes that use them).
func (b *bench) close() {
	for i := len(b.closers) - 1; i >= 0; i-- {
		b.closers[i]()
	}
}

func (b *bench) record(metric, contender string, v float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.results[metric] == nil {
		b.results[metric] = map[string]sample{}
	}
	b.results[metric][contender] = append(b.results[metric][contender], v)
}

func (b *bench) note(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	log.Print("note: " + s)
	b.mu.Lock()
	b.notes = append(b.notes, s)
	b.mu.Unlock()
}

func (b *bench) mbps() float64 { return b.o.bandwidth * 1e6 }

// newThrottle is a throttle to the upstream at the benchmark's RTT and per-connection
// rate, with a shared cap of total bytes/s if total > 0, stopped at the end.
func (b *bench) newThrottle(upstream string, total float64) (*throttle, error) {
	th, err := newThrottle(upstream, b.o.rtt, b.mbps(), total)
	if err == nil {
		b.closers = append(b.closers, th.Close)
	}
	return th, err
}

// setup starts every server and seeds the upstream.
func setup(ctx context.Context, o *options, work string) (*bench, error) {
	b := &bench{o: o, work: work, results: map[string]map[string]sample{}, herd: map[string][]pushed{}, pull: map[string][]pushed{}}
	// The upstream wants anonymous bearer tokens, as real registries do. Its token service
	// is on the registry's own host:port (the front), so behind each throttle it is as far
	// away as the registry.
	ts, err := newTokenServer()
	if err != nil {
		return b, err
	}
	certFile := filepath.Join(work, "token-issuer.pem")
	if err := os.WriteFile(certFile, ts.certPEM(), 0o644); err != nil {
		return b, err
	}
	if b.upstream, err = startRegistry(ctx, work, "upstream", "", tokenAuthConfig(realmPlaceholder, certFile)); err != nil {
		return b, err
	}
	frontLog, err := os.Create(filepath.Join(work, "front.log"))
	if err != nil {
		return b, err
	}
	b.closers = append(b.closers, func() { frontLog.Close() })
	if b.front, err = newFront(b.upstream.base[len("http://"):], ts, frontLog); err != nil {
		return b, err
	}
	b.closers = append(b.closers, b.front.Close)
	up := b.front.Addr()
	newTh := func() (*throttle, error) { return b.newThrottle(up, 0) }
	nmTh, err := newTh()
	if err != nil {
		return b, err
	}
	refTh, err := newTh()
	if err != nil {
		return b, err
	}
	if b.directTh, err = newTh(); err != nil {
		return b, err
	}
	if b.coldTh, err = newTh(); err != nil {
		return b, err
	}
	dport, err := freePort()
	if err != nil {
		return b, err
	}
	b.debugAddr = fmt.Sprintf("127.0.0.1:%d", dport)
	if b.nm, err = startNodeMirror(ctx, work, o.bin, "http://"+nmTh.Addr(), b.debugAddr); err != nil {
		return b, err
	}
	b.nm.th = nmTh
	if b.ref, err = startRegistry(ctx, work, reference, "http://"+refTh.Addr(), ""); err != nil {
		return b, err
	}
	b.ref.th = refTh
	// nginx serves node-mirror's own blob files: content/blobs/sha256/<hex>.
	if b.nginx, err = startNginx(ctx, work, filepath.Join(work, nodeMirror, "data", "content")); err != nil {
		return b, err
	}
	if o.want("pull") {
		if os.Geteuid() != 0 {
			b.note("scenario 5 (containerd pull) skipped: containerd needs root")
		} else {
			e, err := debianContainerd()
			if err != nil {
				return b, err
			}
			if b.ctrd, err = startContainerd(ctx, work, "containerd", e); err != nil {
				return b, err
			}
		}
	}
	log.Printf("servers up: upstream %s, node-mirror %s, reference %s, nginx %s", b.upstream.base, b.nm.base, b.ref.base, b.nginx.base)
	return b, b.seed(ctx)
}

func (b *bench) seed(ctx context.Context) error {
	o := b.o
	start := time.Now()
	jobs := []seedJob{{repo: "bench/hot", sizes: []int64{int64(o.blobSize)}, out: &b.hot}, {repo: "bench/fresh", sizes: []int64{4096}, out: &b.fresh}}
	var total int64 = int64(o.blobSize)
	if o.want("herd") {
		for _, c := range []string{nodeMirror, reference} {
			b.herd[c] = make([]pushed, o.coldRepeat)
			for r := range o.coldRepeat {
				jobs = append(jobs, seedJob{repo: fmt.Sprintf("bench/herd-%s-%d", c, r), sizes: []int64{int64(o.herdSize)}, out: &b.herd[c][r]})
				total += int64(o.herdSize)
			}
		}
	}
	if b.ctrd != nil {
		for _, c := range []string{nodeMirror, reference, direct} {
			b.pull[c] = make([]pushed, o.coldRepeat)
			for r := range o.coldRepeat {
				jobs = append(jobs, seedJob{repo: fmt.Sprintf("bench/pull-%s-%d", c, r), sizes: pullSizes(int64(o.pullSize), o.pullLayers), out: &b.pull[c][r]})
				total += int64(o.pullSize)
			}
		}
	}
	if o.want("cold") || o.want("ctrcold") || o.want("sweep") {
		jobs = append(jobs, seedJob{repo: "bench/cold", sizes: []int64{int64(o.coldSize)}, out: &b.cold})
		total += int64(o.coldSize)
	}
	if o.want("fleet") {
		b.fleetImgs = make([]pushed, o.fleetRepeat)
		for r := range o.fleetRepeat {
			jobs = append(jobs, seedJob{repo: fmt.Sprintf("bench/fleet-%d", r), sizes: pullSizes(int64(o.fleetSize), o.fleetLayers), out: &b.fleetImgs[r]})
			total += int64(o.fleetSize)
		}
	}
	log.Printf("seeding upstream with %d images, %s", len(jobs), fmtBytes(total))
	if err := seedAll(ctx, b.front.Addr(), jobs); err != nil {
		return err
	}
	log.Printf("seeded in %v", time.Since(start).Round(100*time.Millisecond))
	return nil
}

func (b *bench) blobURL(base string, p pushed, layer int) string {
	return fmt.Sprintf("%s/v2/%s/blobs/%s", base, p.repo, p.layers[layer].Digest)
}

func (b *bench) manifestURL(base string, p pushed, ref string) string {
	return fmt.Sprintf("%s/v2/%s/manifests/%s", base, p.repo, ref)
}

// rotate gives the contenders in a different order every run, so no one always goes
// first (cold CPU caches, page cache, turbo) or last.
func rotate(cs []string, r int) []string {
	out := make([]string, len(cs))
	for i := range cs {
		out[i] = cs[(i+r)%len(cs)]
	}
	return out
}

func (b *bench) server(name string) *server {
	switch name {
	case nodeMirror:
		return b.nm
	case reference:
		return b.ref
	case ceiling:
		return b.nginx
	}
	return nil
}

func (b *bench) runScenarios(ctx context.Context) error {
	hot := b.o.want("blob") || b.o.want("digest") || b.o.want("tag")
	if hot || b.o.want("fresh") {
		if err := b.warm(ctx); err != nil {
			return fmt.Errorf("warming the caches: %w", err)
		}
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"blob", b.scenarioBlob},
		{"digest", b.scenarioDigest},
		{"tag", b.scenarioTag},
		{"fresh", b.scenarioFresh},
		{"herd", b.scenarioHerd},
		{"pull", b.scenarioPull},
		{"cold", b.scenarioCold},
		{"ctrcold", b.scenarioCtrCold},
		{"sweep", b.scenarioSweep},
		{"fleet", b.scenarioFleet},
	}
	for _, s := range steps {
		if !b.o.want(s.name) {
			continue
		}
		if s.name == "pull" && b.ctrd == nil {
			continue
		}
		if s.name == "ctrcold" && os.Geteuid() != 0 {
			b.note("scenario 9 (containerd cold pull) skipped: containerd needs root")
			continue
		}
		start := time.Now()
		log.Printf("scenario %s", s.name)
		if err := s.fn(ctx); err != nil {
			return fmt.Errorf("scenario %s: %w", s.name, err)
		}
		log.Printf("scenario %s done in %v", s.name, time.Since(start).Round(100*time.Millisecond))
		for _, s := range []*server{b.upstream, b.nm, b.ref, b.nginx} {
			if err := s.proc.exited(); err != nil {
				return err
			}
		}
	}
	return nil
}

// warm fills both caches with the hot image at loopback speed (shaping off): the hot
// scenarios measure serving from cache, not filling it.
func (b *bench) warm(ctx context.Context) error {
	cl := newClient(2)
	defer closeClient(cl)
	for _, s := range []*server{b.nm, b.ref} {
		s.th.shaping.Store(false)
		for _, u := range []string{b.manifestURL(s.base, b.hot, "latest"), b.manifestURL(s.base, b.fresh, "latest"), b.manifestURL(s.base, b.hot, b.hot.manifest.String())} {
			if _, err := fetchAll(ctx, cl, u, manifestAccept); err != nil {
				return err
			}
		}
		// The reference stores a proxied blob in the background while it streams it;
		// fetch until a fetch costs no upstream bytes.
		for i := 0; ; i++ {
			before := s.th.down.Load()
			if _, err := fetchAll(ctx, cl, b.blobURL(s.base, b.hot, 0), ""); err != nil {
				return err
			}
			if s.th.down.Load()-before < int64(b.o.blobSize)/2 {
				break
			}
			if i == 10 {
				return fmt.Errorf("%s still fetches the hot blob from upstream after %d tries", s.name, i)
			}
			time.Sleep(300 * time.Millisecond)
		}
		s.th.shaping.Store(true)
	}
	if _, err := fetchAll(ctx, cl, b.nginxBlobURL(b.hot.layers[0].Digest.Hex), ""); err != nil {
		return fmt.Errorf("nginx does not serve node-mirror's blob file: %w", err)
	}
	return nil
}

// upstreamBytes is what the upstream has sent to a cache so far (0 for nginx).
func (b *bench) upstreamBytes(c string) int64 {
	if s := b.server(c); s != nil && s.th != nil {
		return s.th.down.Load()
	}
	return 0
}

// checkNoUpstream notes when a cache went to the upstream during a warm scenario: its
// figure would then not be a cache hit's.
func (b *bench) checkNoUpstream(c, scenario string, before int64) {
	if d := b.upstreamBytes(c) - before; d > 0 {
		b.note("%s received %d bytes from upstream during a warm run of scenario %s", c, d, scenario)
	}
}

func (b *bench) nginxBlobURL(hex string) string { return b.nginx.base + "/blobs/sha256/" + hex }

// 1 and 7 and 6: warm blob throughput, CPU seconds per GB served and peak RSS.
func (b *bench) scenarioBlob(ctx context.Context) error {
	urls := map[string]string{
		nodeMirror: b.blobURL(b.nm.base, b.hot, 0),
		reference:  b.blobURL(b.ref.base, b.hot, 0),
		ceiling:    b.nginxBlobURL(b.hot.layers[0].Digest.Hex),
	}
	for r := range b.o.repeat {
		for _, c := range rotate([]string{nodeMirror, reference, ceiling}, r) {
			s := b.server(c)
			if err := resetPeakRSS(s.pid()); err != nil {
				return err
			}
			cpu0 := cpuSeconds(s.pid())
			up0 := b.upstreamBytes(c)
			rate, total, err := throughput(ctx, urls[c], b.o.blobClients, b.o.duration)
			b.checkNoUpstream(c, "1", up0)
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			cpu := cpuSeconds(s.pid()) - cpu0
			b.record("blob_mbps", c, rate/1e6)
			b.record("blob_cpu", c, cpu/(float64(total)/1e9))
			b.record("blob_rss", c, float64(peakRSS(s.pid()))/(1<<20))
			log.Printf("  blob %-11s run %d: %7.0f MB/s, %.2f CPU-s/GB", c, r+1, rate/1e6, cpu/(float64(total)/1e9))
		}
	}
	return b.profile(ctx, "blob", func(ctx context.Context, d time.Duration) error {
		_, _, err := throughput(ctx, urls[nodeMirror], b.o.blobClients, d)
		return err
	})
}

// 2: warm manifest by digest. nginx serving the same manifest file is the ceiling.
func (b *bench) scenarioDigest(ctx context.Context) error {
	dg := b.hot.manifest.String()
	urls := map[string]string{
		nodeMirror: b.manifestURL(b.nm.base, b.hot, dg),
		reference:  b.manifestURL(b.ref.base, b.hot, dg),
		ceiling:    b.nginxBlobURL(b.hot.manifest.Hex),
	}
	contenders := []string{nodeMirror, reference, ceiling}
	if _, err := os.Stat(filepath.Join(b.work, nodeMirror, "data", "content", "blobs", "sha256", b.hot.manifest.Hex)); err != nil {
		b.note("node-mirror keeps manifests somewhere other than its blob store; no nginx ceiling for manifests")
		contenders = contenders[:2]
	}
	for r := range b.o.repeat {
		for _, c := range rotate(contenders, r) {
			up0 := b.upstreamBytes(c)
			rps, err := requestRate(ctx, urls[c], manifestAccept, b.o.conns, b.o.duration)
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			b.checkNoUpstream(c, "2", up0)
			b.record("digest_rps", c, rps)
			log.Printf("  digest %-11s run %d: %6.0f req/s", c, r+1, rps)
		}
	}
	return b.profile(ctx, "digest", func(ctx context.Context, d time.Duration) error {
		_, err := requestRate(ctx, urls[nodeMirror], manifestAccept, b.o.conns, d)
		return err
	})
}

// 3: manifest by tag, with the upstream behind the throttle (an internet registry) and
// node-mirror's tag freshness as shipped.
func (b *bench) scenarioTag(ctx context.Context) error {
	urls := map[string]string{
		nodeMirror: b.manifestURL(b.nm.base, b.hot, "latest"),
		reference:  b.manifestURL(b.ref.base, b.hot, "latest"),
	}
	for r := range b.o.repeat {
		for _, c := range rotate([]string{nodeMirror, reference}, r) {
			heads := b.server(c).th.conns.Load()
			up0 := b.server(c).th.up.Load()
			rps, err := requestRate(ctx, urls[c], manifestAccept, b.o.conns, b.o.duration)
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			b.record("tag_rps", c, rps)
			log.Printf("  tag %-11s run %d: %6.0f req/s (%d new upstream connections, %d bytes sent upstream)", c, r+1, rps,
				b.server(c).th.conns.Load()-heads, b.server(c).th.up.Load()-up0)
		}
	}
	return b.profile(ctx, "tag", func(ctx context.Context, d time.Duration) error {
		_, err := requestRate(ctx, urls[nodeMirror], manifestAccept, b.o.conns, d)
		return err
	})
}

// The other half of the tag target: a tag moved upstream is seen through node-mirror
// within the freshness window.
func (b *bench) scenarioFresh(ctx context.Context) error {
	cl := newClient(2)
	defer closeClient(cl)
	for _, s := range []*server{b.nm, b.ref} {
		if _, err := getDigest(ctx, cl, b.manifestURL(s.base, b.fresh, "latest")); err != nil {
			return err
		}
	}
	img, err := makeImage("bench/fresh-moved", []int64{4096})
	if err != nil {
		return err
	}
	moved, err := pushImage(ctx, b.front.Addr(), "bench/fresh", img)
	if err != nil {
		return err
	}
	pushedAt := time.Now()
	want := moved.manifest.String()
	limit := b.o.freshness + 5*time.Second
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, s := range []*server{b.nm, b.ref} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(pushedAt) < limit {
				got, err := getDigest(ctx, cl, b.manifestURL(s.base, b.fresh, "latest"))
				if err != nil {
					errs <- fmt.Errorf("%s: %w", s.name, err)
					return
				}
				if got == want {
					b.record("fresh_s", s.name, time.Since(pushedAt).Seconds())
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
			b.note("%s still served the old digest of a moved tag %v after the push", s.name, limit)
			b.record("fresh_s", s.name, limit.Seconds())
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// 4 and 6: 16 clients ask for the same cold blob at once.
func (b *bench) scenarioHerd(ctx context.Context) error {
	size := int64(b.o.herdSize)
	for r := range b.o.coldRepeat {
		for _, c := range rotate([]string{nodeMirror, reference}, r) {
			s := b.server(c)
			if err := resetPeakRSS(s.pid()); err != nil {
				return err
			}
			before := s.th.down.Load()
			took, err := herd(ctx, b.blobURL(s.base, b.herd[c][r], 0), b.o.herdClients, size)
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			time.Sleep(500 * time.Millisecond) // let a background store finish before counting
			fetched := float64(s.th.down.Load()-before) / float64(size)
			b.record("herd_fetches", c, fetched)
			b.record("herd_s", c, took.Seconds())
			b.record("herd_rss", c, float64(peakRSS(s.pid()))/(1<<20))
			log.Printf("  herd %-11s run %d: last client done after %.2fs, upstream sent %.2f× the blob", c, r+1, took.Seconds(), fetched)
		}
	}
	return nil
}

// 5: cold image pull through a real containerd, via each cache and directly from the
// throttled upstream.
func (b *bench) scenarioPull(ctx context.Context) error {
	hosts := map[string]string{}
	var err error
	if hosts[nodeMirror], err = b.ctrd.hostsDir(nodeMirror, b.nm.base); err != nil {
		return err
	}
	if hosts[reference], err = b.ctrd.hostsDir(reference, b.ref.base); err != nil {
		return err
	}
	if hosts[direct], err = b.ctrd.hostsDir(direct, "http://"+b.directTh.Addr()); err != nil {
		return err
	}
	ths := map[string]*throttle{nodeMirror: b.nm.th, reference: b.ref.th, direct: b.directTh}
	for r := range b.o.coldRepeat {
		for _, c := range rotate([]string{nodeMirror, reference, direct}, r) {
			p := b.pull[c][r]
			before := ths[c].down.Load()
			took, _, err := b.ctrd.fetch(ctx, hosts[c], "docker.io/"+p.repo+":latest")
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			got := ths[c].down.Load() - before
			if got < int64(b.o.pullSize) {
				return fmt.Errorf("%s: the pull moved only %d bytes through the upstream throttle; it did not go where it should", c, got)
			}
			b.record("pull_s", c, took.Seconds())
			log.Printf("  pull %-11s run %d: %.2fs", c, r+1, took.Seconds())
		}
	}
	return nil
}

type profileSummary struct {
	scenario string
	cpuFile  string
	heapFile string
	top      string // the head of `go tool pprof -top` of the CPU profile
}

// profile reruns a hot scenario's load on node-mirror alone, outside the measured runs,
// while collecting a CPU profile through its --debug-listen pprof endpoint, then a heap
// profile. Files go to the profile dir, with `go tool pprof -top` summaries beside them.
func (b *bench) profile(ctx context.Context, scenario string, load func(context.Context, time.Duration) error) error {
	if b.o.profileDir == "" {
		return nil
	}
	if err := os.MkdirAll(b.o.profileDir, 0o755); err != nil {
		return err
	}
	secs := max(int(b.o.duration.Seconds()), 2)
	cpuFile := filepath.Join(b.o.profileDir, scenario+".cpu.pprof")
	heapFile := filepath.Join(b.o.profileDir, scenario+".heap.pprof")
	errc := make(chan error, 1)
	go func() {
		errc <- saveURL(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", b.debugAddr, secs), cpuFile)
	}()
	time.Sleep(100 * time.Millisecond) // the profile starts before the load
	if err := load(ctx, time.Duration(secs)*time.Second); err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("CPU profile: %w", err)
	}
	if err := saveURL(ctx, "http://"+b.debugAddr+"/debug/pprof/heap", heapFile); err != nil {
		return fmt.Errorf("heap profile: %w", err)
	}
	ps := profileSummary{scenario: scenario, cpuFile: cpuFile, heapFile: heapFile}
	ps.top = b.pprofTop(ctx, cpuFile, "-top")
	b.pprofTop(ctx, heapFile, "-sample_index=alloc_space -top")
	b.profiles = append(b.profiles, ps)
	log.Printf("  profiles: %s, %s", cpuFile, heapFile)
	return nil
}

// pprofTop writes `go tool pprof <args>` of a profile beside it as .txt and returns it
// ("" if go is not there or pprof fails, which is noted).
func (b *bench) pprofTop(ctx context.Context, file, args string) string {
	goBin, err := lookPath("go")
	if err != nil {
		return ""
	}
	argv := append([]string{"tool", "pprof"}, strings.Fields(args)...)
	argv = append(argv, "-nodecount=25", b.o.bin, file)
	out, err := exec.CommandContext(ctx, goBin, argv...).Output()
	if err != nil {
		b.note("go tool pprof %s: %v", file, err)
		return ""
	}
	os.WriteFile(file+".txt", out, 0o644)
	return string(out)
}

func saveURL(ctx context.Context, url, file string) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
