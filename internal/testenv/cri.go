package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// crictl, built once by `make crictl` into .cache/ (Debian has no package for it).
const (
	CrictlVersion = "v1.37.0"
	// CrictlEnv names the crictl binary; `make e2e` sets it. Without it, the tests look in
	// the repository's .cache/crictl-<version>/, where `make crictl` puts it.
	CrictlEnv = "CRICTL_BIN"
)

// CRI is a containerd with its CRI plugin on, in a private mount namespace: the scratch
// root's etc/containerd is mounted over /etc/containerd, so containerd reads the
// config.toml (and config_path's hosts.toml files) that `node-mirror install --root`
// wrote, and /run, /var/lib and /opt are directories below Dir, so its root, state and
// sockets (wherever its config puts them below those) stay there.
type CRI struct {
	Dir     string
	Address string // the gRPC socket as the host sees it

	t      testing.TB
	ctr    string
	crictl string
	conf   string // crictl's config
	d      *daemon
}

// StartCRI starts containerd (bin, with its ctr) with the config etcContainerd/config.toml
// and waits until its CRI image and runtime services answer crictl. The config must leave
// root, state and the gRPC address at containerd's defaults below /var/lib and /run.
func StartCRI(t testing.TB, bin, ctr, etcContainerd string) *CRI {
	t.Helper()
	requireRoot(t, "containerd's CRI")
	crictl := CrictlBin(t)
	dir := shortTempDir(t, "cri-")
	for _, d := range []string{"run", "varlib", "opt"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ns := NewMountNS(t,
		Mount{Source: etcContainerd, Target: "/etc/containerd"},
		Mount{Source: filepath.Join(dir, "run"), Target: "/run"},
		Mount{Source: filepath.Join(dir, "varlib"), Target: "/var/lib"},
		Mount{Source: filepath.Join(dir, "opt"), Target: "/opt"},
	)
	c := &CRI{
		Dir: dir, Address: filepath.Join(dir, "run", "containerd", "containerd.sock"),
		t: t, ctr: ctr, crictl: crictl, conf: filepath.Join(dir, "crictl.yaml"),
	}
	// crictl reads /etc/crictl.yaml unless told otherwise: its own config, so the host's
	// says nothing.
	conf := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 120\n", c.Address, c.Address)
	if err := os.WriteFile(c.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := ns.Command(context.Background(), bin, "--config", "/etc/containerd/config.toml", "--log-level", "warn")
	c.d = startDaemon(t, bin, cmd)
	c.d.waitReady(func() error {
		if _, err := os.Stat(c.Address); err != nil {
			return err
		}
		out, err := c.Crictl("version")
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	})
	return c
}

// CrictlBin is crictl from $CRICTL_BIN or the repository's .cache; the test fails, with
// the command that builds it, when it is missing.
func CrictlBin(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv(CrictlEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("%s=%s: %v (build it with `make crictl`)", CrictlEnv, bin, err)
		}
		return bin
	}
	root, err := repoRoot()
	if err != nil {
		t.Fatalf("crictl: %v; set %s", err, CrictlEnv)
	}
	bin := filepath.Join(root, ".cache", "crictl-"+CrictlVersion, "crictl")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("crictl is missing (%v): build it with `make crictl` (GOBIN=%s go install sigs.k8s.io/cri-tools/cmd/crictl@%s)",
			err, filepath.Dir(bin), CrictlVersion)
	}
	return bin
}

// repoRoot is the directory above the working directory that holds go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Crictl runs crictl against this containerd's CRI and returns its combined output. It
// gives up after five minutes.
func (c *CRI) Crictl(args ...string) (string, error) {
	return runTool(c.crictl, append([]string{"--config", c.conf}, args...))
}

// MustCrictl is Crictl that fails the test on an error.
func (c *CRI) MustCrictl(args ...string) string {
	c.t.Helper()
	out, err := c.Crictl(args...)
	if err != nil {
		c.t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// Content is the set of blob digests in the content store of CRI's namespace, k8s.io.
func (c *CRI) Content() map[string]bool {
	c.t.Helper()
	out, err := runTool(c.ctr, []string{"--address", c.Address, "--namespace", "k8s.io", "content", "ls", "--quiet"})
	if err != nil {
		c.t.Fatalf("%v\n%s", err, out)
	}
	have := map[string]bool{}
	for _, l := range strings.Fields(out) {
		have[l] = true
	}
	return have
}

// runTool runs a client tool on the host, with five minutes at most, and returns its
// output: stdout alone when it succeeds (tools warn on stderr, which would spoil parsing),
// stdout and stderr when it fails.
func runTool(bin string, args []string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String() + stderr.String(), fmt.Errorf("%s %s: %w", filepath.Base(bin), strings.Join(args, " "), err)
	}
	return stdout.String(), nil
}
