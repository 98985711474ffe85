package e2e

import (
	"encoding/json"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// criConfigs are containerd configs as a node has them before install, with the one
// change these tests need: the native snapshotter, which unpacks without overlay support.
// Root, state and sockets stay at containerd's defaults, which StartCRI keeps private.
var criConfigs = []struct {
	name   string
	bins   func(testing.TB) (containerd, ctr string)
	config func(t *testing.T) string
}{
	{
		// Debian 12's config.toml as the package installs it; install must add config_path
		// to CRI's registry table, which containerd 1.6 reads only at start.
		name: "containerd-1.6",
		bins: testenv.Containerd16Bins,
		config: func(t *testing.T) string {
			return readFixture(t, "../../pkg/hosts/testdata/in/debian-containerd/etc/containerd/config.toml") +
				"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"native\"\n"
		},
	},
	{
		// containerd 2.4's `containerd config default`, with config_path = ''. CRI then
		// defaults config_path to "/etc/containerd/certs.d:/etc/docker/certs.d", but its
		// pulls go through the transfer service, which takes that list for one directory
		// (containerd#12808) and so reads no hosts.toml at all: install has to set
		// config_path to the one directory it writes. The transfer service unpacks only
		// into the snapshotters its unpack_config names (overlayfs by default), so native
		// is added there too.
		name: "containerd-2.4",
		bins: testenv.Containerd2Bins,
		config: func(t *testing.T) string {
			c := readFixture(t, "../../pkg/hosts/testdata/in/containerd2-default/etc/containerd/config.toml")
			if !strings.Contains(c, "snapshotter = 'overlayfs'") {
				t.Fatal("containerd 2.4's default config no longer names the overlayfs snapshotter")
			}
			return strings.ReplaceAll(c, "snapshotter = 'overlayfs'", "snapshotter = 'native'") +
				"\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n" +
				"  platform = 'linux/" + runtime.GOARCH + "'\n  snapshotter = 'native'\n"
		},
	},
}

// TestCRIPullsThroughInstalledMirror: containerd with its CRI plugin on (1.6 from Debian,
// 2.4 from its Go module), configured by what `node-mirror install --root` wrote, pulls a
// single-platform image and a multi-platform index with `crictl pull`, as a kubelet
// would: through the mirror, and again from the mirror's cache after `crictl rmi` with the
// upstream stopped. Then uninstall gives the scratch root back as it was.
func TestCRIPullsThroughInstalledMirror(t *testing.T) {
	t.Parallel()
	for _, tc := range criConfigs {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bin, ctr := tc.bins(t)
			up := testenv.NewUpstream(t)
			single := up.PushRandomImage("library/criapp", "v1", 3, 256<<10)
			// The node's platform and another one: CRI must pull only its own.
			platform, other := "linux/"+runtime.GOARCH, "linux/arm64"
			if runtime.GOARCH == "arm64" {
				other = "linux/amd64"
			}
			idx := up.PushRandomIndex("library/crimulti", "v1", 2, 256<<10, platform, other)
			m := mirrorOf(t, up)

			h := newScratchHost(t, map[string]string{"etc/containerd/config.toml": tc.config(t)})
			h.Snapshot()
			h.Install(m.URL, "containerd")
			c := testenv.StartCRI(t, bin, ctr, h.Path("etc/containerd"))

			pulls := []struct {
				ref       string
				digest    v1.Hash // what the tag names: the image's manifest or the index
				manifests []v1.Hash
				blobs     []v1.Hash
			}{
				{"docker.io/library/criapp:v1", single.Digest, []v1.Hash{single.Digest}, single.Blobs()},
				{"docker.io/library/crimulti:v1", idx.Digest,
					[]v1.Hash{idx.Digest, idx.Platforms[platform].Digest}, idx.Platforms[platform].Blobs()},
			}
			for _, p := range pulls {
				w := watchPull(t, m, up)
				if out, err := c.Crictl("pull", p.ref); err != nil {
					// With no internet, a pull that went to registry-1.docker.io means CRI
					// did not read the hosts.toml install wrote.
					t.Fatalf("%v\n%s\nthe mirror answered %v requests: if CRI went to registry-1.docker.io, it did not use %s",
						err, out, w.delta(t, "node_mirror_requests_total"), h.Path("etc/containerd/certs.d/docker.io/hosts.toml"))
				}
				criRequireImage(t, c, p.ref, p.digest, append(p.manifests, p.blobs...))
				w.RequireCold(t, tc.name+" crictl pull "+p.ref, p.manifests, p.blobs)
			}
			have := c.Content()
			for _, d := range idx.Platforms[other].Digests() {
				if have[d.String()] {
					t.Errorf("CRI fetched %s of %s, another platform's", d, other)
				}
			}

			for _, p := range pulls {
				c.MustCrictl("rmi", p.ref)
			}
			// Removing an image lets containerd collect its content; wait for that, or the
			// re-pull below would find the blobs at home and never ask the mirror.
			if !eventually(time.Minute, func() bool { return len(c.Content()) == 0 }) {
				t.Fatalf("content left after crictl rmi: %v", c.Content())
			}
			up.Stop()
			for _, p := range pulls {
				w := watchPull(t, m, up)
				c.MustCrictl("pull", p.ref)
				criRequireImage(t, c, p.ref, p.digest, append(p.manifests, p.blobs...))
				w.RequireFromCache(t, tc.name+" crictl pull "+p.ref+", upstream stopped", p.blobs)
			}

			h.Uninstall()
			h.RequireRestored(nil)
		})
	}
}

// criRequireImage fails unless CRI has ref, pulled as digest, with every digest in
// content in its content store.
func criRequireImage(t *testing.T, c *testenv.CRI, ref string, digest v1.Hash, content []v1.Hash) {
	t.Helper()
	out := c.MustCrictl("inspecti", "--output", "json", ref)
	var img struct {
		Status struct {
			RepoDigests []string `json:"repoDigests"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &img); err != nil {
		t.Fatalf("crictl inspecti %s: %v\n%s", ref, err, out)
	}
	repo, _, _ := strings.Cut(ref, ":")
	if want := repo + "@" + digest.String(); !slices.Contains(img.Status.RepoDigests, want) {
		t.Errorf("CRI has %s as %v, want %s", ref, img.Status.RepoDigests, want)
	}
	have := c.Content()
	for _, d := range content {
		if !have[d.String()] {
			t.Errorf("CRI's content store lacks %s of %s", d, ref)
		}
	}
}

func readFixture(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
