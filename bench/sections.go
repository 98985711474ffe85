package main

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"github.com/node-mirror/node-mirror/pkg/config"
)

// The daemon's shipped fetch defaults, which the report names and the sweep judges.
var (
	defaultFetchConcurrency = config.Default().Cache.FetchConcurrency
	defaultFetchChunkSize   = config.Default().Cache.FetchChunkSize.Bytes
)

// reportCold is the detail of scenarios 8 and 9: every contender's time, rate, upstream
// bytes and connections, and peak RSS.
func (b *bench) reportCold(w *strings.Builder) {
	type line struct{ label, prefix, key string }
	lines := []line{
		{"(a) direct: one stream from the upstream", "cold", coldDirect},
		{"(b) node-mirror, `--fetch-concurrency 1`", "cold", coldSingle},
		{fmt.Sprintf("(c) node-mirror as shipped (%d × %s)", defaultFetchConcurrency, fmtBytes(defaultFetchChunkSize)), "cold", coldNM},
		{"(d) reference", "cold", coldRef},
	}
	for _, e := range []struct{ prefix, label string }{{"ctrcold", "containerd " + toolVersion("containerd", "--version")}, {"ctrcold2", b.containerd2}} {
		lines = append(lines, line{"`ctr content fetch` (" + e.label + "), direct", e.prefix, direct},
			line{"`ctr content fetch` (" + e.label + ") through node-mirror", e.prefix, nodeMirror})
	}
	size := float64(b.o.coldSize)
	var rows []string
	for _, l := range lines {
		t := summarize(b.results[l.prefix+"_s"][l.key])
		if t.N == 0 {
			continue
		}
		get := func(metric string) string { return fmtSummary(summarize(b.results[l.prefix+"_"+metric][l.key])) }
		rows = append(rows, fmt.Sprintf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", l.label, fmtSummary(t), fmtNum(size/t.Median/1e6),
			get("bytes"), get("conns"), get("rss"), get("cpu"), get("clientcpu"), get("busy"), get("other")))
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(w, "\n## Cold fetch of one %s blob (scenarios 8 and 9)\n\n", fmtBytes(int64(b.o.coldSize)))
	fmt.Fprintf(w, "Throttle: +%v RTT, %g MB/s per connection, no shared cap. Every cache is new for its run; its CPU is over its whole life. Machine CPU busy is the share of all %d cores' time in use during the fetch, by anyone (the benchmark's throttle and front, the upstream, other work on the machine): near 100%%, the fetch waited for CPU rather than for the network. Others' CPU is what of that none of the run's processes (cache, containerd and ctr, upstream, the benchmark) used: other work on the machine.\n\n", b.o.rtt, b.o.bandwidth, runtime.NumCPU())
	fmt.Fprintf(w, "| contender | time, s | MB/s (median) | upstream bytes ÷ blob | upstream connections | cache's peak RSS, MiB | cache's CPU, s | containerd + ctr CPU, s | machine CPU busy, %% | others' CPU, s |\n")
	fmt.Fprintf(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range rows {
		fmt.Fprintln(w, r)
	}
	a, c := summarize(b.results["cold_s"][coldDirect]), summarize(b.results["cold_s"][coldNM])
	if a.N > 0 && c.N > 0 {
		fmt.Fprintf(w, "\n(c) is %s faster than (a).", fmtRatio(a.Median/c.Median))
	}
	for _, e := range []struct{ prefix, label string }{{"ctrcold", "containerd " + toolVersion("containerd", "--version")}, {"ctrcold2", b.containerd2}} {
		d, m := summarize(b.results[e.prefix+"_s"][direct]), summarize(b.results[e.prefix+"_s"][nodeMirror])
		if d.N > 0 && m.N > 0 {
			fmt.Fprintf(w, " %s pulls %s faster through node-mirror than directly.", e.label, fmtRatio(d.Median/m.Median))
		}
	}
	fmt.Fprintln(w)
}

// sweepVerdict says which points of the sweep are within tolerance of the fastest, and
// where the shipped defaults stand.
type sweepVerdict struct {
	fastest     string
	fastestS    float64
	near        []string // within tolerance of the fastest, fastest first
	defaultKey  string
	defaultS    float64 // NaN if the default point was not measured
	defaultNear bool
}

// judgeSweep reads the sweep's medians; tolerance is relative (0.05: within 5%).
func judgeSweep(times map[string]sample, defaultKey string, tolerance float64) (sweepVerdict, bool) {
	v := sweepVerdict{defaultKey: defaultKey, defaultS: math.NaN(), fastestS: math.Inf(1)}
	med := map[string]float64{}
	for k, s := range times {
		if len(s) == 0 {
			continue
		}
		med[k] = summarize(s).Median
		if med[k] < v.fastestS || med[k] == v.fastestS && k < v.fastest {
			v.fastest, v.fastestS = k, med[k]
		}
	}
	if len(med) == 0 {
		return v, false
	}
	for k, t := range med {
		if t <= v.fastestS*(1+tolerance) {
			v.near = append(v.near, k)
		}
	}
	sort.Slice(v.near, func(i, j int) bool {
		if med[v.near[i]] != med[v.near[j]] {
			return med[v.near[i]] < med[v.near[j]]
		}
		return v.near[i] < v.near[j]
	})
	if t, ok := med[defaultKey]; ok {
		v.defaultS = t
		v.defaultNear = t <= v.fastestS*(1+tolerance)
	}
	return v, true
}

// reportSweep is the chunk size × concurrency table of (c).
func (b *bench) reportSweep(w *strings.Builder) {
	times := map[string]sample{}
	for k, s := range b.results["sweep_s"] {
		times[k] = s
	}
	if len(times) == 0 {
		return
	}
	size := float64(b.o.coldSize)
	fmt.Fprintf(w, "\n## Sweep: chunk size × fetch concurrency (scenario 8c)\n\n")
	fmt.Fprintf(w, "Cold %s blob through a new node-mirror per run; cells are the median time in s, its rate in MB/s, and the highest peak RSS in MiB. Concurrency 1 is one plain stream whatever the chunk size, so it is measured once (it is (b) of scenario 8 when that ran).\n\n", fmtBytes(int64(b.o.coldSize)))
	fmt.Fprintf(w, "| chunk size |")
	for _, c := range b.o.sweepConc {
		fmt.Fprintf(w, " concurrency %d |", c)
	}
	fmt.Fprintf(w, "\n|---|")
	for range b.o.sweepConc {
		fmt.Fprintf(w, "---:|")
	}
	fmt.Fprintln(w)
	for i, chunk := range b.o.sweepChunks {
		fmt.Fprintf(w, "| %s |", fmtBytes(chunk))
		for _, c := range b.o.sweepConc {
			key := sweepKey(chunk, c)
			if c == 1 {
				if i > 0 {
					fmt.Fprintf(w, " ″ |")
					continue
				}
			}
			t := summarize(times[key])
			if t.N == 0 {
				fmt.Fprintf(w, " – |")
				continue
			}
			rss := summarize(b.results["sweep_rss"][key])
			mark := ""
			if chunk == defaultFetchChunkSize && c == defaultFetchConcurrency {
				mark = "**"
			}
			fmt.Fprintf(w, " %s%s s, %s MB/s, %s MiB%s |", mark, fmtSummary(t), fmtNum(size/t.Median/1e6), fmtNum(rss.Max), mark)
		}
		fmt.Fprintln(w)
	}
	bytes := summarize(flatten(b.results["sweep_bytes"]))
	fmt.Fprintf(w, "\nUpstream bytes ÷ blob over all points: %s. The shipped default is in bold.\n", fmtSummary(bytes))
	if v, ok := judgeSweep(times, sweepKey(defaultFetchChunkSize, defaultFetchConcurrency), 0.05); ok {
		fmt.Fprintf(w, "\nFastest point: %s (%s s). Within 5%% of it: %s. The default %s: %s s",
			v.fastest, fmtNum(v.fastestS), strings.Join(v.near, ", "), v.defaultKey, fmtNum(v.defaultS))
		if !math.IsNaN(v.defaultS) {
			fmt.Fprintf(w, " (%s the fastest)", fmtRatio(v.defaultS/v.fastestS))
		}
		fmt.Fprintln(w, ".")
	}
}

func flatten(m map[string]sample) sample {
	var out sample
	for _, s := range m {
		out = append(out, s...)
	}
	return out
}

// reportFleet is the detail of scenario 10.
func (b *bench) reportFleet(w *strings.Builder) {
	if len(b.results["fleet_s"]) == 0 {
		return
	}
	fmt.Fprintf(w, "\n## Fleet: every node pulls a fresh %s image at once (scenario 10)\n\n", fmtBytes(int64(b.o.fleetSize)))
	fmt.Fprintf(w, "Throttle: +%v RTT, %g MB/s per connection, %g MB/s over all connections (the uplink). Ratios are to the image's layer bytes. *Uplink done* is when all but the last MiB of the run's upstream bytes had passed the throttle (sampled every 50 ms): what the fleet takes beyond it is spreading the image among the nodes. CPU columns split the machine's CPU time during the run: the N daemons; the upstream registry with the benchmark's process (throttle, front, the N clients); and everything else on the machine.\n\n", b.o.rtt, b.o.bandwidth, b.o.uplink)
	fmt.Fprintf(w, "| nodes | mode | slowest node, s | fastest node, s | uplink done, s | upstream bytes ÷ image | peer bytes received ÷ image (all nodes) | peer bytes served per node ÷ image (medians of the least and the most serving node) | highest peak RSS, MiB | daemons' CPU, s | upstream + benchmark CPU, s | others' CPU, s | machine CPU busy, %% |\n")
	fmt.Fprintf(w, "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n")
	for _, n := range b.o.fleetNodes {
		for _, fleet := range []bool{true, false} {
			g := groupName(fleet, n)
			t := summarize(b.results["fleet_s"][g])
			if t.N == 0 {
				continue
			}
			mode, served := "islands", "–"
			if fleet {
				mode = "fleet"
				served = fmt.Sprintf("%s – %s", fmtShare(summarize(b.results["fleet_served_min"][g]).Median), fmtShare(summarize(b.results["fleet_served_max"][g]).Median))
			}
			get := func(metric string) string { return fmtSummary(summarize(b.results[metric][g])) }
			fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", n, mode, fmtSummary(t),
				get("fleet_fastest_s"), get("fleet_uplink_s"), get("fleet_bytes"), get("fleet_peer"), served,
				get("fleet_rss"), get("fleet_cpu_daemons"), get("fleet_cpu_bench"), get("fleet_cpu_other"), get("fleet_busy"))
		}
	}
	fmt.Fprintf(w, "\nThe ideal fleet time is 1/N of the islands' (each byte crosses the uplink once); with a fleet, the uplink's %g MB/s moves the image in %s s.\n",
		b.o.uplink, fmtNum(float64(b.o.fleetSize)/(b.o.uplink*1e6)))
}

// previousReport is the node-mirror figures of the report this run replaces, by measure.
type previousReport struct {
	generated string
	nm        map[string]float64 // measure title -> node-mirror median
}

var generatedRE = regexp.MustCompile(`Generated by .* on ([0-9-]+ [0-9:]+ [A-Z]+)`)

// parsePrevious reads the main table of an earlier BENCHMARKS.md.
func parsePrevious(md string) previousReport {
	p := previousReport{nm: map[string]float64{}}
	if m := generatedRE.FindStringSubmatch(md); m != nil {
		p.generated = m[1]
	}
	for _, line := range strings.Split(md, "\n") {
		if !strings.HasPrefix(line, "| ") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "| "), " | ")
		if len(cells) < 3 {
			continue
		}
		f := strings.Fields(cells[2])
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		if _, seen := p.nm[cells[1]]; !seen { // the main table comes first
			p.nm[cells[1]] = v
		}
	}
	return p
}

// loadPrevious reads the last committed version of the report at path (git's HEAD), or
// the file itself outside a git checkout, before this run overwrites it: a report that an
// earlier, uncommitted run left there is not the one to compare with.
func (b *bench) loadPrevious(path string) {
	md, err := exec.Command("git", "show", "HEAD:./"+filepath.ToSlash(path)).Output()
	if err != nil {
		if md, err = os.ReadFile(path); err != nil {
			return
		}
	}
	p := parsePrevious(string(md))
	if len(p.nm) > 0 {
		b.previous = &p
	}
}

// reportPrevious compares node-mirror's figures in the rows the previous report also had.
func (b *bench) reportPrevious(w *strings.Builder) {
	if b.previous == nil {
		return
	}
	var rows []string
	for _, r := range b.rows() {
		if r.nm != "" {
			continue
		}
		was, ok := b.previous.nm[r.title]
		s := summarize(b.results[r.metric][nodeMirror])
		if !ok || s.N == 0 {
			continue
		}
		change := "–"
		if was != 0 {
			change = fmt.Sprintf("%+.0f%%", (s.Median/was-1)*100)
		}
		rows = append(rows, fmt.Sprintf("| %s | %s | %s | %s | %s |", r.id, r.title, fmtNum(was), fmtNum(s.Median), change))
	}
	if len(rows) == 0 {
		return
	}
	when := b.previous.generated
	if when == "" {
		when = "an earlier run"
	}
	fmt.Fprintf(w, "\n## node-mirror against the previous report\n\n")
	fmt.Fprintf(w, "Medians of node-mirror in this run and in the last committed report (generated %s), for the measures both have. Both are single runs on a shared machine: read changes within the spreads above as noise.\n\n", when)
	fmt.Fprintf(w, "| # | measure | previous | now | change |\n|---|---|---:|---:|---:|\n")
	for _, r := range rows {
		fmt.Fprintln(w, r)
	}
}

// relPath is path relative to the working directory when it lies below it.
func relPath(path string) string {
	wd, err := os.Getwd()
	if err != nil {
		return path
	}
	if r, err := filepath.Rel(wd, path); err == nil && !strings.HasPrefix(r, "..") {
		return r
	}
	return path
}

// fmtShare is a ratio rounded to two decimals: shares of an image, where 1e-5 is 0.
func fmtShare(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(math.Round(v*100)/100, 'f', 2, 64)
}
