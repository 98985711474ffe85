package hosts

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func install(t *testing.T, o Options) *Plan {
	t.Helper()
	p, err := Install(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Apply(); err != nil {
		t.Fatal(err)
	}
	return p
}

func uninstall(t *testing.T, root string) *Plan {
	t.Helper()
	p, err := Uninstall(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Apply(); err != nil {
		t.Fatal(err)
	}
	return p
}

func read(t *testing.T, root, path string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, path))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func appendTo(t *testing.T, root, path, s string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(root, path), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

// debianConfig is Debian 12's /etc/containerd/config.toml, as the package installs it; the
// golden scenario and the e2e test read the same file.
var debianConfig = func() string {
	b, err := os.ReadFile("testdata/in/debian-containerd/etc/containerd/config.toml")
	if err != nil {
		panic(err)
	}
	return string(b)
}()

// When someone edits a file after install, uninstall keeps their edit and removes only
// node-mirror's entries.
func TestUninstallAfterEdits(t *testing.T) {
	root := t.TempDir()
	const userHosts = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://corp.example\"]\n  capabilities = [\"pull\"]\n"
	writeFiles(t, root, map[string]string{
		containerdConfigFile: debianConfig,
		dockerDaemonJSON:     "{\n  \"debug\": true\n}\n",
		dockerHostsFile:      userHosts,
	})
	o := Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: Engines}
	install(t, o)

	appendTo(t, root, containerdConfigFile, "# tuned by ops\n")
	appendTo(t, root, containerdHostsFile, "\n[host.\"https://other.example\"]\n  capabilities = [\"pull\"]\n")
	appendTo(t, root, dockerHostsFile, "# reviewed\n")
	cfg := strings.Replace(read(t, root, dockerDaemonJSON), "\"debug\": true", "\"debug\": true,\n  \"bip\": \"10.1.0.1/24\"", 1)
	writeFiles(t, root, map[string]string{dockerDaemonJSON: cfg})
	dropIn := filepath.Join(containersDropInDir, containersDropInName)
	appendTo(t, root, dropIn, "\n[[registry]]\nprefix = \"corp.example\"\nlocation = \"corp.example\"\ninsecure = true\n")

	p := uninstall(t, root)
	if got, want := read(t, root, containerdConfigFile), debianConfig+"# tuned by ops\n"; got != want {
		t.Errorf("config.toml:\n%s\nwant:\n%s", got, want)
	}
	if got, want := read(t, root, containerdHostsFile), "[host.\"https://other.example\"]\n  capabilities = [\"pull\"]\n"; got != want {
		t.Errorf("containerd hosts.toml:\n%q\nwant:\n%q", got, want)
	}
	if got, want := read(t, root, dockerHostsFile), userHosts+"# reviewed\n"; got != want {
		t.Errorf("docker hosts.toml:\n%q\nwant:\n%q", got, want)
	}
	if got, want := read(t, root, dockerDaemonJSON), "{\n  \"debug\": true,\n  \"bip\": \"10.1.0.1/24\",\n  \"registry-mirrors\": []\n}\n"; got != want {
		t.Errorf("daemon.json:\n%s\nwant:\n%s", got, want)
	}
	got := read(t, root, dropIn)
	if strings.Contains(got, "127.0.0.1:5000") || !strings.Contains(got, "corp.example") {
		t.Errorf("drop-in after uninstall:\n%s", got)
	}
	if len(p.Notes()) == 0 {
		t.Error("uninstall did not say it kept edits")
	}
	if _, err := os.Stat(filepath.Join(root, StatePath)); !os.IsNotExist(err) {
		t.Errorf("state file left behind: %v", err)
	}
}

// Installing again with another mirror URL replaces our entries; uninstall still restores
// the originals.
func TestReinstallNewMirrorURL(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{
		containerdConfigFile: debianConfig,
		dockerDaemonJSON:     "{\"registry-mirrors\": [\"https://mirror.gcr.io\"]}\n",
	})
	before := snapshot(t, root)
	o := Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Containerd, Docker}}
	install(t, o)
	o.MirrorURL = "http://127.0.0.1:5999"
	install(t, o)
	hosts := read(t, root, containerdHostsFile)
	if strings.Contains(hosts, testMirror) || strings.Count(hosts, "[host.") != 1 {
		t.Errorf("hosts.toml after a new URL:\n%s", hosts)
	}
	if got, want := read(t, root, dockerDaemonJSON), "{\"registry-mirrors\": [\"http://127.0.0.1:5999\", \"https://mirror.gcr.io\"]}\n"; got != want {
		t.Errorf("daemon.json = %s, want %s", got, want)
	}
	uninstall(t, root)
	if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
		t.Errorf("uninstall left %v", d)
	}
}

// Dropping a registry from --registries takes its files back on the next install.
func TestRegistriesShrink(t *testing.T) {
	root := t.TempDir()
	before := snapshot(t, root)
	o := Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io", "ghcr.io"}, Engines: []string{Containerd}}
	install(t, o)
	o.Registries = []string{"docker.io"}
	install(t, o)
	if _, err := os.Stat(filepath.Join(root, "/etc/containerd/certs.d/ghcr.io/hosts.toml")); !os.IsNotExist(err) {
		t.Errorf("ghcr.io hosts.toml still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, containerdHostsFile)); err != nil {
		t.Error(err)
	}
	uninstall(t, root)
	if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
		t.Errorf("uninstall left %v", d)
	}
}

// Installing only some engines later keeps the record of the others.
func TestInstallSubsetKeepsOtherRecords(t *testing.T) {
	root := t.TempDir()
	before := snapshot(t, root)
	o := Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: Engines}
	install(t, o)
	o.Engines = []string{Docker}
	if p, err := Install(o); err != nil || !p.Empty() {
		t.Fatalf("install --engines docker after a full install: empty=%v err=%v", p != nil && p.Empty(), err)
	}
	uninstall(t, root)
	if d := uninstallLeft(before, snapshot(t, root)); len(d) > 0 {
		t.Errorf("uninstall left %v", d)
	}
}

// Rewrites keep the file's mode and owner.
func TestWriteKeepsModeAndOwner(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{containerdConfigFile: debianConfig})
	path := filepath.Join(root, containerdConfigFile)
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	uid, gid := os.Getuid(), os.Getgid()
	if uid == 0 {
		uid, gid = 4321, 4322
		if err := os.Chown(path, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	install(t, Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Containerd}})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o640 || int(st.Uid) != uid || int(st.Gid) != gid {
		t.Errorf("after install: mode %v owner %d:%d, want 0640 %d:%d", fi.Mode(), st.Uid, st.Gid, uid, gid)
	}
	if !strings.Contains(read(t, root, containerdConfigFile), "config_path") {
		t.Error("config_path not written")
	}
	sfi, err := os.Stat(filepath.Join(root, StatePath))
	if err != nil || sfi.Mode().Perm() != 0o600 {
		t.Errorf("state file: %v %v, want mode 0600", sfi, err)
	}
	// No temporary files are left next to the target.
	ents, _ := os.ReadDir(filepath.Dir(path))
	for _, e := range ents {
		if strings.Contains(e.Name(), ".node-mirror-") {
			t.Errorf("temporary file %s left", e.Name())
		}
	}
}

func TestUninstallWithoutState(t *testing.T) {
	root := t.TempDir()
	p, err := Uninstall(root)
	if err != nil {
		t.Fatal(err)
	}
	if !p.Empty() || len(p.Notes()) != 1 {
		t.Errorf("uninstall with nothing installed: empty=%v notes=%v", p.Empty(), p.Notes())
	}
}

func TestReload(t *testing.T) {
	proc := t.TempDir()
	for pid, comm := range map[string]string{"10": "dockerd", "11": "containerd", "12": "crio", "self": "x"} {
		writeFiles(t, proc, map[string]string{"/" + pid + "/comm": comm + "\n"})
	}
	oldProc, oldSignal := procDir, signal
	defer func() { procDir, signal = oldProc, oldSignal }()
	var got []int
	procDir, signal = proc, func(pid int) error { got = append(got, pid); return nil }

	p := &Plan{root: "/", changes: []*Change{{Engine: Docker, kind: kindDaemonJSON}, {Engine: Docker, kind: kindHostsTOML}}}
	msgs, err := p.Reload()
	if err != nil || len(got) != 1 || got[0] != 10 {
		t.Fatalf("Reload: signalled %v, msgs %v, err %v; want dockerd (10) only", got, msgs, err)
	}
	if _, err := (&Plan{root: "/tmp"}).Reload(); err == nil {
		t.Error("reload with --root accepted")
	}
}

// dockerd keeps the registry-mirrors it has when a reload finds the key, or the whole
// file, missing (and with --config-file a missing file fails the reload). So uninstall
// never takes daemon.json away: where our mirror was the only one, it leaves an empty
// list, which a reload applies. Debian ships no daemon.json, so that is the usual case.
func TestUninstallLeavesEmptyRegistryMirrors(t *testing.T) {
	const empty = "{\n  \"registry-mirrors\": []\n}\n"
	for _, tc := range []struct {
		name   string
		before *string // daemon.json before install; nil: none
		edit   string  // appended to the "debug" line after install, if not ""
		want   string
	}{
		{name: "no daemon.json before", want: empty},
		{name: "empty daemon.json before", before: ptr(""), want: empty},
		{name: "no key before", before: ptr("{\"debug\": true}\n"), want: "{\"debug\": true, \"registry-mirrors\": []}\n"},
		{name: "empty list before", before: ptr("{\"registry-mirrors\": []}\n"), want: "{\"registry-mirrors\": []}\n"},
		{name: "other mirrors before", before: ptr("{\"registry-mirrors\": [\"https://mirror.gcr.io\"]}\n"), want: "{\"registry-mirrors\": [\"https://mirror.gcr.io\"]}\n"},
		{name: "no daemon.json before, edited since", edit: `"debug": true`, want: "{\n  \"debug\": true,\n  \"registry-mirrors\": []\n}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if err := os.MkdirAll(filepath.Join(root, "etc/docker"), 0o755); err != nil {
				t.Fatal(err)
			}
			if tc.before != nil {
				writeFiles(t, root, map[string]string{dockerDaemonJSON: *tc.before})
			}
			install(t, Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Docker}})
			if tc.edit != "" {
				cur := read(t, root, dockerDaemonJSON)
				writeFiles(t, root, map[string]string{dockerDaemonJSON: strings.Replace(cur, "{\n", "{\n  "+tc.edit+",\n", 1)})
			}
			p, err := Uninstall(root)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Apply(); err != nil {
				t.Fatal(err)
			}
			if got := read(t, root, dockerDaemonJSON); got != tc.want {
				t.Errorf("daemon.json after uninstall:\n%q\nwant:\n%q", got, tc.want)
			}
			fi, err := os.Stat(filepath.Join(root, dockerDaemonJSON))
			if err != nil || fi.Mode().Perm() != 0o644 {
				t.Errorf("daemon.json: %v %v, want mode 0644", fi, err)
			}

			// --reload sends dockerd the SIGHUP that makes it drop the mirror.
			oldProc, oldSignal := procDir, signal
			defer func() { procDir, signal = oldProc, oldSignal }()
			proc := t.TempDir()
			writeFiles(t, proc, map[string]string{"/77/comm": "dockerd\n"})
			var got []int
			procDir, signal = proc, func(pid int) error { got = append(got, pid); return nil }
			p.root = "/"
			if _, err := p.Reload(); err != nil || len(got) != 1 || got[0] != 77 {
				t.Errorf("uninstall's Reload signalled %v (err %v), want dockerd (77)", got, err)
			}
			if notes := strings.Join(p.Notes(), "\n"); !strings.Contains(notes, "reload") {
				t.Errorf("uninstall's notes do not say dockerd needs a reload: %q", notes)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// A config.toml edited after install loses only the config_path install set: the value
// it had goes back as it was written (containerd 2.x's own configs quote with '), and a
// file install created keeps the operator's edit but not our key.
func TestConfigPathRevertedAfterEdits(t *testing.T) {
	v3 := func(v string) string {
		return "version = 3\n\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = " + v + "\n"
	}
	for _, tc := range []struct {
		name   string
		before *string // config.toml before install; nil: none
		want   string  // after uninstall, without the edit; "" checks only what is below
	}{
		{name: "2.x empty, literal", before: ptr(v3("''")), want: v3("''")},
		{name: "2.x list, literal", before: ptr(v3("'/etc/containerd/certs.d:/etc/docker/certs.d'")), want: v3("'/etc/containerd/certs.d:/etc/docker/certs.d'")},
		{name: "2.x empty, basic", before: ptr(v3(`""`)), want: v3(`""`)},
		{name: "1.x unset", before: ptr(debianConfig), want: debianConfig},
		{name: "none"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if tc.before != nil {
				writeFiles(t, root, map[string]string{containerdConfigFile: *tc.before})
			}
			install(t, Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Containerd}})
			if _, c, err := readContainerdConfig("config.toml", []byte(read(t, root, containerdConfigFile))); err != nil || c.configPath != defaultContainerdHostsDir {
				t.Fatalf("install set config_path %q (%v), want %q", c.configPath, err, defaultContainerdHostsDir)
			}
			appendTo(t, root, containerdConfigFile, "# tuned by ops\n")
			uninstall(t, root)
			got := read(t, root, containerdConfigFile)
			if tc.want != "" {
				if got != tc.want+"# tuned by ops\n" {
					t.Errorf("config.toml after uninstall:\n%s\nwant:\n%s# tuned by ops", got, tc.want)
				}
				return
			}
			_, c, err := readContainerdConfig("config.toml", []byte(got))
			if err != nil || c.set || !strings.Contains(got, "# tuned by ops\n") {
				t.Errorf("config.toml after uninstall (err %v) keeps config_path (%v) or loses the edit:\n%s", err, c.set, got)
			}
		})
	}
}
