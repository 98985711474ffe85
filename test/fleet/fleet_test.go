// Package fleet tests fleet mode (issue 13) with node-mirror daemons as processes on
// loopback: `node-mirror serve` with the fleet flags, a throttled test upstream of the
// test's own, `kill -9` of a member in the middle of a pull, and `node-mirror status` and
// /metrics read as an operator would. The in-process tests in pkg/mirror cover the same
// ground with members inside one test binary; these prove the daemon as shipped.
//
// Run by `make e2e`; NODE_MIRROR_BIN names the daemon (the race build).
package fleet

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestFleetProcesses runs one fleet through its life: four members pull a fresh image at
// once, a member is killed with SIGKILL while the four pull a second fresh image, a fifth
// member joins and pulls both images, and a member leaves gracefully. After each step the
// bytes, the stores, the upstream's counts, `status` and /metrics are checked.
func TestFleetProcesses(t *testing.T) {
	start := time.Now()
	c := newCluster(t)
	defer c.stopAll()
	v1 := c.up.PushRandomImage("library/app", "v1", 2, 5<<20)
	v2 := c.up.PushRandomImage("library/app", "v2", 2, 4<<20)

	n0 := c.start("n0")
	nodes := []*node{n0}
	for i := 1; i < 4; i++ {
		nodes = append(nodes, c.start(fmt.Sprint("n", i), n0.gossip))
	}
	waitAlive(t, nodes, names(nodes)...)
	checkAddresses(t, nodes)

	t.Run("four pull at once", func(t *testing.T) {
		c.meter.rate.Store(2 << 20)
		pullAll(t, nodes, v1)
		size := blobBytes(t, v1)
		sent := c.meter.sent.Load()
		// A member that timed out on its owner (a loaded machine can stall a race build
		// for seconds) fetches the rest of that chunk upstream: at most a chunk each.
		var timeouts float64
		for _, n := range nodes {
			timeouts += n.m.Metrics(t).Sum("node_mirror_peer_fallbacks_total", "reason=timeout")
		}
		t.Logf("4 members pulled %d blob bytes each; the upstream sent %d (%.2fx); %v timeouts", size, sent, float64(sent)/float64(size), timeouts)
		if limit := 1.1*float64(size) + timeouts*chunkSize; float64(sent) > limit {
			t.Errorf("the upstream sent %d blob bytes for an image of %d to 4 members, want at most 1.1x (and a chunk per timeout)", sent, size)
		}
		for _, n := range nodes {
			waitStored(t, n, v1)
		}
		checkTruth(t, nodes, size, sent)
	})

	var victim *node
	var survivors []*node
	t.Run("kill -9 of a member mid-pull", func(t *testing.T) {
		// Slow enough that a 1 MiB chunk takes 4 s to stream: the kill lands in the
		// middle of one.
		c.meter.rate.Store(256 << 10)
		outBefore := make([]float64, len(nodes))
		for i, n := range nodes {
			outBefore[i] = n.m.Metrics(t).Sum("node_mirror_peer_bytes_total", "direction=out")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		finished := make([]atomic.Bool, len(nodes))
		errs := make([]error, len(nodes))
		var wg sync.WaitGroup
		for i, n := range nodes {
			wg.Go(func() {
				errs[i] = pull(ctx, n, v2)
				finished[i].Store(true)
			})
		}
		// The victim is the first member seen streaming a layer's chunk to the others
		// (more than the config blob's bytes out): whoever owns chunks of this image.
		v := -1
		waitFor(t, "a member serves chunks of the second image", func() (bool, string) {
			for i, n := range nodes {
				if out := n.m.Metrics(t).Sum("node_mirror_peer_bytes_total", "direction=out"); out-outBefore[i] > 64<<10 {
					v = i
					return true, ""
				}
			}
			return false, "no member served more than 64 KiB"
		})
		victim = nodes[v]
		victim.m.Kill()
		t.Logf("killed %s (pid %d) mid-pull", victim.name, victim.m.PID())
		for i, n := range nodes {
			if i != v {
				if finished[i].Load() {
					t.Fatalf("%s had finished its pull before the kill: the test proves nothing", n.name)
				}
				survivors = append(survivors, n)
			}
		}
		// While they pull, `status` lists their downloads in flight: the second image's
		// layers, partly stored.
		layers := layerSizes(t, v2)
		st := survivors[0].status(t)
		active := 0
		for _, a := range st.Mirror.Active {
			if size, ok := layers[a.Digest]; ok && a.Registry == "docker.io" && a.Repo == "library/app" && a.Size == size && a.Stored < size {
				active++
			}
		}
		if active == 0 || st.Mirror.Downloads < active {
			t.Errorf("%s is pulling the second image, but status lists %d downloads: %+v", survivors[0].name, st.Mirror.Downloads, st.Mirror.Active)
		}
		wg.Wait()
		for i, n := range nodes {
			if i != v && errs[i] != nil {
				t.Errorf("survivor %s: %v", n.name, errs[i])
			}
		}
		var total float64
		for _, n := range survivors {
			waitStored(t, n, v2)
			ms := n.m.Metrics(t)
			total += ms.Sum("node_mirror_peer_fallbacks_total")
			t.Logf("%s: fallbacks %s", n.name, fallbacks(ms))
		}
		if total == 0 {
			t.Errorf("no survivor counted a fallback, though %s died streaming chunks to them", victim.name)
		}

		// The survivors list the victim dead (it did not leave: it was killed) and count
		// three live members.
		waitFor(t, "the survivors list "+victim.name+" dead", func() (bool, string) {
			for _, n := range survivors {
				m := n.adminStatus(t).member(victim.name)
				if m == nil || m.State != "dead" {
					return false, fmt.Sprintf("%s lists it as %+v", n.name, m)
				}
				if live := n.m.Metrics(t).Sum("node_mirror_fleet_members"); live != 3 {
					return false, fmt.Sprintf("%s: node_mirror_fleet_members %v", n.name, live)
				}
			}
			return true, ""
		})
		waitAlive(t, survivors, names(survivors)...)
		for _, n := range survivors { // and `node-mirror status` says so
			if m := n.status(t).member(victim.name); m == nil || m.State != "dead" {
				t.Errorf("node-mirror status on %s lists %s as %+v, want dead", n.name, victim.name, m)
			}
		}
	})
	if len(survivors) != 3 {
		return // nobody was killed
	}

	t.Run("a member joining later fetches nothing upstream", func(t *testing.T) {
		c.meter.rate.Store(0)
		late := c.start("n4", survivors[0].gossip)
		members := append(slices.Clone(survivors), late)
		waitAlive(t, members, names(members)...)
		sent, gets := c.meter.sent.Load(), c.meter.gets.Load()
		inBefore := late.m.Metrics(t).Sum("node_mirror_peer_bytes_total", "direction=in")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		for _, img := range []testenv.Image{v1, v2} {
			if err := pull(ctx, late, img); err != nil {
				t.Fatal(err)
			}
			waitStored(t, late, img)
		}
		if n, g := c.meter.sent.Load()-sent, c.meter.gets.Load()-gets; n != 0 || g != 0 {
			t.Errorf("the member that joined later made %d blob GETs upstream (%d bytes), want none", g, n)
		}
		in := late.m.Metrics(t).Sum("node_mirror_peer_bytes_total", "direction=in") - inBefore
		if want := blobBytes(t, v1) + blobBytes(t, v2); in < float64(want) {
			t.Errorf("the late member counts %v bytes in from peers, but it pulled %d blob bytes and fetched none upstream", in, want)
		}
		for _, m := range late.status(t).Fleet {
			if m.Faults != 0 {
				t.Errorf("the late member counts %d faults against %s", m.Faults, m.Name)
			}
		}

		// A graceful stop is a leave, not a death.
		late.m.Stop()
		waitFor(t, "the others list n4 as left", func() (bool, string) {
			for _, n := range survivors {
				if m := n.adminStatus(t).member("n4"); m == nil || m.State != "left" {
					return false, fmt.Sprintf("%s lists n4 as %+v", n.name, m)
				}
			}
			return true, ""
		})
		for _, n := range survivors {
			if m := n.status(t).member("n4"); m == nil || m.State != "left" {
				t.Errorf("node-mirror status on %s lists n4 as %+v, want left", n.name, m)
			}
		}
		nodes = append(nodes, late)
	})

	// Every data dir, the killed member's included, holds only blobs that hash to their
	// names: a crash leaves at most an ingest.
	for _, n := range nodes {
		testenv.StoredBlobs(t, filepath.Join(n.m.DataDir, "content"))
	}
	c.stopAll()
	t.Logf("wall time %v", time.Since(start).Round(time.Second))
}

// pullAll pulls img through every node at the same moment; each pull must be right.
func pullAll(t *testing.T, nodes []*node, img testenv.Image) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() { errs[i] = pull(ctx, n, img) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// waitStored waits until the node's store holds every blob of img (a response's last
// bytes leave once the digest verified; the commit follows).
func waitStored(t *testing.T, n *node, img testenv.Image) {
	t.Helper()
	waitFor(t, n.name+" stores "+img.Tag, func() (bool, string) {
		have := testenv.StoredBlobs(t, filepath.Join(n.m.DataDir, "content"))
		for _, d := range img.Digests() {
			if !have[d.String()] {
				return false, d.String() + " is missing"
			}
		}
		return true, ""
	})
}

// checkAddresses checks that every member lists every other with the addresses that
// member lists for itself.
func checkAddresses(t *testing.T, nodes []*node) {
	t.Helper()
	for _, n := range nodes {
		st := n.status(t)
		for _, o := range nodes {
			m := st.member(o.name)
			if m == nil {
				t.Errorf("%s does not list %s", n.name, o.name)
				continue
			}
			if m.GossipAddr != o.gossip || m.PeerAddr != o.peer || m.Self != (n == o) {
				t.Errorf("%s lists %s as %+v; it says gossip %s, peer %s", n.name, o.name, *m, o.gossip, o.peer)
			}
		}
	}
}

// checkTruth checks that status and /metrics say what happened in a pull by every node of
// an image of size blob bytes, of which the upstream sent sent: all alive, no faults;
// what one member counts in from another, the other counts out to it; each node's
// node_mirror_peer_bytes_total is the sum of its status lines; the nodes' upstream byte
// counters add up to what the upstream sent; and every byte a node stored that did not
// come from upstream came from a member.
func checkTruth(t *testing.T, nodes []*node, size, sent int64) {
	t.Helper()
	sts := map[string]status{}
	var anyFallback float64
	for _, n := range nodes {
		sts[n.name] = n.status(t)
		anyFallback += n.m.Metrics(t).Sum("node_mirror_peer_fallbacks_total")
	}
	var totalIn, fetched float64
	for _, n := range nodes {
		st := sts[n.name]
		ms := n.m.Metrics(t)
		var in, out int64
		for _, m := range st.Fleet {
			if m.State != "alive" {
				t.Errorf("%s lists %s as %s", n.name, m.Name, m.State)
			}
			if m.Faults != 0 {
				t.Errorf("%s counts %d faults against %s", n.name, m.Faults, m.Name)
			}
			in += m.BytesIn
			out += m.BytesOut
			if m.Self {
				if m.BytesIn != 0 || m.BytesOut != 0 {
					t.Errorf("%s counts bytes exchanged with itself: %+v", n.name, m)
				}
				continue
			}
			other := sts[m.Name].member(n.name)
			if other == nil {
				t.Errorf("%s is not listed by %s", n.name, m.Name)
				continue
			}
			// Bytes out are what went into the connection: a member that gave up on a
			// stalled transfer (a timeout) read less than that.
			if m.BytesIn > other.BytesOut || (anyFallback == 0 && m.BytesIn != other.BytesOut) {
				t.Errorf("%s counts %d bytes in from %s, which counts %d bytes out to it (%v fallbacks)", n.name, m.BytesIn, m.Name, other.BytesOut, anyFallback)
			}
		}
		for _, c := range []struct {
			series string
			status int64
		}{{"direction=in", in}, {"direction=out", out}} {
			if got := ms.Sum("node_mirror_peer_bytes_total", c.series); got != float64(c.status) {
				t.Errorf("%s: node_mirror_peer_bytes_total{%s} is %v, its status lines add up to %d", n.name, c.series, got, c.status)
			}
		}
		if got := ms.Sum("node_mirror_fleet_members"); got != float64(len(nodes)) {
			t.Errorf("%s: node_mirror_fleet_members %v, want %d", n.name, got, len(nodes))
		}
		if got := ms.Sum("node_mirror_peer_faults_total"); got != 0 {
			t.Errorf("%s: node_mirror_peer_faults_total %v, want 0", n.name, got)
		}
		// Nobody was down, refused, lied or failed, so nothing fell back for those reasons
		// (a timeout may be true on a loaded machine). Asking the previous owner of a
		// chunk this node owns, which lacks it, is how a fresh chunk is looked for: not a
		// fallback from its owner.
		for _, r := range []string{"down", "refused", "fault", "error"} {
			if got := ms.Sum("node_mirror_peer_fallbacks_total", "reason="+r); got != 0 {
				t.Errorf("%s: node_mirror_peer_fallbacks_total{reason=%q} is %v after a pull in which no member failed, want 0", n.name, r, got)
			}
		}
		t.Logf("%s: %d bytes in from members, %d out; fallbacks %s", n.name, in, out, fallbacks(ms))
		totalIn += float64(in)
		fetched += ms.Sum("node_mirror_upstream_fetched_bytes_total")
	}
	if fetched != float64(sent) {
		t.Errorf("the members count %v blob bytes fetched upstream; the upstream sent %d", fetched, sent)
	}
	// Each of the nodes stored the image: what did not come from upstream came from members.
	if need := float64(int64(len(nodes))*size - sent); totalIn < need {
		t.Errorf("the members count %v bytes in from each other, but %v of the bytes they stored did not come from upstream", totalIn, need)
	}
}

// fallbacks is node_mirror_peer_fallbacks_total by reason, for the log.
func fallbacks(ms testenv.Metrics) string {
	var b strings.Builder
	for _, r := range []string{"down", "timeout", "refused", "fault", "error"} {
		fmt.Fprintf(&b, " %s=%v", r, ms.Sum("node_mirror_peer_fallbacks_total", "reason="+r))
	}
	return strings.TrimSpace(b.String())
}

func names(nodes []*node) []string {
	var ns []string
	for _, n := range nodes {
		ns = append(ns, n.name)
	}
	slices.Sort(ns)
	return ns
}
