package main

import (
	_ "embed"
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// findings is the hand-written analysis (misses, causes, fixes) that goes into every report.
//
//go:embed findings.md
var findings string

// target says whether a row's figures meet the target.
type target struct {
	text string
	met  func(nm, ref, other summary) (bool, bool) // met, known
}

type rowSpec struct {
	id, title, metric string
	other             string // third column: nginx, direct or islands
	tgt               target
	// nm is the contender in the node-mirror column when it is not node-mirror as shipped
	// (one stream; a fleet), shown beside its figure.
	nm string
}

func (b *bench) rows() []rowSpec {
	fresh := b.o.freshness + time.Second
	rows := []rowSpec{
		{"1", "Warm blob throughput, MB/s", "blob_mbps", ceiling, target{"≥ 0.9× nginx", func(nm, _, ng summary) (bool, bool) {
			r := ratio(nm, ng)
			return r >= 0.9, !math.IsNaN(r)
		}}, ""},
		{"7", "Server CPU per GB served (scenario 1), CPU-s/GB", "blob_cpu", ceiling, target{"≤ 0.4× reference", func(nm, ref, _ summary) (bool, bool) {
			r := ratio(nm, ref)
			return r <= 0.4, !math.IsNaN(r)
		}}, ""},
		{"6", "Peak RSS during scenario 1, MiB", "blob_rss", ceiling, target{"node-mirror < 64 MiB", func(nm, _, _ summary) (bool, bool) {
			return nm.Max < 64, nm.N > 0
		}}, ""},
		{"2", "Warm manifest by digest, req/s", "digest_rps", ceiling, target{"≥ 2× reference", func(nm, ref, _ summary) (bool, bool) {
			r := ratio(nm, ref)
			return r >= 2, !math.IsNaN(r)
		}}, ""},
		{"3", "Manifest by tag, req/s", "tag_rps", "", target{"≥ 10× reference", func(nm, ref, _ summary) (bool, bool) {
			r := ratio(nm, ref)
			return r >= 10, !math.IsNaN(r)
		}}, ""},
		{"3b", "Tag moved upstream: seen after, s", "fresh_s", "", target{fmt.Sprintf("≤ %v window + 1 s", b.o.freshness), func(nm, _, _ summary) (bool, bool) {
			return nm.Max <= fresh.Seconds(), nm.N > 0
		}}, ""},
		{"4", fmt.Sprintf("Herd (%d clients, cold %s blob): upstream bytes ÷ blob size", b.o.herdClients, fmtBytes(int64(b.o.herdSize))), "herd_fetches", "", target{"node-mirror 1.0×", func(nm, _, _ summary) (bool, bool) {
			return nm.Max <= 1.01 && nm.Min >= 0.99, nm.N > 0
		}}, ""},
		{"4", "Herd: time until the last client is done, s", "herd_s", "", target{"–", nil}, ""},
		{"6", "Peak RSS during scenario 4, MiB", "herd_rss", "", target{"node-mirror < 64 MiB", func(nm, _, _ summary) (bool, bool) {
			return nm.Max < 64, nm.N > 0
		}}, ""},
		{"5", fmt.Sprintf("Cold %d-layer pull through containerd (%s), s", b.o.pullLayers, fmtBytes(int64(b.o.pullSize))), "pull_s", direct, target{"≤ direct (+0.1 s: ctr reports in 100 ms ticks)", func(nm, _, d summary) (bool, bool) {
			return nm.Median <= d.Median+0.1, nm.N > 0 && d.N > 0
		}}, ""},
	}
	cold := fmtBytes(int64(b.o.coldSize))
	rows = append(rows,
		rowSpec{"8", fmt.Sprintf("Cold %s blob, one client: time, s", cold), "cold_s", coldDirect, target{"≥ 3× faster than direct (one stream)", func(nm, _, d summary) (bool, bool) {
			return nm.Median*3 <= d.Median, nm.N > 0 && d.N > 0
		}}, ""},
		rowSpec{"8", "Cold blob, node-mirror with one stream (`--fetch-concurrency 1`): time, s", "cold_s", coldDirect, target{"–", nil}, coldSingle},
		rowSpec{"8", "Cold blob: upstream bytes ÷ blob size", "cold_bytes", coldDirect, target{"node-mirror ≤ 1.05×", func(nm, _, _ summary) (bool, bool) {
			return nm.Max <= 1.05, nm.N > 0
		}}, ""},
		rowSpec{"8", "Peak RSS during the cold fetch, MiB", "cold_rss", "", target{"node-mirror < 64 MiB", func(nm, _, _ summary) (bool, bool) {
			return nm.Max < 64, nm.N > 0
		}}, ""},
	)
	engines := []struct{ prefix, label string }{{"ctrcold", "containerd " + toolVersion("containerd", "--version")}, {"ctrcold2", b.containerd2}}
	for _, e := range engines {
		rows = append(rows,
			rowSpec{"9", fmt.Sprintf("Cold 1-layer %s pull, `ctr content fetch` (%s), s", cold, e.label), e.prefix + "_s", direct, target{"≥ 2.5× faster than direct", func(nm, _, d summary) (bool, bool) {
				return nm.Median*2.5 <= d.Median, nm.N > 0 && d.N > 0
			}}, ""},
			rowSpec{"9", fmt.Sprintf("Peak RSS during that pull (%s), MiB", e.label), e.prefix + "_rss", "", target{"node-mirror < 64 MiB", func(nm, _, _ summary) (bool, bool) {
				return nm.Max < 64, nm.N > 0
			}}, ""},
		)
	}
	for _, n := range b.o.fleetNodes {
		f, isl := groupName(true, n), groupName(false, n)
		rows = append(rows,
			rowSpec{"10", fmt.Sprintf("%d nodes pull a fresh %s image at once: upstream bytes ÷ image", n, fmtBytes(int64(b.o.fleetSize))), "fleet_bytes", isl,
				target{"fleet ≤ 1.1×", func(nm, _, _ summary) (bool, bool) { return nm.Max <= 1.1, nm.N > 0 }}, f},
			rowSpec{"10", fmt.Sprintf("%d nodes: time until the slowest node is done, s", n), "fleet_s", isl,
				target{"fleet ≤ 0.6× islands", func(nm, _, isl summary) (bool, bool) {
					r := ratio(nm, isl)
					return r <= 0.6, !math.IsNaN(r)
				}}, f},
			rowSpec{"10", fmt.Sprintf("%d nodes: highest peak RSS of a node, MiB", n), "fleet_rss", isl, target{"–", nil}, f},
		)
	}
	return rows
}

func (b *bench) report() string {
	var w strings.Builder
	o := b.o
	fmt.Fprintf(&w, "# Benchmarks\n\n")
	fmt.Fprintf(&w, "Generated by `make bench` (`go run ./bench`, see [bench/](../bench/)) on %s; the whole run took %v.\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), b.elapsed.Round(time.Second))
	fmt.Fprintf(&w, "Every contender ran in the same process run, interleaved (the order rotates each run), on loopback.\n")
	fmt.Fprintf(&w, "Cells are the median with the spread (min–max) over the runs; ratios are of medians.\n\n")
	fmt.Fprintf(&w, "Contenders: **node-mirror** (as shipped: default config, tag freshness %v, fetch concurrency %d, chunk size %s); the **reference**, Debian's `docker-registry` (distribution %s) in proxy mode (`proxy: remoteurl:`, access log off); **nginx** %s with sendfile, serving node-mirror's own blob files (the ceiling); **direct**: the client (containerd, or the benchmark's own for scenario 8) straight from the throttled upstream; **fleet** and **islands**: N node-mirror daemons with and without fleet mode behind one shared uplink.\n\n",
		o.freshness, defaultFetchConcurrency, fmtBytes(defaultFetchChunkSize), toolVersion("docker-registry", "--version"), toolVersion("nginx", "-v"))

	fmt.Fprintf(&w, "| # | measure | node-mirror | reference | nginx / direct / islands | node-mirror ÷ reference | node-mirror ÷ nginx / direct / islands | target | met |\n")
	fmt.Fprintf(&w, "|---|---|---:|---:|---:|---:|---:|---|---|\n")
	for _, r := range b.rows() {
		res := b.results[r.metric]
		nmKey := r.nm
		if nmKey == "" {
			nmKey = nodeMirror
		}
		if res == nil || len(res[nmKey]) == 0 {
			continue
		}
		nm, ref := summarize(res[nmKey]), summarize(res[reference])
		nmCell := fmtSummary(nm)
		if r.nm != "" {
			nmCell += " (" + r.nm + ")"
			ref = summary{} // the reference column is node-mirror as shipped's rival, not this one's
		}
		var other summary
		otherCell, otherRatio := "–", "–"
		if r.other != "" && len(res[r.other]) > 0 {
			other = summarize(res[r.other])
			otherCell = fmtSummary(other) + " (" + r.other + ")"
			otherRatio = fmtRatio(ratio(nm, other))
		}
		met := "–"
		if r.tgt.met != nil {
			if ok, known := r.tgt.met(nm, ref, other); known {
				met = map[bool]string{true: "✅ yes", false: "❌ **no**"}[ok]
			}
		}
		refRatio := fmtRatio(ratio(nm, ref))
		if r.metric == "fresh_s" { // how soon the reference sees a moved tag says nothing of node-mirror
			refRatio = "–"
		}
		fmt.Fprintf(&w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.id, r.title, nmCell, fmtSummary(ref), otherCell,
			refRatio, otherRatio, r.tgt.text, met)
	}
	if len(b.notes) > 0 {
		fmt.Fprintf(&w, "\nNotes from this run:\n\n")
		for _, n := range b.notes {
			fmt.Fprintf(&w, "- %s\n", n)
		}
	}

	b.reportCold(&w)
	b.reportSweep(&w)
	b.reportFleet(&w)
	b.reportPrevious(&w)

	fmt.Fprintf(&w, "\n## Machine\n\n")
	for _, l := range machine(o) {
		fmt.Fprintf(&w, "- %s\n", l)
	}

	fmt.Fprintf(&w, "\n## How it is measured\n\n")
	fmt.Fprintf(&w, "- **Upstream**: a `docker-registry` process seeded with generated OCI images (random, incompressible layer bytes, pushed with go-containerregistry). Between each cache and the upstream sits the benchmark's throttling TCP proxy: +%v round trip (one extra round trip per new connection for the handshake, half the RTT added in each direction) and %g MB/s per connection and direction, like one TCP stream from an internet registry. It is switched off only while the hot image is put into the caches; it counts the bytes the upstream sends to each cache.\n", o.rtt, o.bandwidth)
	fmt.Fprintf(&w, "- **Load**: a Go HTTP/1.1 client in the same program with keep-alive connections, reading bodies through 1 MiB buffers. Client and servers share the %d cores, which is why scenario 7 (server CPU per GB, from utime+stime in `/proc/<pid>/stat`, nginx's workers included) is the figure to compare across machines.\n", runtime.NumCPU())
	fmt.Fprintf(&w, "- **1/7/6**: %d clients GET the same warm %s blob for %v per run, %d runs per contender. Peak RSS is VmHWM after resetting it (`clear_refs` 5) before each run; for nginx summed over master and workers.\n", o.blobClients, fmtBytes(int64(o.blobSize)), o.duration, o.repeat)
	fmt.Fprintf(&w, "- **2/3**: %d connections GET one manifest (by digest; by tag with the upstream behind the throttle, so each revalidation costs a round trip as it would against a real registry) for %v per run, %d runs. nginx's digest figure serves the same manifest file from node-mirror's store.\n", o.conns, o.duration, o.repeat)
	fmt.Fprintf(&w, "- **3b**: after both caches answered the tag, a new image is pushed to the same tag upstream; each cache is polled every 50 ms until it answers the new digest.\n")
	fmt.Fprintf(&w, "- **4**: %d clients, connected beforehand, GET the same cold %s blob at the same instant; a new blob each run. Upstream bytes are counted at the throttle.\n", o.herdClients, fmtBytes(int64(o.herdSize)))
	fmt.Fprintf(&w, "- **5**: `ctr content fetch --hosts-dir` on a private containerd %s (own root, state and socket) of a new %d-layer %s image each run, via each cache (as a `hosts.toml` mirror) and directly from the throttled upstream (as the `server`). %d runs.\n", toolVersion("containerd", "--version"), o.pullLayers, fmtBytes(int64(o.pullSize)), o.coldRepeat)
	fmt.Fprintf(&w, "- **8**: one client GETs the cold %s blob of a 1-layer image: (a) *direct*, one stream from the throttled upstream after the token dance its 401 asks for; (b) through node-mirror with `--fetch-concurrency 1`; (c) through node-mirror as shipped; (d) through the reference. Each cache run is a new daemon with an empty store, started for that run and removed after it (the image stays the same; the upstream serves it from its page cache either way). Upstream bytes and connections are counted at the throttle once it has been quiet for 0.5 s (the reference stores in the background). Peak RSS is the daemon's VmHWM over its whole life, start-up included. %d runs.\n", fmtBytes(int64(o.coldSize)), o.coldRepeat)
	fmt.Fprintf(&w, "- **9**: `ctr content fetch` of that image on a new containerd (own root) per run, through a new node-mirror or directly. %d runs.\n", o.coldRepeat)
	fmt.Fprintf(&w, "- **Sweep**: (c) again for every chunk size × concurrency (`--fetch-chunk-size`, `--fetch-concurrency`), %d run(s) per point, the points in a rotating order.\n", o.sweepRepeat)
	fmt.Fprintf(&w, "- **10**: N node-mirror daemons on loopback (own ports, data dirs and `--node-name`; the fleet with `--peer-listen`, `--gossip-listen`, one `--fleet-key-file`, joined through the first; the islands without fleet flags) reach the upstream through one throttle that also caps all its connections together at %g MB/s (the cluster's uplink), besides %g MB/s per connection. Before each fleet run every daemon's status lists all N members alive. Every node then pulls a fresh %d-layer %s image at the same instant (a Go client per node, connected beforehand: the manifest by tag, then config and layers at once), a new image each run; time is until the slowest node has its last byte. Afterwards every blob is read back from every fleet node and its digest checked. The N daemons share the machine's %d cores. %d runs per N and mode, fleet and islands alternating first.\n", o.uplink, o.bandwidth, o.fleetLayers, fmtBytes(int64(o.fleetSize)), runtime.NumCPU(), o.fleetRepeat)
	fmt.Fprintf(&w, "- **Token service**: the upstream's anonymous token endpoint is on the registry's own host:port (the benchmark's front, a reverse proxy in front of `docker-registry` that serves `/token` itself and points each challenge's realm at the address the client used). node-mirror refuses a plain-http realm on another loopback port than its endpoint's; Docker Hub's realm is on another host but over https, which loopback cannot imitate. The front costs every contender the same extra copy of the upstream's bytes.\n")
	fmt.Fprintf(&w, "- Rerun: `make bench` (about %d minutes here); `go run ./bench -h` lists the flags (sizes, runs, durations, latency, bandwidth, uplink, sweep points, fleet sizes, `-only`, `-quick`).\n", int(math.Ceil(b.elapsed.Minutes())))

	if len(b.profiles) > 0 {
		fmt.Fprintf(&w, "\n## Profiles of node-mirror\n\n")
		fmt.Fprintf(&w, "Hot scenarios: taken in an extra, unmeasured run of each through `--debug-listen` (pprof). Fleet: the first %v of every fleet run on node-1, during the measured run. `go tool pprof %s <file>` reads them. Files (not committed): ", b.o.fleetProfile, relPath(o.bin))
		var files []string
		for _, p := range b.profiles {
			files = append(files, "`"+p.cpuFile+"`")
			if p.heapFile != "" {
				files = append(files, "`"+p.heapFile+"`")
			}
		}
		fmt.Fprintf(&w, "%s, with `-top` summaries beside them as `.txt`.\n", strings.Join(files, ", "))
		for _, p := range b.profiles {
			if p.top == "" {
				continue
			}
			fmt.Fprintf(&w, "\n<details><summary>CPU, scenario %s: top functions</summary>\n\n```\n%s```\n</details>\n", p.scenario, headLines(p.top, 22))
		}
	}
	if f := strings.TrimSpace(findings); f != "" {
		fmt.Fprintf(&w, "\n%s\n", f)
	}
	return w.String()
}

func headLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	// Skip pprof's file/build header lines up to the "Showing" line.
	for i, l := range lines {
		if strings.HasPrefix(l, "Showing") {
			lines = lines[i:]
			break
		}
	}
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "")
}

func toolVersion(bin string, arg string) string {
	p, err := lookPath(bin)
	if err != nil {
		return "(not found)"
	}
	out, _ := exec.Command(p, arg).CombinedOutput()
	s := strings.TrimSpace(string(out))
	f := strings.Fields(s)
	switch bin {
	case "docker-registry": // docker-registry github.com/docker/distribution 2.8.2+ds1
		if len(f) >= 3 {
			return f[2]
		}
	case "nginx": // nginx version: nginx/1.22.1
		if i := strings.LastIndex(s, "/"); i >= 0 {
			return s[i+1:]
		}
	case "containerd": // containerd github.com/containerd/containerd 1.6.20~ds1 ...
		if len(f) >= 3 {
			return f[2]
		}
	}
	return s
}

func machine(o *options) []string {
	var l []string
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	l = append(l, fmt.Sprintf("CPU: %s, %d cores visible to Go (GOMAXPROCS %d)", cpu, runtime.NumCPU(), runtime.GOMAXPROCS(0)))
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		l = append(l, fmt.Sprintf("Memory: %.1f GiB", float64(statusKB(string(b), "MemTotal"))/(1<<20)))
	}
	osName := "Linux"
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
				osName = strings.Trim(v, `"`)
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	l = append(l, fmt.Sprintf("OS: %s, kernel %s", osName, strings.TrimSpace(string(kernel))))
	nmv, _ := exec.Command(o.bin, "version").CombinedOutput()
	if la, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(la))
		if len(f) >= 3 {
			l = append(l, fmt.Sprintf("Load average at the end of the run: %s %s %s (1/5/15 min; other work on the machine shows here and widens the spreads)", f[0], f[1], f[2]))
		}
	}
	rev, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		rev = []byte("unknown")
	}
	l = append(l, fmt.Sprintf("node-mirror: version %q built from commit %s; bench built with %s", strings.TrimSpace(string(nmv)), strings.TrimSpace(string(rev)), runtime.Version()))
	l = append(l, fmt.Sprintf("docker-registry %s, nginx %s, containerd %s (Debian packages)",
		toolVersion("docker-registry", "--version"), toolVersion("nginx", "-v"), toolVersion("containerd", "--version")))
	return l
}
