package hosts

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/pelletier/go-toml/v2"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/golden")

const testMirror = "http://127.0.0.1:5000"

// Testdata paths spell ':' as %3A: Go module zips do not allow ':' in file names.
func fromTestdataName(p string) string { return strings.ReplaceAll(p, "%3A", ":") }
func toTestdataName(p string) string   { return strings.ReplaceAll(p, ":", "%3A") }

// copyTree copies testdata/in/<name> below root.
func copyTree(t *testing.T, name, root string) {
	t.Helper()
	if name == "" {
		return
	}
	src := filepath.Join("testdata", "in", name)
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		dst := filepath.Join(root, fromTestdataName(rel))
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// entry is one file or directory of a tree snapshot.
type entry struct {
	mode fs.FileMode
	data string
}

func snapshot(t *testing.T, root string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e := entry{mode: fi.Mode()}
		if fi.Mode()&fs.ModeSymlink != 0 {
			e.data, err = os.Readlink(p)
			if err != nil {
				return err
			}
		} else if !d.IsDir() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.data = string(b)
		}
		out["/"+rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// diffTrees reports paths that differ between two snapshots.
func diffTrees(a, b map[string]entry) []string {
	var out []string
	for p, e := range a {
		if f, ok := b[p]; !ok || f != e {
			out = append(out, p)
		}
	}
	for p := range b {
		if _, ok := a[p]; !ok {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// golden compares got with testdata/golden/<path>, or rewrites it with -update.
func golden(t *testing.T, path string, got []byte) {
	t.Helper()
	path = filepath.Join("testdata", "golden", toTestdataName(path))
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		var d bytes.Buffer
		_ = unifiedDiff(&d, path, "got", want, got)
		t.Errorf("%s differs from golden:\n%s", path, d.String())
	}
}

// scrub replaces the temporary root in output with /ROOT so goldens are stable.
func scrub(s, root string) []byte { return []byte(strings.ReplaceAll(s, root, "/ROOT")) }

func TestInstallScenarios(t *testing.T) {
	all := []string{Containerd, Docker, CRIO}
	for _, tc := range []struct {
		name       string
		in         string // testdata/in/<in>; "" is an empty root
		registries []string
		engines    []string
	}{
		{name: "empty-all-engines", registries: []string{"docker.io", "ghcr.io"}, engines: all},
		{name: "empty-detect", registries: []string{"docker.io"}},
		{name: "wildcard", registries: []string{"*"}, engines: all},
		{name: "containerd16-default", in: "containerd16-default", registries: []string{"docker.io", "registry.k8s.io"}},
		{name: "debian-containerd", in: "debian-containerd", registries: []string{"docker.io"}},
		{name: "containerd2-default", in: "containerd2-default", registries: []string{"docker.io"}},
		{name: "containerd2-no-registry", in: "containerd2-no-registry", registries: []string{"docker.io"}},
		{name: "containerd2-bare", in: "containerd2-bare", registries: []string{"docker.io"}},
		{name: "containerd2-list", in: "containerd2-list", registries: []string{"docker.io"}, engines: []string{Containerd}},
		{name: "containerd2-set", in: "containerd2-set", registries: []string{"docker.io"}},
		{name: "certs-d-existing", in: "certs-d-existing", registries: []string{"docker.io", "ghcr.io", "localhost:5001", "quay.io"}},
		{name: "docker-many-keys", in: "docker-many-keys", registries: []string{"docker.io"}},
		{name: "docker-existing-mirrors", in: "docker-existing-mirrors", registries: []string{"docker.io", "ghcr.io"}},
		{name: "containers-existing", in: "containers-existing", registries: []string{"docker.io", "quay.io", "ghcr.io"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			copyTree(t, tc.in, root)
			before := snapshot(t, root)
			opts := Options{Root: root, MirrorURL: testMirror, Registries: tc.registries, Engines: tc.engines}

			// Planning and a dry run's diff write nothing.
			plan, err := Install(opts)
			if err != nil {
				t.Fatal(err)
			}
			var diff bytes.Buffer
			if err := plan.Diff(&diff); err != nil {
				t.Fatal(err)
			}
			if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
				t.Fatalf("planning wrote %v", d)
			}
			golden(t, tc.name+"/dry-run.diff", scrub(diff.String(), root))
			golden(t, tc.name+"/notes.txt", scrub(strings.Join(plan.Notes(), "\n")+"\n", root))

			if err := plan.Apply(); err != nil {
				t.Fatal(err)
			}
			after := snapshot(t, root)
			var written []string
			for _, p := range diffTrees(before, after) {
				if e := after[p]; e.mode.IsRegular() {
					golden(t, tc.name+"/files"+p, []byte(e.data))
					written = append(written, p)
				}
			}
			checkGoldenSet(t, tc.name, written)
			checkLoaders(t, root, after, before)

			// A second install changes nothing.
			again, err := Install(opts)
			if err != nil {
				t.Fatal(err)
			}
			if !again.Empty() {
				var d bytes.Buffer
				_ = again.Diff(&d)
				t.Fatalf("second install is not a no-op:\n%s", d.String())
			}

			un, err := Uninstall(root)
			if err != nil {
				t.Fatal(err)
			}
			if err := un.Apply(); err != nil {
				t.Fatal(err)
			}
			final := snapshot(t, root)
			for _, p := range uninstallLeft(before, final) {
				t.Errorf("uninstall left %s different: before %+v, after %+v", p, before[p], final[p])
			}
		})
	}
}

// uninstallLeft lists what differs after install and uninstall, but for the documented
// exception: daemon.json without registry-mirrors before (or no daemon.json at all) is
// left with an empty list, so a dockerd reload drops the mirror, and with it the
// directories install made for it.
func uninstallLeft(before, final map[string]entry) []string {
	var out []string
	for _, p := range diffTrees(before, final) {
		b, existed := before[p]
		f := final[p]
		switch {
		case p == dockerDaemonJSON && !strings.Contains(b.data, registryMirrorsKey):
			want, _ := emptyMirrorsDaemonJSON(p, []byte(b.data))
			if !existed {
				b.mode = 0o644
			}
			if f.data == string(want) && f.mode == b.mode {
				continue
			}
		case !existed && f.mode.IsDir() && strings.HasPrefix(dockerDaemonJSON, p+"/"):
			if _, kept := final[dockerDaemonJSON]; kept {
				continue
			}
		}
		out = append(out, p)
	}
	return out
}

// checkGoldenSet fails when a golden file exists for a file install no longer writes.
func checkGoldenSet(t *testing.T, name string, written []string) {
	t.Helper()
	dir := filepath.Join("testdata", "golden", name, "files")
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		if !slices.Contains(written, "/"+fromTestdataName(rel)) {
			if *update {
				return os.Remove(p)
			}
			t.Errorf("golden %s: install no longer writes this file", p)
		}
		return nil
	})
}

// checkLoaders reads what install wrote back with each engine's own reader: containerd's
// hosts loader must try the mirror first and then the real registry; daemon.json must list
// the mirror first; the drop-in must give each registry our mirror first.
func checkLoaders(t *testing.T, root string, after, before map[string]entry) {
	t.Helper()
	for p, e := range after {
		if b, ok := before[p]; ok && b == e {
			continue // not ours: a file install left alone
		}
		switch {
		case strings.HasSuffix(p, "/hosts.toml"):
			dir := filepath.Dir(filepath.Dir(p))
			reg := filepath.Base(filepath.Dir(p))
			host := reg
			if reg == "_default" {
				host = "example.org"
			}
			hosts, err := config.ConfigureHosts(context.Background(), config.HostOptions{
				HostDir: config.HostDirFromRoot(filepath.Join(root, dir)),
			})(host)
			if err != nil {
				t.Fatalf("%s: containerd cannot load it: %v", p, err)
			}
			if len(hosts) < 2 || hosts[0].Scheme+"://"+hosts[0].Host != testMirror {
				t.Fatalf("%s: containerd's first host is not the mirror: %+v", p, hosts)
			}
			if hosts[0].Capabilities != docker.HostCapabilityPull|docker.HostCapabilityResolve {
				t.Errorf("%s: mirror capabilities %v", p, hosts[0].Capabilities)
			}
			last := hosts[len(hosts)-1]
			if _, existed := before[p]; !existed {
				want := map[string]string{"docker.io": "https://registry-1.docker.io", "_default": "https://example.org"}[reg]
				if want == "" {
					want = "https://" + reg
				}
				if reg == "localhost:5001" {
					want = "http://" + reg
				}
				if got := last.Scheme + "://" + last.Host; got != want {
					t.Errorf("%s: containerd's last host is %s, want the registry %s", p, got, want)
				}
			}
		case p == dockerDaemonJSON:
			var d struct {
				Mirrors []string `json:"registry-mirrors"`
			}
			if err := json.Unmarshal([]byte(e.data), &d); err != nil || len(d.Mirrors) == 0 || d.Mirrors[0] != testMirror {
				t.Errorf("%s: registry-mirrors %v (%v), want %s first", p, d.Mirrors, err, testMirror)
			}
		case strings.HasSuffix(p, "/"+containersDropInName):
			var c containersConfFile
			if err := toml.Unmarshal([]byte(e.data), &c); err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			for _, r := range c.Registries {
				want, _ := containersMirrorLocation(testMirror, r.Prefix)
				if len(r.Mirrors) == 0 || r.Mirrors[0].Location != want || !r.Mirrors[0].Insecure {
					t.Errorf("%s: %s mirrors %+v, want %s (insecure) first", p, r.Prefix, r.Mirrors, want)
				}
			}
		}
	}
}
