package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// NsenterBin enters a mount namespace; MountBin makes the mounts in it (util-linux, which
// every Debian system has).
const (
	NsenterBin = "/usr/bin/nsenter"
	MountBin   = "/usr/bin/mount"
)

// Mount is one mount of a MountNS: Source bind-mounted over Target, a directory over a
// directory or a file over a file (/etc/hosts). Target must exist on the host; the mount
// is seen only inside the namespace.
type Mount struct {
	Source, Target string
}

// MountNS is a private mount namespace of the test's own, held open by a process that
// only waits. Engines run inside it with the scratch root's files mounted over the host's
// /etc/<engine> and private directories over /run and /var/lib, so they read what
// `node-mirror install --root` wrote and write nothing of the host's. Mounts are private:
// nothing propagates to the host, and they vanish with the last process in the namespace,
// which the test's cleanup kills.
type MountNS struct {
	t      testing.TB
	holder *exec.Cmd
	done   chan struct{}
	id     string // the namespace's link, mnt:[inode]
}

// NewMountNS makes a mount namespace with mounts, in order. It needs root.
func NewMountNS(t testing.TB, mounts ...Mount) *MountNS {
	t.Helper()
	requireRoot(t, "a private mount namespace")
	for _, b := range []string{NsenterBin, MountBin} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("%s is missing (%v): install it with `apt-get install -y util-linux mount`", b, err)
		}
	}
	n := &MountNS{t: t, done: make(chan struct{})}
	// Go makes every mount private in a child that unshares CLONE_NEWNS, so nothing the
	// namespace mounts reaches the host. Pdeathsig ends the holder if the test dies.
	n.holder = exec.Command("sleep", "infinity")
	n.holder.SysProcAttr = &syscall.SysProcAttr{
		Unshareflags: syscall.CLONE_NEWNS,
		Setpgid:      true,
		Pdeathsig:    syscall.SIGKILL,
	}
	if err := n.holder.Start(); err != nil {
		t.Fatalf("start the mount namespace holder: %v", err)
	}
	go func() {
		n.holder.Wait()
		close(n.done)
	}()
	t.Cleanup(n.close)
	id, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", n.holder.Process.Pid))
	if err != nil {
		t.Fatalf("mount namespace of the holder: %v", err)
	}
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	if id == self {
		t.Fatalf("the holder shares the test's mount namespace %s", id)
	}
	n.id = id
	for _, m := range mounts {
		src, err := os.Stat(m.Source)
		if err != nil {
			t.Fatalf("mount source: %v", err)
		}
		if fi, err := os.Stat(m.Target); err != nil || fi.IsDir() != src.IsDir() {
			t.Fatalf("mount target %s must exist on the host and be a directory if and only if %s is: %v", m.Target, m.Source, err)
		}
		// --no-mtab: libmount would otherwise create /run/mount, on the host's /run until
		// a private one is mounted.
		if out, err := n.run(MountBin, "--no-mtab", "--bind", m.Source, m.Target); err != nil {
			t.Fatalf("bind %s over %s in the namespace: %v\n%s", m.Source, m.Target, err, out)
		}
	}
	return n
}

// Command is name with args to be run inside the namespace (nsenter execs it, so the
// process is the command itself). It runs in a process group of its own, so that stopping
// it never reaches the test, and it is killed if the test process dies without cleaning
// up (a -timeout panic): dockerd takes its containerd along, and the holder goes too.
func (n *MountNS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	full := append([]string{"--target", strconv.Itoa(n.holder.Process.Pid), "--mount", "--", name}, args...)
	cmd := exec.CommandContext(ctx, NsenterBin, full...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// A command that outlives its context is killed with its group, not only its pid.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	return cmd
}

// run runs a short command in the namespace and returns its combined output.
func (n *MountNS) run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := n.Command(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// Pids are the processes inside the namespace, the holder included.
func (n *MountNS) Pids() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		n.t.Errorf("listing processes: %v", err)
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if id, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "mnt")); err == nil && id == n.id {
			pids = append(pids, pid)
		}
	}
	return pids
}

// close kills every process still in the namespace (the engines' own cleanups ran first
// and stopped them gently), then the holder, so the namespace and its mounts are gone.
// The test fails if a process survives.
func (n *MountNS) close() {
	deadline := time.Now().Add(30 * time.Second)
	for {
		var left []string
		for _, pid := range n.Pids() {
			if pid == n.holder.Process.Pid {
				continue
			}
			left = append(left, procName(pid))
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			n.t.Errorf("processes left in mount namespace %s after SIGKILL: %s", n.id, strings.Join(left, ", "))
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	n.holder.Process.Kill()
	<-n.done
}

// procName is "pid (comm)", for messages.
func procName(pid int) string {
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return fmt.Sprintf("%d (%s)", pid, strings.TrimSpace(string(comm)))
}

// requireRoot fails the test unless it runs as root.
func requireRoot(t testing.TB, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("%s needs root; run the real-engine tests as root (uid is %d)", what, os.Geteuid())
	}
}
