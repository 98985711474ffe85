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
	"fmt"
	"io"
	"net"
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

// freeAddr returns a loopback address nothing listens on (for the moment).
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
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

// signal sends sig to the node-mirror process.
func (d *daemon) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(d.pid, sig); err != nil {
		t.Fatal(err)
	}
}

// traced makes d.pid the child of cmd (strace), once it has one.
func (d *daemon) traced(t testing.TB) {
	t.Helper()
	p := fmt.Sprintf("/proc/%d/task/%d/children", d.pid, d.pid)
	for range 200 {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			if _, err := fmt.Sscan(f[0], &d.pid); err != nil {
				t.Fatal(err)
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: no child after 2 s", p)
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
