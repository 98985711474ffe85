// Package e2e runs real container engines against the node-mirror binary.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// The helpers here are prefixed install*: other e2e files share this package. They can
// move onto internal/testenv once it offers the mirror process and containerd.

// TestInstallRealEngines writes engine config with `node-mirror install --root`, then has
// Debian's containerd 1.6 and skopeo pull through the mirror using exactly those files,
// and checks that `uninstall` leaves the tree as it was. There is no internet here, and
// the real registry in each file is docker.io's, so a pull that succeeds came through the
// mirror; the mirror's store is checked too.
func TestInstallRealEngines(t *testing.T) {
	bin := installNeed(t)
	tmp := t.TempDir()

	up := installUpstream(t)
	ctrImg := installPush(t, up, "library/hello:1")
	skopeoImg := installPush(t, up, "library/other:1")

	mirrorAddr := installFreeAddr(t)
	dataDir := filepath.Join(tmp, "data")
	installStart(t, "node-mirror", bin, "serve", "--listen", mirrorAddr, "--data-dir", dataDir,
		"--upstream", "docker.io="+up.URL, "--log-level", "warn")
	installWaitHTTP(t, "http://"+mirrorAddr+"/v2/")

	// A host as Debian ships it: containerd's config.toml and an empty registries.conf.d.
	root := filepath.Join(tmp, "root")
	installWrite(t, filepath.Join(root, "etc/containerd/config.toml"), debianContainerdConfig)
	if err := os.MkdirAll(filepath.Join(root, "etc/containers/registries.conf.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	before := installSnapshot(t, root)
	mirrorURL := "http://" + mirrorAddr
	out := installRun(t, bin, "install", "--root", root, "--mirror-url", mirrorURL, "--registries", "docker.io")
	t.Logf("install:\n%s", out)
	if !strings.Contains(installRun(t, bin, "install", "--root", root, "--mirror-url", mirrorURL, "--registries", "docker.io"), "nothing to change") {
		t.Error("a second install did not say it changed nothing")
	}

	// containerd 1.6, as its own daemon with its own root, state and socket.
	sock := installContainerd(t, tmp)
	hostsDir := filepath.Join(root, "etc/containerd/certs.d")
	fetch := exec.Command("ctr", "--address", sock, "--namespace", "e2e", "content", "fetch",
		"--hosts-dir", hostsDir, "docker.io/library/hello:1")
	if b, err := fetch.CombinedOutput(); err != nil {
		t.Fatalf("ctr content fetch through %s: %v\n%s", hostsDir, err, b)
	}
	installHaveBlobs(t, dataDir, ctrImg, "ctr content fetch")

	// skopeo reads the drop-in as its registries.conf: the mirror location carries the
	// registry as a path, /v2/docker.io/library/other/....
	dropIn := filepath.Join(root, "etc/containers/registries.conf.d/90-node-mirror.conf")
	policy := filepath.Join(tmp, "policy.json")
	installWrite(t, policy, `{"default": [{"type": "insecureAcceptAnything"}]}`)
	cp := exec.Command("skopeo", "--registries-conf", dropIn, "--policy", policy, "copy",
		"docker://docker.io/library/other:1", "oci:"+filepath.Join(tmp, "oci")+":other")
	if b, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("skopeo copy through %s: %v\n%s", dropIn, err, b)
	}
	installHaveBlobs(t, dataDir, skopeoImg, "skopeo copy")

	t.Logf("uninstall:\n%s", installRun(t, bin, "uninstall", "--root", root))
	after := installSnapshot(t, root)
	if a, b := strings.Join(before, "\n"), strings.Join(after, "\n"); a != b {
		t.Errorf("uninstall did not restore the tree.\nbefore:\n%s\nafter:\n%s", a, b)
	}
}

// Debian 12's /etc/containerd/config.toml, as the containerd package installs it.
const debianContainerdConfig = `version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
`

// installNeed fails loudly, with the command that fixes it, when a tool is missing.
func installNeed(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("NODE_MIRROR_BIN")
	if bin == "" {
		t.Fatal("NODE_MIRROR_BIN is not set: run these tests with `make e2e`, which builds the binary")
	}
	for tool, pkg := range map[string]string{"containerd": "containerd", "ctr": "containerd", "skopeo": "skopeo"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed: apt-get install -y %s", tool, pkg)
		}
	}
	if os.Geteuid() != 0 {
		t.Fatal("containerd needs root: run make e2e as root (as .ci/run does)")
	}
	return bin
}

func installUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return srv
}

// installPush pushes a random two-layer image and returns what a pull must fetch.
func installPush(t *testing.T, up *httptest.Server, repoTag string) []v1.Hash {
	t.Helper()
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(strings.TrimPrefix(up.URL, "http://")+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	out := []v1.Hash{d, m.Config.Digest}
	for _, l := range m.Layers {
		out = append(out, l.Digest)
	}
	return out
}

// installHaveBlobs checks the mirror's content store holds every digest: the pull went
// through the mirror.
func installHaveBlobs(t *testing.T, dataDir string, digests []v1.Hash, who string) {
	t.Helper()
	for _, d := range digests {
		p := filepath.Join(dataDir, "content", "blobs", d.Algorithm, d.Hex)
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s: %s is not in the mirror's store, so the pull did not come through the mirror: %v", who, d, err)
		}
	}
}

func installFreeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// installStart runs a process for the rest of the test, with its output in the log.
func installStart(t *testing.T, label, bin string, args ...string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", label, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", label, out.String())
		}
	})
}

func installWaitHTTP(t *testing.T, url string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not answer within 15s", url)
}

// installContainerd starts Debian's containerd with its own root, state and socket; the CRI
// plugin is off because ctr talks to the content store directly.
func installContainerd(t *testing.T, tmp string) string {
	t.Helper()
	dir := filepath.Join(tmp, "containerd")
	sock := filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "config.toml")
	installWrite(t, cfg, fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, filepath.Join(dir, "opt")))
	installStart(t, "containerd", "containerd", "--config", cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		if err := exec.CommandContext(ctx, "ctr", "--address", sock, "version").Run(); err == nil {
			return sock
		}
		select {
		case <-ctx.Done():
			t.Fatalf("containerd did not come up on %s", sock)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func installRun(t *testing.T, bin string, args ...string) string {
	t.Helper()
	b, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("node-mirror %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	return string(b)
}

func installWrite(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// installSnapshot lists every path below root with its mode and content.
func installSnapshot(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s %v", strings.TrimPrefix(p, root), fi.Mode())
		if !d.IsDir() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" %q", b)
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
