package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Debian's containerd 1.6 and its ctr.
const (
	ContainerdBin = "/usr/bin/containerd"
	CtrBin        = "/usr/bin/ctr"
)

// Containerd is a containerd daemon of the test's own: its own root, state, sockets and
// config, the CRI plugin and the snapshotters that need host support disabled, so it
// touches nothing of the host's containerd. `ctr content fetch` needs only the content
// store and the metadata plugins.
type Containerd struct {
	Dir       string // root, state, config and sockets live below it
	Address   string // gRPC socket
	Namespace string // the containerd namespace ctr uses

	t    testing.TB
	ctr  string
	cmd  *exec.Cmd
	done chan struct{}
}

// Containerd2Env names the directory holding containerd 2.x's containerd and ctr, which
// `make containerd2` builds from containerd's Go module (Debian ships only 1.6).
const Containerd2Env = "CONTAINERD2_DIR"

// StartContainerd starts containerd and waits until ctr can talk to it. It is stopped and
// its files removed when the test ends. The test fails, with the command that installs
// them, when containerd or ctr are missing; it needs root.
func StartContainerd(t testing.TB) *Containerd {
	t.Helper()
	bin, ctr := Containerd16Bins(t)
	return startContainerd(t, bin, ctr, "")
}

// Containerd16Bins are Debian's containerd and ctr; the test fails, with the command that
// installs them, when they are missing.
func Containerd16Bins(t testing.TB) (containerd, ctr string) {
	t.Helper()
	for _, bin := range []string{ContainerdBin, CtrBin} {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("%s is missing (%v): install Debian's containerd with `apt-get install -y containerd`", bin, err)
		}
	}
	return ContainerdBin, CtrBin
}

// StartContainerd2 is StartContainerd with containerd 2.x from $CONTAINERD2_DIR: the
// version new nodes run, whose transfer service reads the hosts dir inside the daemon.
func StartContainerd2(t testing.TB) *Containerd {
	t.Helper()
	bin, ctr := Containerd2Bins(t)
	// The transfer service unpacks only where configured; the native snapshotter needs no
	// kernel support, so pulls unpack here as they would on a node.
	return startContainerd(t, bin, ctr, `
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "native"
`)
}

// Containerd2Bins are containerd 2.x's containerd and ctr from $CONTAINERD2_DIR; the test
// fails, with the command that builds them, when they are missing.
func Containerd2Bins(t testing.TB) (containerd, ctr string) {
	t.Helper()
	dir := os.Getenv(Containerd2Env)
	if dir == "" {
		t.Fatalf("%s is not set: run the real-engine tests with `make e2e`, which builds containerd 2.x (`make containerd2`)", Containerd2Env)
	}
	bin, ctr := filepath.Join(dir, "containerd"), filepath.Join(dir, "ctr")
	for _, b := range []string{bin, ctr} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("%s is missing (%v): run `make containerd2`", b, err)
		}
	}
	return bin, ctr
}

func startContainerd(t testing.TB, bin, ctr, extra string) *Containerd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("containerd needs root; run the real-engine tests as root (uid is %d)", os.Geteuid())
	}
	// Below /tmp and not t.TempDir(): a unix socket path must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"root", "state", "opt"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(dir, "containerd.sock")
	conf := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc", filepath.Join(dir, "opt")) + extra
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}

	c := &Containerd{Dir: dir, Address: sock, Namespace: "node-mirror-test", t: t, ctr: ctr, done: make(chan struct{})}
	log := &lineLogger{t: t, prefix: "containerd: "}
	c.cmd = exec.Command(bin, "--config", cfg, "--log-level", "warn")
	c.cmd.Stdout = log
	c.cmd.Stderr = log
	c.cmd.WaitDelay = 5 * time.Second
	// Its own process group, so a terminal's Ctrl-C reaches the test, which stops it.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start containerd: %v", err)
	}
	go func() {
		c.cmd.Wait()
		log.flush()
		close(c.done)
	}()
	t.Cleanup(c.stop)

	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := c.Ctr("version")
		if err == nil {
			break
		}
		select {
		case <-c.done:
			t.Fatalf("containerd exited before it was ready: %v", c.cmd.ProcessState)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer on %s within 30s: %v\n%s", sock, err, out)
		}
	}
	return c
}

func (c *Containerd) stop() {
	select {
	case <-c.done:
		return
	default:
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(15 * time.Second):
		c.cmd.Process.Kill()
		<-c.done
	}
}

// Ctr runs ctr against this containerd, in its namespace, and returns the combined output.
// It gives up after five minutes.
func (c *Containerd) Ctr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	full := append([]string{"--address", c.Address, "--namespace", c.Namespace}, args...)
	cmd := exec.CommandContext(ctx, c.ctr, full...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("ctr %s: %w", strings.Join(args, " "), err)
	}
	return out.String(), err
}

// MustCtr is Ctr that fails the test (from the test's goroutine only) on an error.
func (c *Containerd) MustCtr(args ...string) string {
	c.t.Helper()
	out, err := c.Ctr(args...)
	if err != nil {
		c.t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// Fetch runs `ctr content fetch --hosts-dir hostsDir [flags...] ref`: the client side of a
// pull, resolving and downloading through the hosts in hostsDir into containerd's content
// store.
func (c *Containerd) Fetch(hostsDir, ref string, flags ...string) (string, error) {
	args := append([]string{"content", "fetch", "--hosts-dir", hostsDir}, flags...)
	return c.Ctr(append(args, ref)...)
}

// Content is the set of blob digests in containerd's content store.
func (c *Containerd) Content() map[string]bool {
	c.t.Helper()
	out := c.MustCtr("content", "ls", "--quiet")
	have := map[string]bool{}
	for _, l := range strings.Fields(out) {
		have[l] = true
	}
	return have
}

// RemoveContent deletes digests from containerd's content store, so the next fetch really
// downloads them again.
func (c *Containerd) RemoveContent(digests ...string) {
	c.t.Helper()
	if len(digests) == 0 {
		return
	}
	c.MustCtr(append([]string{"content", "rm"}, digests...)...)
}
