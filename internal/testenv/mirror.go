package testenv

import (
	"bytes"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BinEnv names the environment variable holding the node-mirror binary the tests run;
// `make e2e` and `make conformance` build the binary and set it.
const BinEnv = "NODE_MIRROR_BIN"

// MirrorOptions configures StartMirror.
type MirrorOptions struct {
	// Upstreams are --upstream values, NAME=URL (Upstream.Flag makes one).
	Upstreams []string
	// DataDir is the cache; empty means a fresh t.TempDir(). Reuse one to restart a mirror
	// on its cache.
	DataDir string
	// LogLevel is --log-level; empty means info.
	LogLevel string
	// Args are more flags for `serve`.
	Args []string
}

// Mirror is a running `node-mirror serve` process.
type Mirror struct {
	Addr    string // host:port on loopback
	URL     string // http://Addr
	DataDir string

	t    testing.TB
	cmd  *exec.Cmd
	done chan struct{}
	log  *lineLogger

	mu     sync.Mutex
	killed bool
}

// Bin is the node-mirror binary under test; the test fails when it is not set.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(BinEnv)
	if bin == "" {
		t.Fatalf("%s is not set: run these tests with `make e2e` or `make conformance`, which build the daemon and set it", BinEnv)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s=%s: %v (run make e2e)", BinEnv, bin, err)
	}
	return bin
}

// StartMirror runs node-mirror serve on a free loopback port and returns once GET /v2/
// answers 200. Its output goes to the test log. At the end of the test it is stopped with
// SIGTERM, and the test fails if it does not exit cleanly (a race build exits non-zero when
// it found a race).
func StartMirror(t testing.TB, opts MirrorOptions) *Mirror {
	t.Helper()
	bin := Bin(t)
	if opts.DataDir == "" {
		opts.DataDir = t.TempDir()
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "info"
	}
	// A port from FreeAddr can be taken by someone else before the daemon binds it; try
	// again with another one when that is what happened.
	for attempt := 0; ; attempt++ {
		m, retry := startMirror(t, bin, opts)
		if m != nil {
			return m
		}
		if !retry || attempt == 2 {
			t.Fatal("node-mirror did not start; its output is above")
		}
	}
}

func startMirror(t testing.TB, bin string, opts MirrorOptions) (m *Mirror, retry bool) {
	t.Helper()
	addr := FreeAddr(t)
	args := []string{"serve", "--listen", addr, "--data-dir", opts.DataDir, "--log-level", opts.LogLevel}
	for _, u := range opts.Upstreams {
		args = append(args, "--upstream", u)
	}
	args = append(args, opts.Args...)
	m = &Mirror{
		Addr: addr, URL: "http://" + addr, DataDir: opts.DataDir,
		t: t, done: make(chan struct{}),
		log: &lineLogger{t: t, prefix: "node-mirror " + addr + ": "},
	}
	m.cmd = exec.Command(bin, args...)
	m.cmd.Stdout = m.log
	m.cmd.Stderr = m.log
	m.cmd.WaitDelay = 5 * time.Second
	t.Logf("starting %s %s", bin, strings.Join(args, " "))
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("start node-mirror: %v", err)
	}
	go func() {
		m.cmd.Wait()
		m.log.flush()
		close(m.done)
	}()

	deadline := time.Now().Add(60 * time.Second) // a race build on a busy machine is slow to start
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := client.Get(m.URL + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-m.done:
			t.Logf("node-mirror exited before it answered GET /v2/: %v", m.cmd.ProcessState)
			return nil, m.log.contains("address already in use")
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			m.cmd.Process.Kill()
			<-m.done
			t.Fatalf("node-mirror on %s did not answer GET /v2/ with 200 within a minute (last: %v)", addr, err)
		}
	}
	t.Cleanup(m.Stop)
	return m, false
}

// Stop sends SIGTERM and waits for the process to exit; the test fails if it exits with an
// error. Stopping a stopped mirror does nothing.
func (m *Mirror) Stop() {
	select {
	case <-m.done:
		return
	default:
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		m.t.Errorf("node-mirror on %s did not exit within 30s of SIGTERM; killing it", m.Addr)
		m.cmd.Process.Kill()
		<-m.done
		return
	}
	m.mu.Lock()
	killed := m.killed
	m.mu.Unlock()
	if st := m.cmd.ProcessState; !killed && !st.Success() {
		m.t.Errorf("node-mirror on %s exited with %v after SIGTERM, want a clean exit", m.Addr, st)
	}
}

// Kill ends the process with SIGKILL, as a crash or the OOM killer would, and waits for it.
func (m *Mirror) Kill() {
	m.mu.Lock()
	m.killed = true
	m.mu.Unlock()
	m.cmd.Process.Kill()
	<-m.done
}

// PID is the daemon's process id.
func (m *Mirror) PID() int { return m.cmd.Process.Pid }

// Signal sends sig to the process (SIGHUP reloads its config).
func (m *Mirror) Signal(sig os.Signal) error { return m.cmd.Process.Signal(sig) }

// Exited reports whether the process has ended.
func (m *Mirror) Exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// FreeAddr is a loopback host:port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// lineLogger writes a process's output to the test log a line at a time.
type lineLogger struct {
	t      testing.TB
	prefix string

	mu   sync.Mutex
	buf  []byte
	seen bytes.Buffer // the first 64 KiB, for contains
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen.Len() < 1<<16 {
		l.seen.Write(p)
	}
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.t.Log(l.prefix + string(l.buf[:i]))
		l.buf = l.buf[i+1:]
	}
	return len(p), nil
}

// flush logs a last line that did not end in a newline.
func (l *lineLogger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.buf) > 0 {
		l.t.Log(l.prefix + string(l.buf))
		l.buf = nil
	}
}

func (l *lineLogger) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Contains(l.seen.Bytes(), []byte(s))
}
