package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestContainerdReadsInstalledConfigPath runs `node-mirror install --root` on each
// containerd config.toml of pkg/hosts's fixtures (and on a host without one), then gives
// the result to containerd's own config loader (`containerd config dump`, which applies
// the version migrations): CRI's image service must end up with config_path set to the one
// directory install wrote hosts.toml into, in 2.4 and, for the config versions it knows,
// in 1.6. A key in a table containerd does not read would be dropped silently, and an
// empty config_path or a list makes 2.x's CRI pulls read no hosts.toml (containerd#12808).
// Uninstall then gives the tree back.
func TestContainerdReadsInstalledConfigPath(t *testing.T) {
	t.Parallel()
	bin2, _ := testenv.Containerd2Bins(t)
	bin16, _ := testenv.Containerd16Bins(t)
	const want = "/etc/containerd/certs.d"
	const conf = "etc/containerd/config.toml"
	fixtures, err := filepath.Glob("../../pkg/hosts/testdata/in/*/" + conf)
	if err != nil {
		t.Fatal(err)
	}
	if len(fixtures) < 5 {
		t.Fatalf("only %d containerd fixtures: %v", len(fixtures), fixtures)
	}
	cases := map[string]string{"no config.toml": ""}
	for _, f := range fixtures {
		cases[filepath.Base(filepath.Dir(filepath.Dir(filepath.Dir(f))))] = filepath.Dir(filepath.Dir(filepath.Dir(f)))
	}
	for name, dir := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			files := map[string]string{"etc/containerd/": ""}
			if dir != "" {
				files = fixtureFiles(t, dir)
			}
			h := newScratchHost(t, files)
			h.Snapshot()
			h.Install("http://127.0.0.1:5000", "containerd")
			f := h.Path(conf)
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var head struct{ Version int }
			if err := toml.Unmarshal(b, &head); err != nil {
				t.Fatal(err)
			}
			// 2.x reads every version and migrates it into the images plugin.
			if got := dumpedConfigPath(t, bin2, f, "io.containerd.cri.v1.images"); got != want {
				t.Errorf("containerd 2.4 reads config_path %q after install, want %q:\n%s", got, want, b)
			}
			// 1.6 knows versions 1 and 2 only.
			if head.Version <= 2 {
				plugin := "io.containerd.grpc.v1.cri"
				if head.Version < 2 {
					plugin = "cri"
				}
				if got := dumpedConfigPath(t, bin16, f, plugin); got != want {
					t.Errorf("containerd 1.6 reads config_path %q after install, want %q:\n%s", got, want, b)
				}
			}
			if _, err := os.Stat(h.Path(want + "/docker.io/hosts.toml")); err != nil {
				t.Errorf("install wrote no hosts.toml where config_path points: %v", err)
			}
			h.Uninstall()
			h.RequireRestored(nil)
		})
	}
}

// dumpedConfigPath is plugins.<plugin>.registry.config_path as `containerd config dump`
// shows it for file.
func dumpedConfigPath(t *testing.T, bin, file, plugin string) string {
	t.Helper()
	out, err := exec.Command(bin, "--config", file, "config", "dump").Output()
	if err != nil {
		t.Fatalf("%s --config %s config dump: %v\n%s", bin, file, err, out)
	}
	var dump struct {
		Plugins map[string]struct {
			Registry struct {
				ConfigPath *string `toml:"config_path"`
			} `toml:"registry"`
		} `toml:"plugins"`
	}
	if err := toml.Unmarshal(out, &dump); err != nil {
		t.Fatalf("%s config dump: %v\n%s", bin, err, out)
	}
	p, ok := dump.Plugins[plugin]
	if !ok || p.Registry.ConfigPath == nil {
		t.Fatalf("%s config dump of %s has no plugins.%q.registry.config_path:\n%s", bin, file, plugin, out)
	}
	return *p.Registry.ConfigPath
}
