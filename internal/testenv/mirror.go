package testenv

import (
	"bytes"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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

// StartMirror runs node-mirror serve on loopback port 0 and returns once it has written
// the address it bound to its --ready-file and GET /v2/ answers 200 there: no port is
// picked in advance, so none can be taken by someone else first. Its output goes to the
// test log. At the end of the test it is stopped with SIGTERM, and the test fails if it
// does not exit cleanly (a race build exits non-zero when it found a race).
func StartMirror(t testing.TB, opts MirrorOptions) *Mirror {
	t.Helper()
	bin := Bin(t)
	if opts.DataDir == "" {
		opts.DataDir = t.TempDir()
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "info"
	}
	ready := filepath.Join(t.TempDir(), "ready")
	args := []string{"serve", "--listen", "127.0.0.1:0", "--ready-file", ready, "--data-dir", opts.DataDir, "--log-level", opts.LogLevel}
	for _, u := range opts.Upstreams {
		args = append(args, "--upstream", u)
	}
	args = append(args, opts.Args...)
	m := &Mirror{
		DataDir: opts.DataDir, t: t, done: make(chan struct{}),
		log: &lineLogger{t: t, prefix: "node-mirror: "},
	}
	m.cmd = exec.Command(bin, args...)
	// A test binary killed by -timeout must not leave daemons behind.
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
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
	for {
		if b, err := os.ReadFile(ready); err == nil {
			m.Addr = strings.TrimSpace(string(b))
			break
		}
		select {
		case <-m.done:
			t.Fatalf("node-mirror exited before it was ready (%v); its output is above", m.cmd.ProcessState)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			m.cmd.Process.Kill()
			<-m.done
			t.Fatal("node-mirror did not write its --ready-file within a minute; its output is above")
		}
	}
	m.URL = "http://" + m.Addr
	m.log.setPrefix("node-mirror " + m.Addr + ": ")
	t.Cleanup(m.Stop)
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Get(m.URL + "/v2/")
	if err != nil {
		t.Fatalf("node-mirror said it serves on %s, but: %v", m.Addr, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("node-mirror on %s: GET /v2/ answered %s", m.Addr, resp.Status)
	}
	return m
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

// lineLogger writes a process's output to the test log a line at a time.
type lineLogger struct {
	t      testing.TB
	prefix string

	mu  sync.Mutex
	buf []byte
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
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

func (l *lineLogger) setPrefix(p string) {
	l.mu.Lock()
	l.prefix = p
	l.mu.Unlock()
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
