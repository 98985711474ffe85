// Package e2e runs real container engines against the node-mirror binary.
package e2e

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestInstallRealEngines writes engine config with `node-mirror install --root`, then has
// Debian's containerd 1.6 and skopeo pull through the mirror using exactly those files,
// and checks that `uninstall` leaves the tree as it was. There is no internet here, and
// the real registry in each file is docker.io's, so a pull that succeeds came through the
// mirror; the mirror's store is checked too.
func TestInstallRealEngines(t *testing.T) {
	bin := testenv.Bin(t)
	tmp := t.TempDir()

	up := testenv.NewUpstream(t)
	ctrImg := up.PushRandomImage("library/hello", "1", 2, 4096)
	skopeoImg := up.PushRandomImage("library/other", "1", 2, 4096)
	m := testenv.StartMirror(t, testenv.MirrorOptions{Upstreams: []string{up.Flag("docker.io")}, LogLevel: "warn"})

	// A host as Debian ships it: containerd's config.toml and an empty registries.conf.d.
	root := filepath.Join(tmp, "root")
	// Debian 12's config.toml as the package installs it, the fixture pkg/hosts tests too.
	debian, err := os.ReadFile("../../pkg/hosts/testdata/in/debian-containerd/etc/containerd/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	installWrite(t, filepath.Join(root, "etc/containerd/config.toml"), string(debian))
	if err := os.MkdirAll(filepath.Join(root, "etc/containers/registries.conf.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	before := installSnapshot(t, root)
	out := installRun(t, bin, "install", "--root", root, "--mirror-url", m.URL, "--registries", "docker.io")
	t.Logf("install:\n%s", out)
	if !strings.Contains(installRun(t, bin, "install", "--root", root, "--mirror-url", m.URL, "--registries", "docker.io"), "nothing to change") {
		t.Error("a second install did not say it changed nothing")
	}

	// containerd 1.6, as its own daemon with its own root, state and socket.
	ctrd := testenv.StartContainerd(t)
	hostsDir := filepath.Join(root, "etc/containerd/certs.d")
	if b, err := ctrd.Fetch(hostsDir, "docker.io/library/hello:1"); err != nil {
		t.Fatalf("ctr content fetch through %s: %v\n%s", hostsDir, err, b)
	}
	installHaveBlobs(t, m.DataDir, ctrImg.Digests(), "ctr content fetch")

	// skopeo reads the drop-in as its registries.conf: the mirror location carries the
	// registry as a path, /v2/docker.io/library/other/....
	dropIn, err := os.ReadFile(filepath.Join(root, "etc/containers/registries.conf.d/90-node-mirror.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if b, err := testenv.Skopeo(t, string(dropIn), "copy",
		"docker://docker.io/library/other:1", "oci:"+filepath.Join(tmp, "oci")+":other"); err != nil {
		t.Fatalf("skopeo copy through the drop-in: %v\n%s", err, b)
	}
	installHaveBlobs(t, m.DataDir, skopeoImg.Digests(), "skopeo copy")

	t.Logf("uninstall:\n%s", installRun(t, bin, "uninstall", "--root", root))
	after := installSnapshot(t, root)
	if a, b := strings.Join(before, "\n"), strings.Join(after, "\n"); a != b {
		t.Errorf("uninstall did not restore the tree.\nbefore:\n%s\nafter:\n%s", a, b)
	}
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
