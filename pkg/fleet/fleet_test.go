package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Deadlines are generous: membership converges in a few seconds, but these tests share
// two cores with others under -race.
const convergeDeadline = 60 * time.Second

type testNode struct {
	*Fleet
	src   *blobSource
	reg   *prometheus.Registry
	serve chan error
}

type nodeOpt func(*Config)

func withKey(k []byte) nodeOpt         { return func(c *Config) { c.Key = k } }
func withJoin(addrs ...string) nodeOpt { return func(c *Config) { c.Join = addrs } }
func withGossip(addr string) nodeOpt   { return func(c *Config) { c.GossipListen = addr } }

// startNode starts a member on loopback with its peer API serving src.
func startNode(t *testing.T, name string, src *blobSource, opts ...nodeOpt) *testNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	cfg := Config{
		NodeName:      name,
		GossipListen:  "127.0.0.1:0",
		PeerAdvertise: ln.Addr().String(),
		Key:           testKey,
		Logger:        testLogger(t).With("node", name),
		Registerer:    reg,
	}
	for _, o := range opts {
		o(&cfg)
	}
	f, err := Start(context.Background(), cfg)
	if err != nil {
		ln.Close()
		t.Fatalf("Start %s: %v", name, err)
	}
	n := &testNode{Fleet: f, src: src, reg: reg, serve: make(chan error, 1)}
	if src == nil {
		n.src = newBlobSource()
	}
	go func() { n.serve <- f.Serve(ln, n.src) }()
	t.Cleanup(func() { n.Close() })
	return n
}

// Close leaves and waits for Serve to return.
func (n *testNode) Close() error {
	err := n.Fleet.Close()
	if serr := <-n.serve; !errors.Is(serr, http.ErrServerClosed) {
		return fmt.Errorf("Serve: %v", serr)
	}
	n.serve <- http.ErrServerClosed // for a second Close
	return err
}

// kill stops the node as a crash would: no leave, no goodbye.
func (n *testNode) kill() {
	n.closeOnce.Do(func() { n.stop(false) })
}

func liveNames(f *Fleet) []string {
	var out []string
	for _, m := range f.Members() {
		if m.State == StateAlive {
			out = append(out, m.Name)
		}
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes, and returns how long it took.
func waitFor(t *testing.T, what string, deadline time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > deadline {
			t.Fatalf("%s: not within %v", what, deadline)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

func TestMembershipJoinLeaveAndFailure(t *testing.T) {
	seed := startNode(t, "node-0", nil)
	nodes := []*testNode{seed}
	start := time.Now()
	for i := 1; i < 5; i++ {
		nodes = append(nodes, startNode(t, fmt.Sprintf("node-%d", i), nil, withJoin(seed.GossipAddr())))
	}
	all := []string{"node-0", "node-1", "node-2", "node-3", "node-4"}
	for _, n := range nodes {
		waitFor(t, n.Name()+" sees all five", convergeDeadline, func() bool { return slices.Equal(liveNames(n.Fleet), all) })
	}
	t.Logf("5 members converged %v after the first start", time.Since(start).Round(time.Millisecond))

	// Every member knows every other's peer address, and they agree on every owner.
	for _, n := range nodes {
		for _, m := range n.Members() {
			want := nodes[slices.Index(all, m.Name)]
			if m.PeerAddr != want.cfg.PeerAdvertise || m.GossipAddr != want.GossipAddr() || m.Self != (m.Name == n.Name()) {
				t.Fatalf("%s lists %+v; want peer %s, gossip %s", n.Name(), m, want.cfg.PeerAdvertise, want.GossipAddr())
			}
		}
		if got := metricValue(t, n.reg, "node_mirror_fleet_members"); got != 5 {
			t.Fatalf("%s: node_mirror_fleet_members = %v, want 5", n.Name(), got)
		}
	}
	d := digest.FromString("a layer")
	owners := map[string]int{}
	for c := int64(0); c < 64; c++ {
		want := names(nodes[0].Owners(d, c))
		if len(want) != 5 {
			t.Fatalf("Owners(%d) = %v, want all five members", c, want)
		}
		for _, n := range nodes[1:] {
			if got := names(n.Owners(d, c)); !slices.Equal(got, want) {
				t.Fatalf("chunk %d: %s ranks %v, %s ranks %v", c, n.Name(), got, nodes[0].Name(), want)
			}
		}
		owners[want[0]]++
	}
	if len(owners) < 4 {
		t.Fatalf("64 chunks are owned by only %v", owners)
	}

	// node-4 leaves gracefully; node-3 crashes. Both are out of everyone's live set and
	// of every ranking; the leaver is reported left, the crashed one dead.
	leaveStart := time.Now()
	if err := nodes[4].Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, n := range nodes[:4] {
		waitFor(t, n.Name()+" drops node-4", convergeDeadline, func() bool { return !slices.Contains(liveNames(n.Fleet), "node-4") })
	}
	t.Logf("a member that left was out of every live set after %v", time.Since(leaveStart).Round(time.Millisecond))
	// Out of the live set as soon as it announced leaving; reported left once gone.
	for _, n := range nodes[:4] {
		waitFor(t, n.Name()+" reports node-4 left", convergeDeadline, func() bool { return stateOf(n.Fleet, "node-4") == StateLeft })
	}

	killStart := time.Now()
	nodes[3].kill()
	for _, n := range nodes[:3] {
		waitFor(t, n.Name()+" drops node-3", convergeDeadline, func() bool { return !slices.Contains(liveNames(n.Fleet), "node-3") })
	}
	t.Logf("a killed member was out of every live set after %v", time.Since(killStart).Round(time.Millisecond))
	for _, n := range nodes[:3] {
		if st := stateOf(n.Fleet, "node-3"); st != StateDead {
			t.Errorf("%s: node-3 is %q, want %q", n.Name(), st, StateDead)
		}
		if st := stateOf(n.Fleet, "node-4"); st != StateLeft {
			t.Errorf("%s: node-4 is %q, want %q", n.Name(), st, StateLeft)
		}
		for c := int64(0); c < 64; c++ {
			if got := names(n.Owners(d, c)); !slices.Equal(got, names(nodes[0].Owners(d, c))) || len(got) != 3 ||
				slices.Contains(got, "node-3") || slices.Contains(got, "node-4") {
				t.Fatalf("%s: Owners(%d) = %v after node-3 and node-4 went", n.Name(), c, got)
			}
		}
		if got := metricValue(t, n.reg, "node_mirror_fleet_members"); got != 3 {
			t.Fatalf("%s: node_mirror_fleet_members = %v, want 3", n.Name(), got)
		}
	}
}

func stateOf(f *Fleet, name string) State {
	for _, m := range f.Members() {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

// metricValue sums the samples of a metric family in reg (with label l=v when given).
func metricValue(t *testing.T, reg *prometheus.Registry, name string, lv ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	found := false
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(lv); i += 2 {
				for _, lp := range m.GetLabel() {
					if lp.GetName() == lv[i] && lp.GetValue() != lv[i+1] {
						continue metrics
					}
				}
			}
			found = true
			sum += m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	if !found {
		t.Fatalf("no metric %s%v", name, lv)
	}
	return sum
}

func TestForeignKeyIsNotAdmitted(t *testing.T) {
	blob := testBlob(64 << 10)
	seed := startNode(t, "node-0", newBlobSource(blob))
	member := startNode(t, "node-1", newBlobSource(blob), withJoin(seed.GossipAddr()))
	waitFor(t, "two members", convergeDeadline, func() bool { return len(liveNames(seed.Fleet)) == 2 })

	foreign := startNode(t, "intruder", nil, withKey(otherKey), withJoin(seed.GossipAddr(), member.GossipAddr()))
	// Give it several join attempts (each a full TCP exchange with both) before judging.
	// (or until it got in, which the checks below report).
	waitFor(t, "intruder's join attempts", convergeDeadline, func() bool {
		return foreign.joinAttempts.Load() >= 3 || len(foreign.Members()) > 1 || len(seed.Members()) > 2
	})
	for _, n := range []*testNode{seed, member} {
		for _, m := range n.Members() {
			if m.Name == "intruder" {
				t.Fatalf("%s lists the intruder: %+v", n.Name(), m)
			}
		}
	}
	if got := names(foreign.Members()); !slices.Equal(got, []string{"intruder"}) {
		t.Fatalf("the intruder sees %v", got)
	}

	// Its peer requests are refused, and the source never hears of them.
	target := Member{Name: "node-0", PeerAddr: seed.cfg.PeerAdvertise}
	_, err := foreign.Fetch(context.Background(), target, chunkReq(blob, 0, 1024))
	fe, ok := errors.AsType[*FetchError](err)
	if !ok || fe.Status != http.StatusUnauthorized || fe.Reason != FallbackRefused || !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("intruder's Fetch: %v; want a 401 refusal", err)
	}
	if n := seed.src.callCount(); n != 0 {
		t.Fatalf("the seed's source was called %d times for the intruder", n)
	}
	// The members themselves still exchange chunks.
	rc, err := member.Fetch(context.Background(), target, chunkReq(blob, 0, 1024))
	if err != nil {
		t.Fatalf("member's Fetch: %v", err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || string(got) != string(blob[:1024]) {
		t.Fatalf("member read %d bytes, err %v", len(got), err)
	}
}

func TestJoinByDNSName(t *testing.T) {
	seed := startNode(t, "node-0", nil)
	_, port, _ := net.SplitHostPort(seed.GossipAddr())
	n := startNode(t, "node-1", nil, withJoin("localhost:"+port))
	for _, f := range []*testNode{seed, n} {
		waitFor(t, f.Name()+" sees both", convergeDeadline, func() bool {
			return slices.Equal(liveNames(f.Fleet), []string{"node-0", "node-1"})
		})
	}
}

// A member whose fleet vanished joins again when a member is back, without a restart.
func TestRejoinWhenAlone(t *testing.T) {
	seed := startNode(t, "node-0", nil)
	addr := seed.GossipAddr()
	n := startNode(t, "node-1", nil, withJoin(addr))
	waitFor(t, "joined", convergeDeadline, func() bool { return len(liveNames(n.Fleet)) == 2 })
	seed.kill()
	waitFor(t, "node-1 alone", convergeDeadline, func() bool { return len(liveNames(n.Fleet)) == 1 })
	// The seed comes back on the same address, and joins nobody itself.
	back := startNode(t, "node-0", nil, withGossip(addr))
	d := waitFor(t, "rejoined", convergeDeadline, func() bool {
		return slices.Equal(liveNames(n.Fleet), []string{"node-0", "node-1"}) &&
			slices.Equal(liveNames(back.Fleet), []string{"node-0", "node-1"})
	})
	t.Logf("rejoined %v after the seed came back", d.Round(time.Millisecond))
}

func TestChunkExchangeCountsBytes(t *testing.T) {
	blob := testBlob(1 << 20)
	a := startNode(t, "node-a", newBlobSource(blob))
	b := startNode(t, "node-b", nil, withJoin(a.GossipAddr()))
	for _, n := range []*testNode{a, b} {
		waitFor(t, n.Name()+" sees both", convergeDeadline, func() bool { return len(liveNames(n.Fleet)) == 2 })
	}
	var ma Member
	for _, m := range b.Members() {
		if m.Name == "node-a" {
			ma = m
		}
	}
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			off := int64(i) * (256 << 10)
			rc, err := b.Fetch(context.Background(), ma, chunkReq(blob, off, 256<<10))
			if err != nil {
				t.Errorf("Fetch %d: %v", i, err)
				return
			}
			defer rc.Close()
			got, err := io.ReadAll(rc)
			if err != nil || string(got) != string(blob[off:off+256<<10]) {
				t.Errorf("chunk %d: %d bytes, err %v", i, len(got), err)
			}
		})
	}
	wg.Wait()
	statOf := func(n *testNode, name string) PeerStats {
		for _, s := range n.Stats() {
			if s.Name == name {
				return s
			}
		}
		t.Fatalf("%s has no stats for %s", n.Name(), name)
		return PeerStats{}
	}
	if s := statOf(b, "node-a"); s.BytesIn != 1<<20 || s.BytesOut != 0 {
		t.Fatalf("node-b's stats for node-a: %+v, want 1 MiB in", s)
	}
	waitFor(t, "node-a counts bytes out", convergeDeadline, func() bool { return statOf(a, "node-b").BytesOut == 1<<20 })
	if got := metricValue(t, b.reg, "node_mirror_peer_bytes_total", "direction", "in"); got != 1<<20 {
		t.Fatalf("node-b's node_mirror_peer_bytes_total = %v", got)
	}
	for _, c := range a.src.calls {
		if c.Registry != "docker.io" || c.Repo != "library/nginx" || c.Size != 1<<20 || c.Length != 256<<10 || c.Hop != 0 {
			t.Fatalf("source asked for %+v", c)
		}
	}
	if !strings.HasPrefix(ma.PeerAddr, "127.0.0.1:") {
		t.Fatalf("peer address %q", ma.PeerAddr)
	}
}

// Close tells the others first, so they stop choosing it, and lets the chunks it is
// serving finish before it goes.
func TestCloseDrainsChunksInFlight(t *testing.T) {
	blob := testBlob(256 << 10)
	src := newBlobSource(blob)
	src.gate = make(chan struct{})
	a := startNode(t, "node-a", src)
	b := startNode(t, "node-b", nil, withJoin(a.GossipAddr()))
	waitFor(t, "two members", convergeDeadline, func() bool { return len(liveNames(b.Fleet)) == 2 })
	d := digest.FromBytes(blob)

	rc, err := b.Fetch(context.Background(), Member{Name: "node-a", PeerAddr: a.cfg.PeerAdvertise}, chunkReq(blob, 0, 256<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	closed := make(chan error, 1)
	go func() { closed <- a.Close() }()
	waitFor(t, "node-b sees node-a leaving", convergeDeadline, func() bool { return stateOf(b.Fleet, "node-a") == StateLeaving })
	if got := names(b.Owners(d, 0)); !slices.Equal(got, []string{"node-b"}) {
		t.Fatalf("owners while node-a leaves: %v", got)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) with a chunk in flight", err)
	default:
	}
	close(src.gate)
	got, err := io.ReadAll(rc)
	if err != nil || string(got) != string(blob) {
		t.Fatalf("chunk in flight during Close: %d bytes, err %v", len(got), err)
	}
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitFor(t, "node-b sees node-a left", convergeDeadline, func() bool { return stateOf(b.Fleet, "node-a") == StateLeft })
}

func TestManifestExchange(t *testing.T) {
	body := testManifestBody(20_000)
	big := testManifestBody(DefaultMaxManifestSize + 1)
	srcA := newBlobSource()
	d := srcA.addManifest(body, ociManifest)
	dBig := srcA.addManifest(big, ociManifest)
	a := startNode(t, "node-a", srcA)
	b := startNode(t, "node-b", nil, withJoin(a.GossipAddr()))
	for _, n := range []*testNode{a, b} {
		waitFor(t, n.Name()+" sees both", convergeDeadline, func() bool { return len(liveNames(n.Fleet)) == 2 })
	}
	ma := Member{Name: "node-a", PeerAddr: a.cfg.PeerAdvertise}

	req := ManifestRequest{Registry: "registry.example:5000", Repo: "team/app", Digest: d, Hop: 1}
	got, mt, err := b.FetchManifest(context.Background(), ma, req)
	if err != nil || string(got) != string(body) || mt != ociManifest {
		t.Fatalf("FetchManifest: %d bytes, %q, %v", len(got), mt, err)
	}
	srcA.mu.Lock()
	calls := slices.Clone(srcA.mcalls)
	srcA.mu.Unlock()
	if len(calls) != 1 || calls[0] != req {
		t.Fatalf("source asked %+v, want %+v", calls, req)
	}
	if s := statsOf(t, b.Fleet, "node-a"); s.BytesIn != int64(len(body)) {
		t.Fatalf("node-b's stats for node-a: %+v, want %d bytes in", s, len(body))
	}
	waitFor(t, "node-a counts bytes out", convergeDeadline, func() bool {
		return statsOf(t, a.Fleet, "node-b").BytesOut == int64(len(body))
	})
	if got := metricValue(t, b.reg, "node_mirror_peer_bytes_total", "direction", "in"); got != float64(len(body)) {
		t.Fatalf("node-b's bytes in = %v", got)
	}
	if got := metricValue(t, a.reg, "node_mirror_peer_bytes_total", "direction", "out"); got != float64(len(body)) {
		t.Fatalf("node-a's bytes out = %v", got)
	}

	// Answers that are not the peer's failure: unknown, and over the bound (the default,
	// 4 MiB), which the owner refuses to send rather than let the receiver refuse it.
	for _, tt := range []struct {
		dgst     digest.Digest
		sentinel error
		status   int
	}{
		{digest.FromString("unknown"), ErrNotFound, 404},
		{dBig, ErrUnavailable, 503},
	} {
		_, _, err := b.FetchManifest(context.Background(), ma, manifestReq(tt.dgst))
		fe, ok := errors.AsType[*FetchError](err)
		if !ok || !errors.Is(err, tt.sentinel) || fe.Status != tt.status {
			t.Fatalf("FetchManifest(%s): %v; want status %d", tt.dgst, err, tt.status)
		}
	}
	if !slices.Contains(names(b.Owners(d, 0)), "node-a") {
		t.Fatal("an answer put node-a in backoff")
	}
	if s := statsOf(t, b.Fleet, "node-a"); s.BytesIn != int64(len(body)) {
		t.Fatalf("refusals counted bytes in: %+v", s)
	}
}

// TestMembersLeavingAtOnce: members that Close at the same moment tell each other they
// are leaving while memberlist rewrites its records for the same departures. Under -race
// this caught tellLeaving reading memberlist's nodes without its lock.
func TestMembersLeavingAtOnce(t *testing.T) {
	for round := range 3 {
		first := startNode(t, fmt.Sprint("r", round, "-n0"), nil)
		nodes := []*testNode{first}
		for i := 1; i < 6; i++ {
			nodes = append(nodes, startNode(t, fmt.Sprint("r", round, "-n", i), nil, withJoin(first.GossipAddr())))
		}
		waitFor(t, "6 members", 30*time.Second, func() bool {
			for _, n := range nodes {
				if len(liveNames(n.Fleet)) != 6 {
					return false
				}
			}
			return true
		})
		var wg sync.WaitGroup
		for _, n := range nodes {
			wg.Go(func() {
				// With every member leaving, no one may be left to take a leave broadcast:
				// memberlist says so, and that is all it is.
				if err := n.Close(); err != nil && !strings.Contains(err.Error(), "leave broadcast") {
					t.Errorf("close: %v", err)
				}
			})
		}
		wg.Wait()
	}
	// memberlist's probes in flight at Shutdown end on their own timers (up to the TCP
	// fallback's 3 s), not at Shutdown: wait for them, so the leak check sees only leaks.
	waitFor(t, "memberlist's probes to end", 30*time.Second, func() bool {
		buf := make([]byte, 1<<20)
		return !strings.Contains(string(buf[:runtime.Stack(buf, true)]), "memberlist.(*Memberlist).probeNode")
	})
}

func TestValidPeerAddr(t *testing.T) {
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1:7000", true},
		{"[::1]:7000", true},
		{"10.0.0.7:7000", true},
		{"node-1.cluster.example:7000", true},
		{"", false},
		{"10.0.0.7", false},
		{":7000", false},
		{"0.0.0.0:7000", false},
		{"[::]:7000", false},
		{"224.0.0.1:7000", false},
		{"[fe80::1%eth0]:7000", false},
		{"10.0.0.7:0", false},
		{"10.0.0.7:07000", false},
		{"10.0.0.7:65536", false},
		{"Node-1.example:7000", false},
		// Whatever reaches past host:port into the URL of a signed request.
		{"h/p?:80", false},
		{"x/y#:1", false},
		{"user@h:80", false},
		{"h%2Fx:80", false},
		{"h p:80", false},
	} {
		if err := validPeerAddr(tc.addr); (err == nil) != tc.ok {
			t.Errorf("validPeerAddr(%q) = %v, want ok %v", tc.addr, err, tc.ok)
		}
	}
}

// A member whose metadata names a peer address that is not one is listed, but never
// asked for anything: signed requests go nowhere it chose beyond a host and a port.
func TestMetadataPeerAddrChecked(t *testing.T) {
	n := startNode(t, "node-a", nil)
	for _, peer := range []string{"10.0.0.7:80/admin?x=", "169.254.169.254:80#", "u@10.0.0.7:80"} {
		meta, _ := json.Marshal(nodeMeta{V: metaV1, Peer: peer})
		n.update(&memberlist.Node{Name: "evil", Addr: net.IPv4(127, 0, 0, 1), Port: 1, Meta: meta}, false)
		for _, m := range n.Members() {
			if m.Name == "evil" && m.PeerAddr != "" {
				t.Fatalf("metadata peer %q taken as peer address %q", peer, m.PeerAddr)
			}
		}
		if slices.Contains(names(n.Owners(digest.FromString("x"), 0)), "evil") {
			t.Fatalf("a member without a usable peer address (%q) is an owner", peer)
		}
	}
}
