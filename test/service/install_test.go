package service

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/node-mirror/node-mirror/pkg/hosts"
)

func makeInstall(t *testing.T, destdir string, vars ...string) string {
	t.Helper()
	needTool(t, "make", "make")
	args := append([]string{"--no-print-directory", "-C", repoRoot(t), "install", "DESTDIR=" + destdir}, vars...)
	out, err := exec.Command("make", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// `make install DESTDIR=… PREFIX=/usr` puts binary, unit and config where docs/service.md
// says, with the unit's paths following PREFIX, and never overwrites an existing config.
func TestMakeInstall(t *testing.T) {
	root := repoRoot(t)
	dest := t.TempDir()
	out := makeInstall(t, dest, "PREFIX=/usr")

	bin := filepath.Join(dest, "usr/bin/node-mirror")
	fi, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("%s: mode %v, want 0755", bin, fi.Mode().Perm())
	}
	if v, err := exec.Command(bin, "serve", "--help").CombinedOutput(); err != nil || !strings.Contains(string(v), "--data-dir") {
		t.Errorf("installed binary does not run: %v\n%s", err, v)
	}

	unitPath := filepath.Join(dest, "etc/systemd/system/node-mirror.service")
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(unitPath); fi.Mode().Perm() != 0o644 {
		t.Errorf("%s: mode %v, want 0644", unitPath, fi.Mode().Perm())
	}
	u := parseUnit(t, unit)
	wantExec := "/usr/bin/node-mirror serve --config /etc/node-mirror/config.toml --data-dir /var/lib/node-mirror"
	if got := u.get("Service", "ExecStart"); len(got) != 1 || got[0] != wantExec {
		t.Errorf("installed ExecStart = %q, want %q", got, wantExec)
	}
	if bytes.Contains(unit, []byte("/usr/local/bin/node-mirror")) {
		t.Errorf("installed unit still names /usr/local with PREFIX=/usr:\n%s", unit)
	}
	// Apart from the PREFIX substitution it is the unit in the repository.
	src, err := os.ReadFile(filepath.Join(root, "systemd/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.ReplaceAll(string(src), "/usr/local/bin/node-mirror", "/usr/bin/node-mirror"); string(unit) != want {
		t.Errorf("installed unit differs from systemd/node-mirror.service beyond PREFIX")
	}
	// The installed unit, with its ExecStart pointing into DESTDIR, verifies cleanly.
	verifyUnit(t, strings.ReplaceAll(string(unit), "/usr/bin/node-mirror", bin))

	conf := filepath.Join(dest, "etc/node-mirror/config.toml")
	example, err := os.ReadFile(filepath.Join(root, "examples/config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, example) {
		t.Errorf("%s is not examples/config.toml (err %v)", conf, err)
	}
	if fi, _ := os.Stat(conf); fi.Mode().Perm() != 0o644 {
		// DynamicUser= runs the daemon as a transient user: it must be able to read it.
		t.Errorf("%s: mode %v, want 0644", conf, fi.Mode().Perm())
	}
	if !strings.Contains(out, "node-mirror install") {
		t.Errorf("make install does not tell the operator to run node-mirror install:\n%s", out)
	}

	// Nothing else is installed.
	var files []string
	_ = filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			rel, _ := filepath.Rel(dest, p)
			files = append(files, rel)
		}
		return nil
	})
	if want := "etc/node-mirror/config.toml etc/systemd/system/node-mirror.service usr/bin/node-mirror"; strings.Join(files, " ") != want {
		t.Errorf("installed files %q, want %q", files, want)
	}

	// A second install keeps the operator's config and replaces the unit.
	edited := []byte("listen = \"127.0.0.1:5001\"\n")
	if err := os.WriteFile(conf, edited, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unitPath, []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}
	makeInstall(t, dest, "PREFIX=/usr")
	if got, _ := os.ReadFile(conf); !bytes.Equal(got, edited) {
		t.Errorf("make install overwrote an existing %s", conf)
	}
	if got, _ := os.ReadFile(unitPath); !bytes.Equal(got, unit) {
		t.Errorf("make install did not replace the unit")
	}
}

// The default PREFIX is /usr/local, which is what the unit in the repository names.
func TestMakeInstallDefaultPrefix(t *testing.T) {
	dest := t.TempDir()
	makeInstall(t, dest)
	if _, err := os.Stat(filepath.Join(dest, "usr/local/bin/node-mirror")); err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(repoRoot(t), "systemd/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(unit, src) {
		t.Error("with the default PREFIX the installed unit differs from systemd/node-mirror.service")
	}
}

// Under DynamicUser=, systemd makes /var/lib/node-mirror a symlink to
// private/node-mirror. `node-mirror install` keeps its record in that directory
// (hosts.StatePath), so as docs/service.md says, install and uninstall must work through
// the symlink, whichever of install and the service came first.
func TestInstallStateUnderDynamicUserLayout(t *testing.T) {
	root := t.TempDir()
	private := filepath.Join(root, "var/lib/private/node-mirror")
	if err := os.MkdirAll(private, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("private/node-mirror", filepath.Join(root, "var/lib/node-mirror")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "etc/containerd"), 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(nodeMirrorBin, args...).CombinedOutput(); err != nil {
			t.Fatalf("node-mirror %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("install", "--root", root, "--engines", "containerd", "--registries", "docker.io")
	if _, err := os.Stat(filepath.Join(private, filepath.Base(hosts.StatePath))); err != nil {
		t.Fatalf("install's state is not in the service's state directory: %v", err)
	}
	hostsTOML := filepath.Join(root, "etc/containerd/certs.d/docker.io/hosts.toml")
	if _, err := os.Stat(hostsTOML); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(filepath.Join(root, "var/lib/node-mirror")); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("install replaced the state directory's symlink: %v", err)
	}
	run("uninstall", "--root", root)
	if _, err := os.Stat(hostsTOML); !os.IsNotExist(err) {
		t.Errorf("uninstall left %s: %v", hostsTOML, err)
	}
}
