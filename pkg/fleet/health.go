package fleet

import (
	"sync/atomic"
	"time"
)

// healthPolicy says when a peer stops being asked. Two kinds of trouble:
//   - faults (the mirror's ReportFault: bytes that failed verification, or repeated
//     errors): faultLimit of them within faultWindow quarantine the peer for quarantine;
//   - soft failures (Fetch could not reach it, timed out, was refused or got a broken
//     response): the peer is skipped for softBase, doubling with each consecutive
//     failure up to softMax, until a fetch from it succeeds.
type healthPolicy struct {
	faultLimit  int
	faultWindow time.Duration
	quarantine  time.Duration
	softBase    time.Duration
	softMax     time.Duration
}

var defaultHealth = healthPolicy{
	faultLimit:  3,
	faultWindow: 10 * time.Minute,
	quarantine:  10 * time.Minute,
	softBase:    time.Second,
	softMax:     30 * time.Second,
}

// peer is what a member knows about one other member (or itself): its membership record,
// its health, and the bytes exchanged with it. Fields other than the counters are guarded
// by Fleet.mu.
type peer struct {
	Member
	since time.Time // of the last state change

	faults           []time.Time // within faultWindow, at most faultLimit
	faultTotal       int64
	quarantinedUntil time.Time
	softFailures     int
	backoffUntil     time.Time

	bytesIn, bytesOut atomic.Int64
}

// eligible says whether the peer may be asked for chunks at now.
func (p *peer) eligible(now time.Time) bool {
	return p.State == StateAlive && p.PeerAddr != "" && !now.Before(p.quarantinedUntil) && !now.Before(p.backoffUntil)
}

// fault records a fault and says whether it started a quarantine.
func (p *peer) fault(now time.Time, pol healthPolicy) bool {
	p.faultTotal++
	kept := p.faults[:0]
	for _, t := range p.faults {
		if now.Sub(t) < pol.faultWindow {
			kept = append(kept, t)
		}
	}
	p.faults = append(kept, now)
	if len(p.faults) < pol.faultLimit {
		return false
	}
	p.faults = p.faults[:0]
	p.quarantinedUntil = now.Add(pol.quarantine)
	return true
}

func (p *peer) softFailure(now time.Time, pol healthPolicy) {
	p.softFailures++
	d := pol.softBase
	for i := 1; i < p.softFailures && d < pol.softMax; i++ {
		d *= 2
	}
	p.backoffUntil = now.Add(min(d, pol.softMax))
}

func (p *peer) success() {
	p.softFailures = 0
	p.backoffUntil = time.Time{}
}
