package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a server process the benchmark started. Every one is started in its own
// process group, dies with the benchmark (Pdeathsig), and is stopped by stopAll.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error

	stopOnce sync.Once
}

var (
	procsMu sync.Mutex
	procs   []*proc
)

// startProc runs argv with its output in logFile.
func startProc(name, logFile string, argv ...string) (*proc, error) {
	lf, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	procsMu.Lock()
	procs = append(procs, p)
	procsMu.Unlock()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended, with its log's tail for the error.
func (p *proc) exited() error {
	select {
	case <-p.done:
		b, _ := os.ReadFile(p.log)
		if len(b) > 2000 {
			b = b[len(b)-2000:]
		}
		return fmt.Errorf("%s exited (%v); log %s ends:\n%s", p.name, p.err, p.log, b)
	default:
		return nil
	}
}

// stop asks the process group to end (SIGTERM), then kills it after a grace period.
// Only the first call acts: once the group is gone its id may be another's.
func (p *proc) stop() {
	p.stopOnce.Do(p.stopGroup)
}

// close stops a process that a scenario started for itself and forgets it, so stopAll
// does not hold on to it.
func (p *proc) close() {
	procsMu.Lock()
	for i, q := range procs {
		if q == p {
			procs = append(procs[:i], procs[i+1:]...)
			break
		}
	}
	procsMu.Unlock()
	p.stop()
}

func (p *proc) stopGroup() {
	pgid := p.pid() // Setpgid: the group id is the leader's pid
	select {
	case <-p.done:
	default:
		syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
	}
	// Whatever is left in the group (nginx workers, a stuck child) goes now.
	syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
}

// stopAll stops every process started, newest first.
func stopAll() {
	procsMu.Lock()
	ps := procs
	procs = nil
	procsMu.Unlock()
	for i := len(ps) - 1; i >= 0; i-- {
		ps[i].stop()
	}
}

// freePort finds a loopback port nobody listens on. Another process could take it before
// the server binds it; on this benchmark's loopback that is not a practical risk.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// waitHTTP polls url until it answers with status want, or the process dies.
func waitHTTP(ctx context.Context, p *proc, url string, want int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cl := &http.Client{Timeout: 2 * time.Second}
	for {
		if err := p.exited(); err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := cl.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == want {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s did not answer %s with %d in time (last: %v)", p.name, url, want, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitSocket polls for a unix socket to accept connections.
func waitSocket(ctx context.Context, p *proc, path string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if err := p.exited(); err != nil {
			return err
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s: socket %s did not come up", p.name, path)
}

// procGroup is the processes that make up one server: the leader and its children
// (nginx's workers). CPU time and memory are summed over them.
func procGroup(pid int) []int {
	pids := []int{pid}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil || child == pid {
			continue
		}
		if st, err := readStat(child); err == nil && st.ppid == pid {
			pids = append(pids, child)
		}
	}
	return pids
}

type procStat struct {
	ppid   int
	utime  uint64 // clock ticks
	stime  uint64
	cutime uint64
	cstime uint64
}

// clockTicks is USER_HZ, which Linux fixes at 100 on every architecture Go runs on here.
const clockTicks = 100

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	return parseStat(string(b))
}

// parseStat reads /proc/<pid>/stat. The command name is in parentheses and may itself
// hold spaces and parentheses, so fields are counted from the last ')'.
func parseStat(s string) (procStat, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, errors.New("malformed /proc stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14..17.
	if len(f) < 15 {
		return procStat{}, errors.New("short /proc stat")
	}
	var st procStat
	var err error
	num := func(k int) uint64 {
		v, e := strconv.ParseUint(f[k-3], 10, 64)
		if e != nil && err == nil {
			err = e
		}
		return v
	}
	st.ppid = int(num(4))
	st.utime, st.stime, st.cutime, st.cstime = num(14), num(15), num(16), num(17)
	return st, err
}

// cpuSeconds is the user+system CPU time of a server (leader and children) so far.
func cpuSeconds(pid int) float64 {
	var ticks uint64
	for _, p := range procGroup(pid) {
		if st, err := readStat(p); err == nil {
			ticks += st.utime + st.stime
		}
	}
	return float64(ticks) / clockTicks
}

// resetPeakRSS clears VmHWM of a server's processes (Linux: write 5 to clear_refs), so the
// next peakRSS reports the peak of what runs in between.
func resetPeakRSS(pid int) error {
	for _, p := range procGroup(pid) {
		if err := os.WriteFile(filepath.Join("/proc", strconv.Itoa(p), "clear_refs"), []byte("5"), 0); err != nil {
			return err
		}
	}
	return nil
}

// peakRSS is the sum of VmHWM (peak resident set) over a server's processes, in bytes.
func peakRSS(pid int) int64 {
	var total int64
	for _, p := range procGroup(pid) {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p), "status"))
		if err != nil {
			continue
		}
		total += statusKB(string(b), "VmHWM") << 10
	}
	return total
}

func statusKB(status, key string) int64 {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}

// cpuTimes is the machine's CPU time so far, in clock ticks over all cores (/proc/stat).
type cpuTimes struct{ busy, total uint64 }

func readCPUTimes() cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return parseCPUTimes(line)
}

// parseCPUTimes reads the "cpu" line of /proc/stat: user nice system idle iowait irq
// softirq steal ...; idle and iowait are the time nobody could use.
func parseCPUTimes(line string) cpuTimes {
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return cpuTimes{}
	}
	var t cpuTimes
	for i, s := range f[1:] {
		if i >= 8 { // guest time is already counted in user
			break
		}
		v, _ := strconv.ParseUint(s, 10, 64)
		t.total += v
		if i != 3 && i != 4 {
			t.busy += v
		}
	}
	return t
}

// busySince is the share of CPU time in use between then and t, 0 to 1.
func (t cpuTimes) busySince(then cpuTimes) float64 {
	if t.total <= then.total {
		return 0
	}
	return float64(t.busy-then.busy) / float64(t.total-then.total)
}

// processCPU is the user+system CPU seconds of one process alone (not its children).
func processCPU(pid int) float64 {
	st, err := readStat(pid)
	if err != nil {
		return 0
	}
	return float64(st.utime+st.stime) / clockTicks
}

// cpuAccount splits the machine's CPU time over a stretch of a run: the daemons under
// test, the benchmark's own process (load, throttles, front), the upstream registry, and
// everything else on the machine.
type cpuAccount struct {
	daemons, bench, upstream, other float64 // CPU seconds
}

// cpuMeter takes the readings a cpuAccount is the difference of.
type cpuMeter struct {
	machine                  cpuTimes
	daemons, bench, upstream float64
	pids                     []int
	upstreamPID              int
}

func startCPUMeter(daemons []int, upstreamPID int) *cpuMeter {
	m := &cpuMeter{pids: daemons, upstreamPID: upstreamPID}
	m.machine, m.daemons, m.bench, m.upstream = m.read()
	return m
}

func (m *cpuMeter) read() (cpuTimes, float64, float64, float64) {
	var d float64
	for _, p := range m.pids {
		d += processCPU(p)
	}
	return readCPUTimes(), d, processCPU(os.Getpid()), processCPU(m.upstreamPID)
}

// stop is the account since the meter started.
func (m *cpuMeter) stop() cpuAccount {
	mach, d, b, u := m.read()
	a := cpuAccount{daemons: d - m.daemons, bench: b - m.bench, upstream: u - m.upstream}
	busy := float64(mach.busy-m.machine.busy) / clockTicks
	a.other = max(0, busy-a.daemons-a.bench-a.upstream)
	return a
}
