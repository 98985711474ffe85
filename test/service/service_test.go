// Package service tests what runs node-mirror as a node service: `make install`, the
// systemd unit's sandbox against what the daemon really does, and the Kubernetes
// DaemonSet example. `make service-check` runs it (and `make test` runs that); it is
// outside `make unit` because it builds and runs the binary and needs strace.
//
// NODE_MIRROR_BIN names the binary to test; without it the tests build one.
package service

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var nodeMirrorBin string

// repoRoot is the repository, two levels above this package.
func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test source")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if b := os.Getenv("NODE_MIRROR_BIN"); b != "" {
		nodeMirrorBin = b
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "node-mirror-service-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	nodeMirrorBin = filepath.Join(dir, "node-mirror")
	_, file, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", "build", "-o", nodeMirrorBin, "./cmd/node-mirror")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building node-mirror:", err)
		return 1
	}
	return m.Run()
}

// needTool fails (never skips) when a tool the test needs is missing, saying how to get it.
func needTool(t testing.TB, tool, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s not found: apt-get install %s", tool, pkg)
	}
	return p
}

// daemon is a node-mirror process whose output is kept and searchable.
type daemon struct {
	cmd  *exec.Cmd
	pid  int // the node-mirror process: cmd's, or its child's when cmd is strace
	mu   sync.Mutex
	out  strings.Builder
	done chan struct{}
	err  error
}

func startDaemon(t testing.TB, cmd *exec.Cmd) *daemon {
	t.Helper()
	d := &daemon{cmd: cmd, done: make(chan struct{})}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	// Its own process group, so cleanup reaches a traced child too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.pid = cmd.Process.Pid
	go func() {
		s := bufio.NewScanner(pr)
		for s.Scan() {
			d.mu.Lock()
			d.out.WriteString(s.Text() + "\n")
			d.mu.Unlock()
		}
	}()
	go func() {
		d.err = cmd.Wait()
		pw.Close()
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-d.done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(cmd.Path), d.output())
		}
	})
	return d
}

func (d *daemon) output() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.out.String()
}

// waitLog waits until the daemon's output contains s.
func (d *daemon) waitLog(t testing.TB, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(d.output(), s) {
		select {
		case <-d.done:
			t.Fatalf("daemon exited (%v) before logging %q", d.err, s)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not log %q within %s", s, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readyAddr waits until the daemon, started with --listen on port 0 and --ready-file
// file, has written the address it bound there, and returns it.
func (d *daemon) readyAddr(t testing.TB, file string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if b, err := os.ReadFile(file); err == nil {
			return strings.TrimSpace(string(b))
		}
		select {
		case <-d.done:
			t.Fatalf("daemon exited (%v) before writing its --ready-file", d.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not write its --ready-file within %s", timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// loggedAddr waits until the daemon, logging JSON, has logged msg, and returns the line's
// "listen" attribute: where a side listener (--metrics-listen) bound port 0.
func (d *daemon) loggedAddr(t testing.TB, msg string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, line := range strings.Split(d.output(), "\n") {
			var rec struct{ Msg, Listen string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == msg && rec.Listen != "" {
				return rec.Listen
			}
		}
		select {
		case <-d.done:
			t.Fatalf("daemon exited (%v) before logging %q", d.err, msg)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not log %q with a listen address within %s", msg, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// signal sends sig to the node-mirror process.
func (d *daemon) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(d.pid, sig); err != nil {
		t.Fatal(err)
	}
}

// traced makes d.pid the child of cmd (strace) that runs bin, once it has one. strace
// forks a short-lived helper before the tracee, and the tracee runs strace's own image
// until its exec: the first child seen need not be the daemon.
func (d *daemon) traced(t testing.TB, bin string) {
	t.Helper()
	want, err := filepath.EvalSymlinks(bin)
	if err != nil {
		t.Fatal(err)
	}
	p := fmt.Sprintf("/proc/%d/task/%d/children", d.pid, d.pid)
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("%v (did strace exit?)", err)
		}
		for _, f := range strings.Fields(string(b)) {
			if exe, err := os.Readlink("/proc/" + f + "/exe"); err == nil && exe == want {
				if _, err := fmt.Sscan(f, &d.pid); err != nil {
					t.Fatal(err)
				}
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no child running %s within 30 s (children: %q)", p, want, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stop sends SIGTERM (as systemd does) and waits for a clean exit.
func (d *daemon) stop(t testing.TB) {
	t.Helper()
	d.signal(t, syscall.SIGTERM)
	select {
	case <-d.done:
		if d.err != nil {
			t.Fatalf("daemon exited with %v after SIGTERM", d.err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("daemon did not stop within 40 s of SIGTERM")
	}
}

// waitStatus polls url until it answers want.
func waitStatus(t testing.TB, url string, want int, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last string
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == want {
				return
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("GET %s: want %d within %s, last answer: %s", url, want, timeout, last)
}
