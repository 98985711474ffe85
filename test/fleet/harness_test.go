package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// chunkSize is the fleet's unit of ownership in these tests: small, so that an image of a
// few MiB has chunks on every member.
const chunkSize = 1 << 20

// meter sits in front of the test upstream's registry: it counts the blob body bytes the
// upstream sends and limits each blob response to rate bytes a second, so that a pull
// lasts long enough to kill a member in the middle of it.
type meter struct {
	sent atomic.Int64
	gets atomic.Int64
	rate atomic.Int64 // bytes a second per response; 0: unlimited
}

func (m *meter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") {
			next.ServeHTTP(w, r)
			return
		}
		m.gets.Add(1)
		next.ServeHTTP(&testenv.PacedWriter{ResponseWriter: w, Rate: m.rate.Load(), Sent: &m.sent}, r)
	})
}

// cluster is a fleet of node-mirror processes on loopback sharing one test upstream and
// one key.
type cluster struct {
	t       *testing.T
	up      *testenv.Upstream
	meter   *meter
	keyFile string
	nodes   []*node
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	m := &meter{}
	up := testenv.NewUpstream(t, testenv.WithMiddleware(m.wrap))
	return &cluster{t: t, up: up, meter: m, keyFile: writeKey(t)}
}

// writeKey writes a fresh fleet key as `openssl rand -hex 32` would, readable by its owner
// only (the daemon refuses anything looser).
func writeKey(t *testing.T) string {
	t.Helper()
	k := make([]byte, 32)
	rand.Read(k)
	f := filepath.Join(t.TempDir(), "fleet.key")
	if err := os.WriteFile(f, []byte(hex.EncodeToString(k)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// node is one member: a node-mirror serve process in fleet mode.
type node struct {
	name   string
	m      *testenv.Mirror
	gossip string // its gossip address, as it lists itself
	peer   string // its peer API address, likewise
}

// start runs a member named name, joining through the gossip addresses in join. Every
// listener binds port 0; the member's own status says which ports it got.
func (c *cluster) start(name string, join ...string) *node {
	c.t.Helper()
	args := []string{
		"--node-name", name,
		"--peer-listen", "127.0.0.1:0",
		"--gossip-listen", "127.0.0.1:0",
		"--fleet-key-file", c.keyFile,
		"--fetch-chunk-size", fmt.Sprint(chunkSize),
	}
	if len(join) > 0 {
		args = append(args, "--join", strings.Join(join, ","))
	}
	// FLEET_TEST_LOG=debug shows each member's fallbacks and refusals in the test log.
	m := testenv.StartMirror(c.t, testenv.MirrorOptions{Upstreams: []string{c.up.Flag("docker.io")}, Args: args, LogLevel: os.Getenv("FLEET_TEST_LOG")})
	n := &node{name: name, m: m}
	c.nodes = append(c.nodes, n)
	for _, p := range n.status(c.t).Fleet {
		if p.Self {
			if p.Name != name {
				c.t.Fatalf("%s lists itself as %q", name, p.Name)
			}
			n.gossip, n.peer = p.GossipAddr, p.PeerAddr
		}
	}
	if n.gossip == "" || n.peer == "" {
		c.t.Fatalf("%s: status lists no self member with gossip and peer addresses", name)
	}
	return n
}

// stopAll stops every member at once (each leave takes seconds of gossip), so that the
// test does not wait for them one after the other.
func (c *cluster) stopAll() {
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		wg.Go(n.m.Stop)
	}
	wg.Wait()
}

// status is `node-mirror status --json`, decoded into the fields an operator's script
// would read (so a renamed JSON field fails here).
type status struct {
	Mirror struct {
		Downloads int `json:"downloads"`
		Active    []struct {
			Digest   string `json:"digest"`
			Registry string `json:"registry"`
			Repo     string `json:"repo"`
			Size     int64  `json:"size"`
			Stored   int64  `json:"stored"`
		} `json:"active"`
	} `json:"mirror"`
	Fleet []memberStatus `json:"fleet"`
}

type memberStatus struct {
	Name       string `json:"name"`
	GossipAddr string `json:"gossip_addr"`
	PeerAddr   string `json:"peer_addr"`
	State      string `json:"state"`
	Self       bool   `json:"self"`
	BytesIn    int64  `json:"bytes_in"`
	BytesOut   int64  `json:"bytes_out"`
	Faults     int64  `json:"faults"`
}

// status runs `node-mirror status --json --mirror-url` against the node, as an operator would.
func (n *node) status(t *testing.T) status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, testenv.Bin(t), "status", "--json", "--mirror-url", n.m.URL)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: node-mirror status --json: %v\n%s", n.name, err, stderr.Bytes())
	}
	var st status
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("%s: status --json: %v\n%s", n.name, err, out)
	}
	return st
}

// adminStatus is GET /admin/status, what `status` prints: for polling, where starting a
// race-built CLI for every look would cost a second each.
func (n *node) adminStatus(t *testing.T) status {
	t.Helper()
	client := &http.Client{Timeout: time.Minute}
	resp, err := client.Get(n.m.URL + "/admin/status")
	if err != nil {
		t.Fatalf("%s: /admin/status: %v", n.name, err)
	}
	defer resp.Body.Close()
	var st status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: /admin/status: %s: %v", n.name, resp.Status, err)
	}
	return st
}

// member is the node's line about the member named name (nil: not listed).
func (s status) member(name string) *memberStatus {
	for i := range s.Fleet {
		if s.Fleet[i].Name == name {
			return &s.Fleet[i]
		}
	}
	return nil
}

// waitFor polls cond every 100 ms until it holds; the test fails after a minute, with
// what cond said last.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within a minute; last: %s", what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitAlive waits until every node lists exactly the members named alive as alive.
func waitAlive(t *testing.T, nodes []*node, alive ...string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("every member sees %v alive", alive), func() (bool, string) {
		for _, n := range nodes {
			st := n.adminStatus(t)
			var got []string
			for _, m := range st.Fleet {
				if m.State == "alive" {
					got = append(got, m.Name)
				}
			}
			if strings.Join(got, ",") != strings.Join(alive, ",") {
				return false, fmt.Sprintf("%s sees %v alive", n.name, got)
			}
		}
		return true, ""
	})
}

// pull fetches image ref (repo:tag) through the node as an engine does: the manifest by
// tag, then the config and the layers, three at a time. Every body is checked against its
// digest and size, and the manifest's digest against want.
func pull(ctx context.Context, n *node, img testenv.Image) error {
	client := &http.Client{}
	get := func(path string, accept ...string) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.m.URL+"/v2/"+img.Repo+"/"+path, nil)
		if err != nil {
			return nil, err
		}
		for _, a := range accept {
			req.Header.Add("Accept", a)
		}
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return nil, fmt.Errorf("GET %s: after %d bytes: %w", path, len(body), err)
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
		}
		return body, nil
	}
	body, err := get("manifests/"+img.Tag, string(img.MediaType), "application/vnd.oci.image.manifest.v1+json")
	if err != nil {
		return fmt.Errorf("%s: %w", n.name, err)
	}
	if d := digest.FromBytes(body); d.String() != img.Digest.String() {
		return fmt.Errorf("%s: manifest %s:%s has digest %s, want %s", n.name, img.Repo, img.Tag, d, img.Digest)
	}
	var mf struct {
		Config struct {
			Digest digest.Digest `json:"digest"`
			Size   int64         `json:"size"`
		} `json:"config"`
		Layers []struct {
			Digest digest.Digest `json:"digest"`
			Size   int64         `json:"size"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(body, &mf); err != nil {
		return fmt.Errorf("%s: manifest: %w", n.name, err)
	}
	type blob struct {
		d    digest.Digest
		size int64
	}
	blobs := []blob{{mf.Config.Digest, mf.Config.Size}}
	for _, l := range mf.Layers {
		blobs = append(blobs, blob{l.Digest, l.Size})
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(blobs))
	sem := make(chan struct{}, 3)
	for _, b := range blobs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			data, err := get("blobs/" + b.d.String())
			switch {
			case err != nil:
				errs <- fmt.Errorf("%s: %w", n.name, err)
			case int64(len(data)) != b.size || digest.FromBytes(data) != b.d:
				errs <- fmt.Errorf("%s: blob %s: got %d bytes with digest %s, want %d", n.name, b.d, len(data), digest.FromBytes(data), b.size)
			}
		})
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// layerSizes maps each layer's digest to its size.
func layerSizes(t *testing.T, img testenv.Image) map[string]int64 {
	t.Helper()
	ls, err := img.Image.Layers()
	if err != nil {
		t.Fatal(err)
	}
	sizes := map[string]int64{}
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if sizes[d.String()], err = l.Size(); err != nil {
			t.Fatal(err)
		}
	}
	return sizes
}

// blobBytes is the size of the image's config and layers: what a pull downloads besides
// the manifest.
func blobBytes(t *testing.T, img testenv.Image) int64 {
	t.Helper()
	cfg, err := img.Image.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	n := int64(len(cfg))
	layers, err := img.Image.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		s, err := l.Size()
		if err != nil {
			t.Fatal(err)
		}
		n += s
	}
	return n
}
