package testenv

import (
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// daemon is a long-running engine process of a test: its output goes to the test log, and
// it is stopped when the test ends.
type daemon struct {
	t    testing.TB
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

// startDaemon starts cmd, which must run in a process group of its own (MountNS.Command
// makes it so), and stops it at the end of the test: SIGTERM, then SIGKILL to its group.
func startDaemon(t testing.TB, name string, cmd *exec.Cmd) *daemon {
	t.Helper()
	log := &lineLogger{t: t, prefix: name + ": "}
	cmd.Stdout, cmd.Stderr = log, log
	d := &daemon{t: t, name: name, cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		cmd.Wait()
		log.flush()
		close(d.done)
	}()
	t.Cleanup(d.stop)
	return d
}

// exited reports whether the process has ended.
func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// waitReady polls ready every 100 ms for up to a minute; the test fails if the daemon
// exits or does not get ready.
func (d *daemon) waitReady(ready func() error) {
	d.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		err := ready()
		if err == nil {
			return
		}
		if d.exited() {
			d.t.Fatalf("%s exited before it was ready (%v): %v", d.name, d.cmd.ProcessState, err)
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("%s was not ready within a minute: %v", d.name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// signal sends sig to the daemon itself.
func (d *daemon) signal(sig syscall.Signal) error { return d.cmd.Process.Signal(sig) }

func (d *daemon) stop() {
	if d.exited() {
		return
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		d.t.Logf("%s did not exit within 30s of SIGTERM; killing its process group", d.name)
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		<-d.done
	}
}
