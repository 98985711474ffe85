package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Contenders of the cold single-blob scenario (issue 12), as the report names them.
const (
	coldDirect = "direct"                // (a) one stream straight from the throttled upstream
	coldSingle = "node-mirror, 1 stream" // (b) --fetch-concurrency 1
	coldNM     = nodeMirror              // (c) defaults
	coldRef    = reference               // (d) the reference proxy
)

// coldRun is what one cold fetch cost: wall time, bytes the upstream sent (counted at the
// throttle once it fell quiet), upstream connections opened, and the cache's peak RSS.
type coldRun struct {
	took  time.Duration
	bytes int64
	conns int64
	rss   int64 // bytes; 0 when there is no cache process
	// cacheCPU is the cache's CPU seconds over its whole life; clientCPU containerd's and
	// ctr's during a pull; busy the share of the machine's CPU time (all cores, anyone's)
	// in use during the fetch: near 1, the fetch waited for CPU, not for the network.
	cacheCPU, clientCPU, busy float64
	// otherCPU is CPU seconds during the fetch used by none of the processes of the run
	// (cache, containerd and ctr, upstream, the benchmark): other work on the machine.
	otherCPU float64
}

// fresh runs one cold fetch against a daemon started for it alone, with an empty store,
// and removes it afterwards: the image stays the same, only the cache is new, so no run
// inherits anything from the one before. start returns the daemon's base URL.
func (b *bench) freshCache(ctx context.Context, name string, start func(dir string) (*server, error),
	fetch func(ctx context.Context, base string) (time.Duration, error)) (coldRun, error) {
	b.coldRuns++
	dir := filepath.Join(b.work, "cold", fmt.Sprintf("%s-%d", name, b.coldRuns))
	s, err := start(dir)
	if s != nil {
		defer func() {
			s.proc.close()
			b.removeRun(dir)
		}()
	}
	if err != nil {
		return coldRun{}, err
	}
	before, conns := b.coldTh.down.Load(), b.coldTh.conns.Load()
	cpu0, meter := readCPUTimes(), startCPUMeter([]int{s.pid()}, b.upstream.pid())
	took, err := fetch(ctx, s.base)
	busy, acct := readCPUTimes().busySince(cpu0), meter.stop()
	if err != nil {
		return coldRun{}, fmt.Errorf("%s: %w", name, err)
	}
	// A cache may still be storing in the background (the reference does): count its
	// bytes only once the throttle has been quiet for a while.
	down := waitQuiet(ctx, b.coldTh, 500*time.Millisecond, time.Minute) - before
	if err := s.proc.exited(); err != nil {
		return coldRun{}, err
	}
	return coldRun{took: took, bytes: down, conns: b.coldTh.conns.Load() - conns, rss: peakRSS(s.pid()),
		cacheCPU: cpuSeconds(s.pid()), busy: busy, otherCPU: acct.other}, nil
}

// removeRun removes the directory of a process that one run started, after it ended.
// With -keep only its store goes (dozens of runs of a 512 MiB blob would fill a disk);
// its log and config stay for inspection.
func (b *bench) removeRun(dir string) {
	if !b.o.keep {
		os.RemoveAll(dir)
		return
	}
	for _, store := range []string{"data", "storage", "root"} { // node-mirror, docker-registry, containerd
		os.RemoveAll(filepath.Join(dir, store))
	}
}

// waitQuiet waits until no byte passed th from upstream for quiet (or max passed) and
// returns the counter.
func waitQuiet(ctx context.Context, th *throttle, quiet, max time.Duration) int64 {
	deadline := time.Now().Add(max)
	last, since := th.down.Load(), time.Now()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(100 * time.Millisecond)
		if n := th.down.Load(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) >= quiet {
			break
		}
	}
	return last
}

// startColdMirror is a start function for freshCache: node-mirror from the cold throttle
// with the given extra flags.
func (b *bench) startColdMirror(ctx context.Context, name string, args ...string) func(string) (*server, error) {
	return func(dir string) (*server, error) {
		return startMirror(ctx, b.o.bin, mirrorSpec{name: name, dir: dir, upstream: "http://" + b.coldTh.Addr(), args: args})
	}
}

// blobFetch is a fetch function for freshCache: one client GETs the cold blob.
func (b *bench) blobFetch(ctx context.Context, base string) (time.Duration, error) {
	return herd(ctx, b.blobURL(base, b.cold, 0), 1, b.cold.layers[0].Size)
}

func (b *bench) recordCold(prefix, contender string, r coldRun, size int64) {
	b.record(prefix+"_s", contender, r.took.Seconds())
	b.record(prefix+"_bytes", contender, float64(r.bytes)/float64(size))
	b.record(prefix+"_conns", contender, float64(r.conns))
	if r.rss > 0 {
		b.record(prefix+"_rss", contender, float64(r.rss)/(1<<20))
		b.record(prefix+"_cpu", contender, r.cacheCPU)
	}
	if r.clientCPU > 0 {
		b.record(prefix+"_clientcpu", contender, r.clientCPU)
	}
	b.record(prefix+"_busy", contender, r.busy*100)
	b.record(prefix+"_other", contender, r.otherCPU)
}

// 8: one cold 512 MiB blob, one client: (a) directly, (b) node-mirror with one stream,
// (c) node-mirror as shipped, (d) the reference.
func (b *bench) scenarioCold(ctx context.Context) error {
	size := b.cold.layers[0].Size
	for r := range b.o.coldRepeat {
		for _, c := range rotate([]string{coldDirect, coldSingle, coldNM, coldRef}, r) {
			var run coldRun
			var err error
			switch c {
			case coldDirect:
				before, conns, cpu0, meter := b.coldTh.down.Load(), b.coldTh.conns.Load(), readCPUTimes(), startCPUMeter(nil, b.upstream.pid())
				var took time.Duration
				took, err = directBlob(ctx, "http://"+b.coldTh.Addr(), b.cold.repo, b.cold.layers[0].Digest.String(), size)
				busy, acct := readCPUTimes().busySince(cpu0), meter.stop()
				run = coldRun{took: took, bytes: waitQuiet(ctx, b.coldTh, 500*time.Millisecond, time.Minute) - before,
					conns: b.coldTh.conns.Load() - conns, busy: busy, otherCPU: acct.other}
			case coldSingle:
				run, err = b.freshCache(ctx, "node-mirror-c1", b.startColdMirror(ctx, "node-mirror-c1", "--fetch-concurrency", "1"), b.blobFetch)
			case coldNM:
				run, err = b.freshCache(ctx, "node-mirror-defaults", b.startColdMirror(ctx, "node-mirror-defaults"), b.blobFetch)
			case coldRef:
				run, err = b.freshCache(ctx, "reference-cold", func(dir string) (*server, error) {
					return startRegistry(ctx, filepath.Dir(dir), filepath.Base(dir), "http://"+b.coldTh.Addr(), "")
				}, b.blobFetch)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			b.recordCold("cold", c, run, size)
			log.Printf("  cold %-22s run %d: %6.2fs, upstream sent %.3f× the blob over %d connections, peak RSS %s",
				c, r+1, run.took.Seconds(), float64(run.bytes)/float64(size), run.conns, fmtMiB(run.rss))
		}
	}
	return nil
}

// engines are the containerd builds scenario 9 runs, with the prefix of their metrics:
// Debian's, and 2.x when -containerd2-dir has it.
func (b *bench) engines() ([]engine, []string, error) {
	deb, err := debianContainerd()
	if err != nil {
		return nil, nil, err
	}
	es, prefixes := []engine{deb}, []string{"ctrcold"}
	if d := b.o.containerd2Dir; d != "" {
		e := engine{containerd: filepath.Join(d, "containerd"), ctr: filepath.Join(d, "ctr")}
		if _, err := os.Stat(e.ctr); err != nil {
			b.note("scenario 9 without containerd 2.x: %v (`make containerd2` builds it)", err)
			return es, prefixes, nil
		}
		e.label = "containerd " + engineVersion(e.containerd)
		es, prefixes = append(es, e), append(prefixes, "ctrcold2")
		b.containerd2 = e.label
	}
	return es, prefixes, nil
}

// engineVersion is the version a containerd binary reports ("v2.4.2").
func engineVersion(bin string) string {
	out, _ := exec.Command(bin, "--version").Output()
	if f := strings.Fields(string(out)); len(f) >= 3 {
		v, _, _ := strings.Cut(f[2], "+") // "+unknown": built outside a git checkout
		return v
	}
	return strings.TrimSpace(string(out))
}

// 9: `ctr content fetch` of the cold 1-layer image through node-mirror (as shipped) and
// directly, each on a containerd of its own with an empty store, for each engine.
func (b *bench) scenarioCtrCold(ctx context.Context) error {
	engines, prefixes, err := b.engines()
	if err != nil {
		return err
	}
	for i, e := range engines {
		if err := b.ctrCold(ctx, e, prefixes[i]); err != nil {
			return fmt.Errorf("%s: %w", e.label, err)
		}
	}
	return nil
}

func (b *bench) ctrCold(ctx context.Context, e engine, prefix string) error {
	size := b.cold.layers[0].Size
	ref := "docker.io/" + b.cold.repo + ":latest"
	for r := range b.o.coldRepeat {
		for _, c := range rotate([]string{nodeMirror, direct}, r) {
			ctrName := fmt.Sprintf("%s-%s-%d", prefix, c, r)
			ctrd, err := startContainerd(ctx, b.work, ctrName, e)
			if err != nil {
				return err
			}
			var clientCPU float64
			pull := func(ctx context.Context, host string) (time.Duration, error) {
				hosts, err := ctrd.hostsDir("cold", host)
				if err != nil {
					return 0, err
				}
				cpu0 := cpuSeconds(ctrd.proc.pid())
				took, ctrCPU, err := ctrd.fetch(ctx, hosts, ref)
				clientCPU = cpuSeconds(ctrd.proc.pid()) - cpu0 + ctrCPU
				return took, err
			}
			var run coldRun
			if c == direct {
				before, conns, cpu0, meter := b.coldTh.down.Load(), b.coldTh.conns.Load(), readCPUTimes(), startCPUMeter(nil, b.upstream.pid())
				run.took, err = pull(ctx, "http://"+b.coldTh.Addr())
				run.busy, run.otherCPU = readCPUTimes().busySince(cpu0), meter.stop().other
				run.bytes = waitQuiet(ctx, b.coldTh, 500*time.Millisecond, time.Minute) - before
				run.conns = b.coldTh.conns.Load() - conns
			} else {
				run, err = b.freshCache(ctx, "node-mirror-ctr", b.startColdMirror(ctx, "node-mirror-ctr"), pull)
			}
			run.clientCPU = clientCPU
			run.otherCPU = max(0, run.otherCPU-clientCPU) // containerd and ctr are the run's own
			ctrd.proc.close()
			b.removeRun(ctrd.dir)
			if err != nil {
				return fmt.Errorf("%s: %w", c, err)
			}
			if run.bytes < size {
				return fmt.Errorf("%s: the pull moved only %d bytes through the upstream throttle; it did not go where it should", c, run.bytes)
			}
			b.recordCold(prefix, c, run, size)
			log.Printf("  %s %-11s run %d: %6.2fs, upstream sent %.3f× the blob, peak RSS %s", e.label, c, r+1, run.took.Seconds(),
				float64(run.bytes)/float64(size), fmtMiB(run.rss))
		}
	}
	return nil
}

// sweepKey names a point of the sweep in the results.
func sweepKey(chunk int64, conc int) string { return fmt.Sprintf("%s×%d", fmtBytes(chunk), conc) }

// 8s: node-mirror's cold fetch of the same blob over chunk sizes × concurrencies.
// Concurrency 1 is one plain stream whatever the chunk size, so it is measured once; and
// not at all when scenario 8 measured it as (b).
func (b *bench) scenarioSweep(ctx context.Context) error {
	type point struct {
		chunk int64
		conc  int
	}
	var points []point
	for _, conc := range b.o.sweepConc {
		for i, chunk := range b.o.sweepChunks {
			if conc == 1 && i > 0 {
				continue
			}
			if conc == 1 && len(b.results["cold_s"][coldSingle]) > 0 {
				key := sweepKey(chunk, conc)
				for _, m := range []string{"_s", "_bytes", "_conns", "_rss", "_cpu", "_busy", "_other"} {
					for _, v := range b.results["cold"+m][coldSingle] {
						b.record("sweep"+m, key, v)
					}
				}
				continue
			}
			points = append(points, point{chunk, conc})
		}
	}
	size := b.cold.layers[0].Size
	for r := range b.o.sweepRepeat {
		order := make([]point, len(points))
		for i := range points {
			order[i] = points[(i+r*len(points)/max(b.o.sweepRepeat, 1))%len(points)]
		}
		for _, p := range order {
			key := sweepKey(p.chunk, p.conc)
			run, err := b.freshCache(ctx, "node-mirror-sweep", b.startColdMirror(ctx, "node-mirror-sweep",
				"--fetch-chunk-size", strconv.FormatInt(p.chunk, 10), "--fetch-concurrency", strconv.Itoa(p.conc)), b.blobFetch)
			if err != nil {
				return fmt.Errorf("%s: %w", key, err)
			}
			b.recordCold("sweep", key, run, size)
			log.Printf("  sweep %-10s run %d: %6.2fs (%4.0f MB/s), upstream sent %.3f× the blob, peak RSS %s", key, r+1,
				run.took.Seconds(), float64(size)/run.took.Seconds()/1e6, float64(run.bytes)/float64(size), fmtMiB(run.rss))
		}
	}
	return nil
}

func fmtMiB(n int64) string {
	if n <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// parseList reads a comma-separated list with parse for each element.
func parseList[T any](s string, parse func(string) (T, error)) ([]T, error) {
	var out []T
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		v, err := parse(f)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty list %q", s)
	}
	return out, nil
}
