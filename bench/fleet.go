package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// fleetGroup is n node-mirror daemons that reach the upstream through one uplink: either
// one fleet (every fleet flag, one key, joined through the first) or n islands (no fleet
// flags), as a cluster runs them today.
type fleetGroup struct {
	name  string // "fleet-4", "islands-4": the contender in the results
	fleet bool
	nodes []*server
	debug []string // each node's --debug-listen (pprof)
	th    *throttle
	dir   string
}

func groupName(fleet bool, n int) string {
	if fleet {
		return fmt.Sprintf("fleet-%d", n)
	}
	return fmt.Sprintf("islands-%d", n)
}

// startGroup starts the n daemons of a group, each with its own data dir and ports, all
// behind one new throttle with the shared uplink cap.
func (b *bench) startGroup(ctx context.Context, n int, fleet bool) (*fleetGroup, error) {
	g := &fleetGroup{name: groupName(fleet, n), fleet: fleet, dir: filepath.Join(b.work, "fleet", groupName(fleet, n))}
	var err error
	if g.th, err = b.newThrottle(b.front.Addr(), b.o.uplink*1e6); err != nil {
		return g, err
	}
	keyFile := ""
	if fleet {
		keyFile = filepath.Join(g.dir, "fleet.key")
		if err := writeFleetKey(keyFile); err != nil {
			return g, err
		}
	}
	var firstGossip string
	for i := range n {
		dport, err := freePort()
		if err != nil {
			return g, err
		}
		g.debug = append(g.debug, fmt.Sprintf("127.0.0.1:%d", dport))
		spec := mirrorSpec{
			name:     fmt.Sprintf("%s-node-%d", g.name, i+1),
			dir:      filepath.Join(g.dir, fmt.Sprintf("node-%d", i+1)),
			upstream: "http://" + g.th.Addr(),
			args:     []string{"--debug-listen", g.debug[i]},
		}
		if fleet {
			peer, err := freePort()
			if err != nil {
				return g, err
			}
			gossip, err := freeTCPUDPPort()
			if err != nil {
				return g, err
			}
			gaddr := fmt.Sprintf("127.0.0.1:%d", gossip)
			spec.args = append(spec.args,
				"--peer-listen", fmt.Sprintf("127.0.0.1:%d", peer),
				"--gossip-listen", gaddr,
				"--fleet-key-file", keyFile,
				"--node-name", fmt.Sprintf("node-%d", i+1),
			)
			if i == 0 {
				firstGossip = gaddr
			} else {
				spec.args = append(spec.args, "--join", firstGossip)
			}
		}
		s, err := startMirror(ctx, b.o.bin, spec)
		if s != nil {
			g.nodes = append(g.nodes, s)
		}
		if err != nil {
			return g, err
		}
	}
	return g, nil
}

// stop ends the group's daemons and removes their directories (with -keep, their stores).
func (g *fleetGroup) stop(b *bench) {
	for _, s := range g.nodes {
		s.proc.close()
	}
	if !b.o.keep {
		os.RemoveAll(g.dir)
		return
	}
	for i := range g.nodes {
		b.removeRun(filepath.Join(g.dir, fmt.Sprintf("node-%d", i+1)))
	}
}

// writeFleetKey writes a new 32-byte key as 64 hex digits, readable by its owner only
// (the daemon refuses a key file others can read).
func writeFleetKey(file string) error {
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return err
	}
	k := make([]byte, 32)
	rand.Read(k)
	return os.WriteFile(file, []byte(hex.EncodeToString(k)+"\n"), 0o600)
}

// freeTCPUDPPort is a loopback port free for both TCP and UDP (memberlist binds both).
func freeTCPUDPPort() (int, error) {
	for range 20 {
		port, err := freePort()
		if err != nil {
			return 0, err
		}
		pc, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		pc.Close()
		return port, nil
	}
	return 0, errors.New("no loopback port free for TCP and UDP")
}

// adminStatus is the part of `node-mirror status --json` (GET /admin/status) the
// benchmark reads: the fleet's members and the bytes exchanged with each.
type adminStatus struct {
	Mirror struct {
		Active []struct {
			Digest      string `json:"digest"`
			Stored      int64  `json:"stored"`
			Received    int64  `json:"received"`
			Connections int    `json:"connections"`
		} `json:"active"`
	} `json:"mirror"`
	Fleet []struct {
		Name     string `json:"name"`
		State    string `json:"state"`
		Self     bool   `json:"self"`
		BytesIn  int64  `json:"bytes_in"`
		BytesOut int64  `json:"bytes_out"`
		Faults   int64  `json:"faults"`
	} `json:"fleet"`
}

func getStatus(ctx context.Context, base string) (adminStatus, error) {
	var st adminStatus
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/admin/status", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("GET %s/admin/status: %s", base, resp.Status)
	}
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// waitMembers polls every daemon's status until each lists all n members alive.
func (g *fleetGroup) waitMembers(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		lagging := ""
		for _, s := range g.nodes {
			st, err := getStatus(ctx, s.base)
			alive := 0
			for _, m := range st.Fleet {
				if m.State == "alive" {
					alive++
				}
			}
			if err != nil || alive != len(g.nodes) {
				lagging = fmt.Sprintf("%s sees %d of %d members alive (%v)", s.name, alive, len(g.nodes), err)
				break
			}
		}
		if lagging == "" {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: membership did not converge in %v: %s", g.name, timeout, lagging)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// peerBytes is, per daemon, the peer bytes it served to the others and fetched from them.
func (g *fleetGroup) peerBytes(ctx context.Context) (out, in []int64, err error) {
	for _, s := range g.nodes {
		st, err := getStatus(ctx, s.base)
		if err != nil {
			return nil, nil, err
		}
		var o, i int64
		for _, m := range st.Fleet {
			o += m.BytesOut
			i += m.BytesIn
		}
		out, in = append(out, o), append(in, i)
	}
	return out, in, nil
}

// trouble sums the counters that say a daemon worked around something: peer fallbacks and
// faults, chunk retries, upstream errors, by metric and label set, over the group.
func (g *fleetGroup) trouble(ctx context.Context) (map[string]float64, error) {
	sum := map[string]float64{}
	for _, s := range g.nodes {
		m, err := scrape(ctx, s.base+"/metrics", troubleMetrics)
		if err != nil {
			return nil, err
		}
		for k, v := range m {
			sum[k] += v
		}
	}
	return sum, nil
}

var troubleMetrics = []string{"node_mirror_peer_fallbacks_total", "node_mirror_peer_faults_total",
	"node_mirror_chunk_retries_total", "node_mirror_upstream_errors_total"}

// scrape reads the samples of the named metrics from a Prometheus text exposition,
// keyed by the sample's name and labels as written.
func scrape(ctx context.Context, url string, names []string) (map[string]float64, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return parseMetrics(resp.Body, names)
}

func parseMetrics(r io.Reader, names []string) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		key := line[:i]
		name, _, _ := strings.Cut(key, "{")
		if !slices.Contains(names, name) {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", line, err)
		}
		out[key] += v
	}
	return out, sc.Err()
}

// diffTrouble is what grew between two trouble readings, as "key +n" items.
func diffTrouble(before, after map[string]float64) []string {
	var out []string
	for k, v := range after {
		if d := v - before[k]; d > 0 {
			out = append(out, fmt.Sprintf("%s +%g", k, d))
		}
	}
	sort.Strings(out)
	return out
}

// imageBlob is a blob of a manifest: config or layer.
type imageBlob struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// pullImage pulls repo:latest through the mirror at base as an engine does: the manifest
// by tag, then the config and every layer at once. It checks sizes; digests are the
// mirror's to verify (and verifyImage checks them afterwards).
func pullImage(ctx context.Context, cl *http.Client, base, repo string) ([]imageBlob, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/v2/%s/manifests/latest", base, repo), nil)
	req.Header.Set("Accept", manifestAccept)
	resp, err := cl.Do(req)
	if err != nil {
		return nil, err
	}
	var m struct {
		Config imageBlob   `json:"config"`
		Layers []imageBlob `json:"layers"`
	}
	err = json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&m)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("manifest of %s: %s", repo, resp.Status)
	}
	if err != nil {
		return nil, fmt.Errorf("manifest of %s: %w", repo, err)
	}
	blobs := append([]imageBlob{m.Config}, m.Layers...)
	errs := make(chan error, len(blobs))
	for _, bl := range blobs {
		go func() {
			n, err := fetchAll(ctx, cl, fmt.Sprintf("%s/v2/%s/blobs/%s", base, repo, bl.Digest), "")
			if err == nil && n != bl.Size {
				err = fmt.Errorf("blob %s: got %d bytes, want %d", bl.Digest, n, bl.Size)
			}
			errs <- err
		}()
	}
	for range blobs {
		if e := <-errs; e != nil && err == nil {
			err = e
		}
	}
	return blobs, err
}

// pullEverywhere has every node pull repo:latest at the same instant (connections made
// beforehand) and returns each node's time to its last byte.
func pullEverywhere(ctx context.Context, nodes []*server, repo string) ([]time.Duration, error) {
	cls := make([]*http.Client, len(nodes))
	for i, s := range nodes {
		cls[i] = newClient(4)
		defer closeClient(cls[i])
		if _, err := fetchAll(ctx, cls[i], s.base+"/v2/", ""); err != nil {
			return nil, err
		}
	}
	took := make([]time.Duration, len(nodes))
	errs := make([]error, len(nodes))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, s := range nodes {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			_, errs[i] = pullImage(ctx, cls[i], s.base, repo)
			took[i] = time.Since(t0)
			if errs[i] != nil {
				errs[i] = fmt.Errorf("%s: %w", s.name, errs[i])
			}
		})
	}
	close(start)
	wg.Wait()
	return took, errors.Join(errs...)
}

// verifyImage reads every blob of the image back from every node and checks its digest:
// the right bytes everywhere, not only the right sizes.
func verifyImage(ctx context.Context, nodes []*server, repo string, blobs []imageBlob) error {
	cl := newClient(2)
	defer closeClient(cl)
	buf := make([]byte, 1<<20)
	for _, s := range nodes {
		for _, bl := range blobs {
			url := fmt.Sprintf("%s/v2/%s/blobs/%s", s.base, repo, bl.Digest)
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			resp, err := cl.Do(req)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.CopyBuffer(h, resp.Body, buf)
			resp.Body.Close()
			if err != nil {
				return fmt.Errorf("%s: %w", url, err)
			}
			if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != bl.Digest {
				return fmt.Errorf("%s served %s with digest %s", s.name, bl.Digest, got)
			}
		}
	}
	return nil
}

// 10: a fresh image pulled by every node of a cluster at once, through one uplink: a
// fleet of n against n islands, for each n.
func (b *bench) scenarioFleet(ctx context.Context) error {
	var size int64
	for _, l := range b.fleetImgs[0].layers {
		size += l.Size
	}
	for _, n := range b.o.fleetNodes {
		if err := b.fleetSize(ctx, n, size); err != nil {
			return err
		}
	}
	return nil
}

func (b *bench) fleetSize(ctx context.Context, n int, size int64) error {
	groups := map[bool]*fleetGroup{}
	defer func() {
		for _, g := range groups {
			g.stop(b)
		}
	}()
	for _, fleet := range []bool{true, false} {
		g, err := b.startGroup(ctx, n, fleet)
		groups[fleet] = g
		if err != nil {
			return err
		}
	}
	for r := range b.o.fleetRepeat {
		img := b.fleetImgs[r]
		for _, fleet := range rotateBools(r) {
			g := groups[fleet]
			if fleet {
				if err := g.waitMembers(ctx, time.Minute); err != nil {
					return err
				}
			}
			for _, s := range g.nodes {
				if err := resetPeakRSS(s.pid()); err != nil {
					return err
				}
			}
			out0, in0, err := g.peerBytes(ctx)
			if err != nil {
				return err
			}
			tr0, err := g.trouble(ctx)
			if err != nil {
				return err
			}
			var pids []int
			for _, s := range g.nodes {
				pids = append(pids, s.pid())
			}
			meter := startCPUMeter(pids, b.upstream.pid())
			before, conns, cpu0 := g.th.down.Load(), g.th.conns.Load(), readCPUTimes()
			stopWatch := watchBytes(g.th, 50*time.Millisecond)
			stopProgress := func() {}
			if b.o.keep { // every node's downloads over the run, for inspection
				stopProgress = watchProgress(ctx, g.nodes, 200*time.Millisecond,
					filepath.Join(b.work, "fleet", fmt.Sprintf("%s-run-%d-downloads.csv", g.name, r+1)))
			}
			profileDone := b.profileFleet(ctx, g, r)
			took, err := pullEverywhere(ctx, g.nodes, img.repo)
			stopProgress()
			profileDone()
			busy := readCPUTimes().busySince(cpu0)
			acct := meter.stop()
			if err != nil {
				stopWatch()
				return fmt.Errorf("%s run %d: %w", g.name, r+1, err)
			}
			down := waitQuiet(ctx, g.th, 500*time.Millisecond, time.Minute) - before
			trace := stopWatch()
			uplinkDone := trace.reached(before + down - 1<<20)
			if b.o.keep { // the upstream's rate and connections over the run, for inspection
				trace.write(filepath.Join(b.work, "fleet", fmt.Sprintf("%s-run-%d.csv", g.name, r+1)))
			}
			var rss int64
			for _, s := range g.nodes {
				rss = max(rss, peakRSS(s.pid()))
				if err := s.proc.exited(); err != nil {
					return err
				}
			}
			out1, in1, err := g.peerBytes(ctx)
			if err != nil {
				return err
			}
			tr1, err := g.trouble(ctx)
			if err != nil {
				return err
			}
			if g.fleet {
				blobs := []imageBlob{}
				for _, l := range img.layers {
					blobs = append(blobs, imageBlob{Digest: l.Digest.String(), Size: l.Size})
				}
				if err := verifyImage(ctx, g.nodes, img.repo, blobs); err != nil {
					return fmt.Errorf("%s run %d: %w", g.name, r+1, err)
				}
			}
			slowest, fastest := slices.Max(took), slices.Min(took)
			served := make([]float64, len(g.nodes))
			var fromPeers int64
			for i := range g.nodes {
				served[i] = float64(out1[i]-out0[i]) / float64(size)
				fromPeers += in1[i] - in0[i]
			}
			b.record("fleet_s", g.name, slowest.Seconds())
			b.record("fleet_fastest_s", g.name, fastest.Seconds())
			b.record("fleet_bytes", g.name, float64(down)/float64(size))
			b.record("fleet_conns", g.name, float64(g.th.conns.Load()-conns))
			b.record("fleet_rss", g.name, float64(rss)/(1<<20))
			b.record("fleet_peer", g.name, float64(fromPeers)/float64(size))
			b.record("fleet_uplink_s", g.name, uplinkDone.Seconds())
			b.record("fleet_busy", g.name, busy*100)
			b.record("fleet_cpu_daemons", g.name, acct.daemons)
			b.record("fleet_cpu_bench", g.name, acct.bench+acct.upstream)
			b.record("fleet_cpu_other", g.name, acct.other)
			if g.fleet {
				b.record("fleet_served_min", g.name, slices.Min(served))
				b.record("fleet_served_max", g.name, slices.Max(served))
			}
			if t := diffTrouble(tr0, tr1); len(t) > 0 {
				b.note("%s run %d: %s", g.name, r+1, strings.Join(t, ", "))
			}
			log.Printf("  %-10s run %d: slowest node %.2fs, fastest %.2fs; upstream sent %.3f× the image over %d connections, all but the last MiB by %.2fs; peers sent %.2f× the image; max RSS %s; machine CPU %.0f%% busy (CPU-s: daemons %.1f, upstream+bench %.1f, other %.1f)",
				g.name, r+1, slowest.Seconds(), fastest.Seconds(), float64(down)/float64(size), g.th.conns.Load()-conns,
				uplinkDone.Seconds(), float64(fromPeers)/float64(size), fmtMiB(rss), busy*100, acct.daemons, acct.bench+acct.upstream, acct.other)
		}
	}
	return nil
}

// rotateBools is fleet first on even runs, islands first on odd ones.
func rotateBools(r int) []bool {
	if r%2 == 0 {
		return []bool{true, false}
	}
	return []bool{false, true}
}

// byteTrace is a throttle's upstream byte counter sampled over time.
type byteTrace struct {
	start   time.Time
	at      []time.Duration
	counter []int64
	conns   []int // the throttle's open connections
}

// write saves the trace as CSV (seconds, bytes since the start, open connections).
func (t byteTrace) write(file string) error {
	var b strings.Builder
	b.WriteString("seconds,bytes,connections\n")
	for i := range t.at {
		fmt.Fprintf(&b, "%.3f,%d,%d\n", t.at[i].Seconds(), t.counter[i]-t.counter[0], t.conns[i])
	}
	return os.WriteFile(file, []byte(b.String()), 0o644)
}

// reached is how long after the start the counter first stood at n or more (the last
// sample's time if never).
func (t byteTrace) reached(n int64) time.Duration {
	for i, c := range t.counter {
		if c >= n {
			return t.at[i]
		}
	}
	if len(t.at) == 0 {
		return 0
	}
	return t.at[len(t.at)-1]
}

// watchBytes samples th's upstream counter every interval until the returned function is
// called, which returns the trace.
func watchBytes(th *throttle, interval time.Duration) func() byteTrace {
	tr := byteTrace{start: time.Now()}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tk := time.NewTicker(interval)
		defer tk.Stop()
		for {
			tr.at = append(tr.at, time.Since(tr.start))
			tr.counter = append(tr.counter, th.down.Load())
			tr.conns = append(tr.conns, th.active())
			select {
			case <-stop:
				return
			case <-tk.C:
			}
		}
	}()
	var once sync.Once
	return func() byteTrace {
		once.Do(func() { close(stop); <-done })
		return tr
	}
}

// watchProgress polls every node's status for its active downloads until the returned
// function is called, and writes them to file as CSV: seconds, node, digest (short),
// bytes stored (the verified-at-commit prefix), bytes received, connections.
func watchProgress(ctx context.Context, nodes []*server, interval time.Duration, file string) func() {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		var b strings.Builder
		b.WriteString("seconds,node,digest,stored,received,connections\n")
		start := time.Now()
		tk := time.NewTicker(interval)
		defer tk.Stop()
		for {
			at := time.Since(start).Seconds()
			for _, s := range nodes {
				st, err := getStatus(ctx, s.base)
				if err != nil {
					continue
				}
				for _, d := range st.Mirror.Active {
					fmt.Fprintf(&b, "%.3f,%s,%.19s,%d,%d,%d\n", at, s.name, d.Digest, d.Stored, d.Received, d.Connections)
				}
			}
			select {
			case <-stop:
				os.WriteFile(file, []byte(b.String()), 0o644)
				return
			case <-tk.C:
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(stop); <-done }) }
}

// profileFleet starts a CPU profile of a fleet's node-1 for the first -fleet-profile of
// run r; the returned function waits for it and summarises it.
func (b *bench) profileFleet(ctx context.Context, g *fleetGroup, r int) func() {
	if !g.fleet || b.o.profileDir == "" || b.o.fleetProfile <= 0 {
		return func() {}
	}
	if err := os.MkdirAll(b.o.profileDir, 0o755); err != nil {
		b.note("fleet profile: %v", err)
		return func() {}
	}
	name := fmt.Sprintf("%s-run-%d", g.name, r+1)
	file := filepath.Join(b.o.profileDir, name+".cpu.pprof")
	errc := make(chan error, 1)
	go func() {
		errc <- saveURL(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", g.debug[0], max(1, int(b.o.fleetProfile.Seconds()))), file)
	}()
	time.Sleep(50 * time.Millisecond) // the profile starts before the pull
	return func() {
		if err := <-errc; err != nil {
			b.note("fleet profile of %s: %v", name, err)
			return
		}
		b.profiles = append(b.profiles, profileSummary{scenario: name + " (node-1)", cpuFile: file, top: b.pprofTop(ctx, file, "-top")})
	}
}
