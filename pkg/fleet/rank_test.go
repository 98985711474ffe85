package fleet

import (
	"fmt"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"
)

func members(n int) []Member {
	ms := make([]Member, n)
	for i := range ms {
		ms[i] = Member{Name: fmt.Sprintf("node-%d", i), PeerAddr: fmt.Sprintf("10.0.0.%d:5001", i+1), State: StateAlive}
	}
	return ms
}

// testKeys are the chunk keys of blobs of 1-8 chunks, as a fleet would hash them.
func testKeys(n int) []string {
	keys := make([]string, 0, n)
	for i := 0; len(keys) < n; i++ {
		d := digest.FromString(fmt.Sprintf("blob %d", i))
		for c := int64(0); c < int64(1+i%8) && len(keys) < n; c++ {
			keys = append(keys, chunkKey(d, c))
		}
	}
	return keys
}

func names(ms []Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Name
	}
	return out
}

func TestRankEvenness(t *testing.T) {
	keys := testKeys(100_000)
	for _, tt := range []struct {
		members int
		chi2Max float64 // chi-square critical value at p = 0.001 for members-1 degrees of freedom
	}{
		{4, 16.27},
		{8, 24.32},
	} {
		t.Run(fmt.Sprint(tt.members), func(t *testing.T) {
			ms := members(tt.members)
			// Owners, and the first fallback, must both spread evenly: the fallback is
			// who serves when an owner is down or just joined.
			for pos := range 2 {
				count := map[string]int{}
				for _, k := range keys {
					count[rank(ms, k)[pos].Name]++
				}
				want := float64(len(keys)) / float64(tt.members)
				var chi2 float64
				lo, hi := len(keys), 0
				for _, m := range ms {
					c := count[m.Name]
					chi2 += (float64(c) - want) * (float64(c) - want) / want
					lo, hi = min(lo, c), max(hi, c)
				}
				t.Logf("position %d: counts %v, chi-square %.2f, max/min %.3f", pos, count, chi2, float64(hi)/float64(lo))
				if chi2 > tt.chi2Max {
					t.Errorf("position %d: chi-square %.2f > %.2f: not an even spread (%v)", pos, chi2, tt.chi2Max, count)
				}
				if float64(hi)/float64(lo) > 1.05 {
					t.Errorf("position %d: max/min share %.3f > 1.05 (%v)", pos, float64(hi)/float64(lo), count)
				}
			}
		})
	}
}

func TestRankMinimalDisruption(t *testing.T) {
	keys := testKeys(20_000)
	for _, n := range []int{4, 8} {
		ms := members(n)
		before := make([][]string, len(keys))
		for i, k := range keys {
			before[i] = names(rank(ms, k))
		}
		for gone := range ms {
			t.Run(fmt.Sprintf("%d members, %s leaves", n, ms[gone].Name), func(t *testing.T) {
				rest := slices.Delete(slices.Clone(ms), gone, gone+1)
				moved := 0
				for i, k := range keys {
					after := names(rank(rest, k))
					// The order of those who stay is unchanged: only the leaver's keys
					// move, each to the member that was next in line for it.
					wantAfter := slices.DeleteFunc(slices.Clone(before[i]), func(s string) bool { return s == ms[gone].Name })
					if !slices.Equal(after, wantAfter) {
						t.Fatalf("key %s: order %v after %s left, want %v", k, after, ms[gone].Name, wantAfter)
					}
					if after[0] != before[i][0] {
						moved++
					}
				}
				share := float64(moved) / float64(len(keys))
				if share < 0.5/float64(n) || share > 1.5/float64(n) {
					t.Errorf("%.3f of keys moved, want about 1/%d", share, n)
				}
			})
		}
		t.Run(fmt.Sprintf("%d members, one joins", n), func(t *testing.T) {
			newcomer := Member{Name: "newcomer", PeerAddr: "10.0.0.99:5001", State: StateAlive}
			grown := append(slices.Clone(ms), newcomer)
			taken := 0
			for i, k := range keys {
				after := names(rank(grown, k))
				if after[0] != before[i][0] {
					if after[0] != newcomer.Name {
						t.Fatalf("key %s moved from %s to %s, not to the newcomer", k, before[i][0], after[0])
					}
					// The newcomer's keys: the old owner is now the first fallback,
					// where an owner that lacks a chunk looks first.
					if after[1] != before[i][0] {
						t.Fatalf("key %s: fallback %s, want the old owner %s", k, after[1], before[i][0])
					}
					taken++
				}
			}
			share := float64(taken) / float64(len(keys))
			if share < 0.5/float64(n+1) || share > 1.5/float64(n+1) {
				t.Errorf("newcomer took %.3f of keys, want about 1/%d", share, n+1)
			}
		})
	}
}

func TestRankIsIndependentOfInputOrder(t *testing.T) {
	ms := members(6)
	rev := slices.Clone(ms)
	slices.Reverse(rev)
	for _, k := range testKeys(1000) {
		a, b := names(rank(ms, k)), names(rank(rev, k))
		if !slices.Equal(a, b) {
			t.Fatalf("key %s: %v vs %v: members listing members in another order would disagree on owners", k, a, b)
		}
		if len(a) != len(ms) {
			t.Fatalf("rank lost members: %v", a)
		}
	}
	if got := rank(nil, "k"); len(got) != 0 {
		t.Fatalf("rank of no members = %v", got)
	}
}

func TestChunkKeyDistinguishesChunks(t *testing.T) {
	d := digest.FromString("x")
	seen := map[string]bool{}
	for c := int64(0); c < 100; c++ {
		k := chunkKey(d, c)
		if seen[k] {
			t.Fatalf("duplicate key %s", k)
		}
		seen[k] = true
	}
	// Chunk 1 of one blob must not collide with chunk 11 of a blob whose digest ends in "1".
	if chunkKey("sha256:a1", 1) == chunkKey("sha256:a", 11) {
		t.Fatal("chunk keys are ambiguous")
	}
}
