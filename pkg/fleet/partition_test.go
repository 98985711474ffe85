package fleet

import (
	"errors"
	"net"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// network lets a test cut loopback gossip between groups of members: each member's
// transport drops datagrams to, and refuses connections to, members on another side.
type network struct {
	mu   sync.Mutex
	side map[string]int // gossip address → side; unlisted addresses are on side 0
}

func (n *network) setSide(addr string, side int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.side[addr] = side
}

func (n *network) heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	clear(n.side)
}

func (n *network) cut(from, to string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.side[from] != n.side[to]
}

var errCut = errors.New("network cut by the test")

type cutTransport struct {
	memberlist.NodeAwareTransport
	net  *network
	self string
}

func (t *cutTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (t *cutTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if t.net.cut(t.self, a.Addr) {
		return time.Now(), nil // a datagram lost on the way
	}
	return t.NodeAwareTransport.WriteToAddress(b, a)
}

func (t *cutTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (t *cutTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if t.net.cut(t.self, a.Addr) {
		return nil, errCut
	}
	return t.NodeAwareTransport.DialAddressTimeout(a, timeout)
}

// on gives the member memberlist's transport on a loopback port, behind n.
func (n *network) on(t *testing.T) nodeOpt {
	var nt *memberlist.NetTransport
	var err error
	// TCP and UDP must get the same free port; another process may take the UDP one.
	for range 10 {
		if nt, err = memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}}); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("gossip transport: %v", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(nt.GetAutoBindPort()))
	return func(c *Config) {
		c.GossipListen = addr
		c.transport = &cutTransport{NodeAwareTransport: nt, net: n, self: addr}
	}
}

// Two halves of a fleet that a partition kept apart longer than memberlist gossips to
// the dead become one fleet again once the network heals, with no join configured
// between them and none of them alone.
func TestPartitionHeals(t *testing.T) {
	nw := &network{side: map[string]int{}}
	a := startNode(t, "node-a", nil, nw.on(t))
	b := startNode(t, "node-b", nil, nw.on(t), withJoin(a.GossipAddr()))
	c := startNode(t, "node-c", nil, nw.on(t), withJoin(a.GossipAddr()))
	d := startNode(t, "node-d", nil, nw.on(t), withJoin(a.GossipAddr()))
	all := []string{"node-a", "node-b", "node-c", "node-d"}
	nodes := []*testNode{a, b, c, d}
	for _, n := range nodes {
		waitFor(t, n.Name()+" sees all four", convergeDeadline, func() bool {
			return slices.Equal(liveNames(n.Fleet), all)
		})
	}

	nw.setSide(c.GossipAddr(), 1)
	nw.setSide(d.GossipAddr(), 1)
	halves := map[*testNode][]string{a: all[:2], b: all[:2], c: all[2:], d: all[2:]}
	for _, n := range nodes {
		waitFor(t, n.Name()+" sees only its half", convergeDeadline, func() bool {
			return slices.Equal(liveNames(n.Fleet), halves[n])
		})
	}
	// Memberlist alone would merge the halves while it still gossips to the dead
	// (GossipToTheDeadTime, 30 s on a LAN). Outlast that.
	time.Sleep(memberlist.DefaultLANConfig().GossipToTheDeadTime + 5*time.Second)
	for _, n := range nodes {
		if got := liveNames(n.Fleet); !slices.Equal(got, halves[n]) {
			t.Fatalf("%s during the partition: live %v, want %v", n.Name(), got, halves[n])
		}
	}

	nw.heal()
	took := time.Duration(0)
	for _, n := range nodes {
		took += waitFor(t, n.Name()+" sees all four again", convergeDeadline, func() bool {
			return slices.Equal(liveNames(n.Fleet), all)
		})
	}
	var reconnects int64 // successful ones
	for _, n := range nodes {
		reconnects += n.reconnected.Load()
	}
	if reconnects == 0 {
		t.Error("the halves merged without a reconnect: the test no longer outlasts memberlist's own gossip to the dead")
	}
	t.Logf("one fleet again %v after the network healed (%d reconnects)", took.Round(time.Millisecond), reconnects)
}
